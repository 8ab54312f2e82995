"""A short fine-tune after `model.add_images`: the new images, with replay of old ones against forgetting.

`add_images` makes new images retrievable with no gradient step (their identifiers start at their features); text
queries of new images still lack what training taught the old ones. `refresh_after_add` trains on the new images'
memorize and caption rows plus a sample of old images (replay; DSI++, Mehta et al. 2023, found that fine-tuning on
new documents alone makes a generative retriever forget old ones), through the same path as `run_gcmr.py`:
`build_training_examples`, `GcmrDataCollator` and a plain `transformers.Trainer`.
"""
from __future__ import annotations

from typing import Any

import datasets
import numpy as np
from transformers import Trainer, TrainingArguments

from .collator import GcmrDataCollator
from .examples import TrainingExamplesConfig, build_training_examples


def replay_sample(old_corpus: datasets.Dataset, tokenizer: Any, count: int, seed: int = 0) -> datasets.Dataset:
    """`count` seeded rows of `old_corpus` whose images are still in the collection (removed ones are skipped)."""
    current = set(tokenizer.current_keys)
    rows = [row for row, key in enumerate(old_corpus["image_key"]) if key in current]
    chosen = np.random.default_rng(seed).permutation(len(rows))[: max(0, count)]
    return old_corpus.select(sorted(rows[i] for i in chosen))


def refresh_after_add(model: Any, tokenizer: Any, new_corpus: datasets.Dataset, old_corpus: datasets.Dataset | None,
                      training_args: TrainingArguments, replay_ratio: float = 1.0,
                      examples: TrainingExamplesConfig | None = None,
                      freeze_text_encoder: bool | None = True) -> dict[str, float]:
    """Fine-tune `model` on the added images of `new_corpus` plus `replay_ratio` old images per new one.

    Args:
        model, tokenizer: the pair after `model.add_images(...)`.
        new_corpus / old_corpus: corpora as `load_corpus` returns them (`image_key`, `captions`, `image_embeds` or
            `image`); every key of `new_corpus` must be a current key of the tokenizer.
        training_args: the Trainer's arguments (e.g. `GcmrTrainingArguments`, one or two epochs; keep
            `remove_unused_columns=False`).
        replay_ratio: old images sampled per new image (0: no replay).
        examples: how rows are made (default: memorize + every caption, joint schedule).
        freeze_text_encoder: freeze the text encoder for the refresh (its states are then cached: fast); None keeps
            the model's setting.

    Returns the Trainer's training metrics.
    """
    current = set(tokenizer.current_keys)
    missing = [key for key in new_corpus["image_key"] if key not in current]
    if missing:
        raise ValueError(f"{len(missing)} images of new_corpus (e.g. {missing[:3]}) are not in the collection: call "
                         "model.add_images(keys, tokenizer, ...) first")
    if replay_ratio < 0:
        raise ValueError(f"replay_ratio must be >= 0, got {replay_ratio}")
    model.check_tokenizer(tokenizer)
    corpus = new_corpus
    if old_corpus is not None and replay_ratio > 0:
        replay = replay_sample(old_corpus, tokenizer, round(replay_ratio * len(new_corpus)), training_args.seed)
        corpus = datasets.concatenate_datasets([new_corpus, replay.cast(new_corpus.features)])
    if freeze_text_encoder is not None:
        model.freeze_text_encoder(freeze_text_encoder)
    config = examples or TrainingExamplesConfig(seed=training_args.seed)
    train_dataset = build_training_examples(corpus, tokenizer, config, query_token_limit=model.config.query_token_limit)
    model.train()
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset,
                      data_collator=GcmrDataCollator.from_config(model.config, tokenizer), processing_class=tokenizer)
    metrics = trainer.train().metrics
    model.eval()
    return metrics


__all__ = ["refresh_after_add", "replay_sample"]
