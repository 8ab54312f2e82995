"""A short fine-tune after `model.add_images`: the new images, with replay of old ones against forgetting.

`add_images` makes new images retrievable with no gradient step (their identifiers start at their features); text
queries of new images still lack what training taught the old ones. `refresh_after_add` trains on the new images'
memorize and caption rows plus a sample of old images (replay; DSI++, Mehta et al. 2023, found that fine-tuning on
new documents alone makes a generative retriever forget old ones), through the same path as `run_gcmr.py`:
`build_training_examples`, `GcmrDataCollator` and a `transformers.Trainer` with run_gcmr.py's optimizer
(`optimizer_cls_and_kwargs`: sparse edge gradients and `LazyAdamW` past `FULL_SOFTMAX_LIMIT` identifiers, and
`--edge_optimizer_state`), so that a refresh of a million-image collection costs what its steps read.

What it trains: by default (`scope="new"`, identifier head) only the edge vectors that no old identifier uses (for
coarse_fine ids placed by the model, each new image's own last edges), stepped by `LazyAdamW` in those rows only
(`trainable_rows`; AdamW, the Trainer's default, is the optimizer this needs): old identifiers then score exactly as
before, and old images lose only what the added candidates take from them. `scope="all"` trains the whole model,
which forgets: a fresh AdamW state moves every parameter by about the learning rate per step. Measured on f30k-dev
(the tuning set; `benchmarks/growing_collection.py --dataset f30k-dev`, 20% of 1,014 images added in 5 rounds,
one epoch per round, replay 1:1): scope "all" lost old images 4.6 (lr 1e-5) to 43 (lr 3e-4) points of R@1 where
adding with no training lost 3.5 and dense search 2.3 from the added candidates alone; scope "new" at lr 1e-3 lost
2.5 and kept new images at 1.02x a full retrain (lr 1e-4: no change from no training; 1e-2: both fall).
A text-head model (string/semantic ids without the identifier head) has no edge vectors: it trains the whole
model whatever the scope.
"""
from __future__ import annotations

import contextlib
import copy
import gc
from typing import Any, Iterator

import datasets
import numpy as np
import torch
from transformers import Trainer, TrainingArguments

from .callbacks import EncoderCachePrefillCallback
from .collator import GcmrDataCollator
from .examples import IMAGE_COLUMNS, TrainingExamplesConfig, build_training_examples
from .optimization import optimizer_cls_and_kwargs


def replay_sample(old_corpus: datasets.Dataset, tokenizer: Any, count: int, seed: int = 0) -> datasets.Dataset:
    """`count` seeded rows of `old_corpus` whose images are still in the collection (removed ones are skipped)."""
    current = set(tokenizer.current_keys)
    rows = [row for row, key in enumerate(old_corpus["image_key"]) if key in current]
    chosen = np.random.default_rng(seed).permutation(len(rows))[: max(0, count)]
    return old_corpus.select(sorted(rows[i] for i in chosen))


def refresh_after_add(model: Any, tokenizer: Any, new_corpus: datasets.Dataset, old_corpus: datasets.Dataset | None,
                      training_args: TrainingArguments, replay_ratio: float = 1.0,
                      examples: TrainingExamplesConfig | None = None,
                      freeze_text_encoder: bool | None = True, scope: str = "new") -> dict[str, float]:
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
        scope: "new" (identifier head): only the new identifiers' own edge vectors (learning rate about 1e-3, no
            warm-up); "all": the whole model (a small learning rate, e.g. 1e-5: old images forget).

    Returns the Trainer's training metrics.
    """
    current = set(tokenizer.current_keys)
    missing = [key for key in new_corpus["image_key"] if key not in current]
    if missing:
        raise ValueError(f"{len(missing)} images of new_corpus (e.g. {missing[:3]}) are not in the collection: call "
                         "model.add_images(keys, tokenizer, ...) first")
    if replay_ratio < 0:
        raise ValueError(f"replay_ratio must be >= 0, got {replay_ratio}")
    if scope not in ("new", "all"):
        raise ValueError(f"scope must be 'new' or 'all', got {scope!r}")
    model.check_tokenizer(tokenizer)
    half = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if half:
        raise ValueError(f"refresh_after_add trains in float32, but this model holds {', '.join(half)} weights (a "
                         "half-precision serving copy): its AdamW steps would round away most of their updates. "
                         "Refresh the float32 model (or model.float()), then cast it again for serving")
    corpus = _read_columns(model, new_corpus)
    if old_corpus is not None and replay_ratio > 0:
        replay = replay_sample(_read_columns(model, old_corpus), tokenizer, round(replay_ratio * len(new_corpus)),
                               training_args.seed)
        corpus = datasets.concatenate_datasets([corpus, replay.cast(corpus.features)])
    if freeze_text_encoder is not None:
        model.freeze_text_encoder(freeze_text_encoder)
    config = examples or TrainingExamplesConfig(seed=training_args.seed)
    train_dataset = build_training_examples(corpus, tokenizer, config, query_token_limit=model.config.query_token_limit)
    only_new = scope == "new" and model.identifier_head is not None
    with _only_new_edges(model, tokenizer, new_corpus["image_key"]) if only_new else _kept_sparse_flag(model) as rows:
        model.train()
        # A copy: where the optimizer clips in the Trainer's place, it sets the arguments' max_grad_norm to 0.
        training_args = copy.copy(training_args)
        optimizer = optimizer_cls_and_kwargs(model, training_args, trainable_edge_rows=rows)
        trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset,
                          data_collator=GcmrDataCollator.from_config(model.config, tokenizer),
                          processing_class=tokenizer, callbacks=[EncoderCachePrefillCallback()],
                          optimizer_cls_and_kwargs=optimizer)
        with _collections_skip_older_objects():
            metrics = trainer.train().metrics
        model.eval()
    return metrics


@contextlib.contextmanager
def _collections_skip_older_objects() -> Iterator[None]:
    """Python's cyclic collector ignores the objects alive on entry until exit (`gc.freeze`).

    `Trainer.train` starts with a full `gc.collect()` (accelerate's `free_memory`), which walks every live object of
    the process: 0.29 s of a 0.53 s refresh of 2 images on the demo's checkpoint, once per round. The objects alive
    before the refresh are the caller's, not garbage of the refresh; they are collected as before after exit. Left
    alone where the caller froze objects already, since exit would unfreeze them too."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _read_columns(model: Any, corpus: datasets.Dataset) -> datasets.Dataset:
    """`corpus` without the image column the model does not read, where it has both (`load_corpus` of a folder whose
    metadata holds features gives pixels and features; the collator would otherwise send pixels to a model that
    reads features). run_gcmr.py makes the same choice from --image_input."""
    if not set(IMAGE_COLUMNS) <= set(corpus.column_names):
        return corpus
    return corpus.remove_columns("image_embeds" if model.config.vision_config is not None else "image")


@contextlib.contextmanager
def _kept_sparse_flag(model: Any) -> Iterator[None]:
    """The identifier head's `sparse_gradients` as it was before the refresh's optimizer set it."""
    head = model.identifier_head
    sparse = head.sparse_gradients if head is not None else None
    try:
        yield None
    finally:
        if head is not None:
            head.sparse_gradients = sparse


@contextlib.contextmanager
def _only_new_edges(model: Any, tokenizer: Any, new_keys: list[str]) -> Iterator[torch.Tensor]:
    """Everything frozen but the edge vectors; yields the (edges,) mask of the rows that only new identifiers take,
    the only rows the optimizer steps (`LazyAdamW`'s `trainable_rows`; a sampled softmax reads and differentiates old
    rows too)."""
    head = model.identifier_head
    wanted = set(new_keys)  # np.isin over an object array of keys sorted them in Python: 87 s at 1M
    new_rows = np.fromiter((row for row, key in enumerate(tokenizer.keys) if key in wanted), dtype=np.int64)
    paths = head.paths.long().cpu()
    old = torch.ones(len(paths), dtype=torch.bool)
    old[torch.as_tensor(new_rows)] = False
    trainable = torch.zeros(head.edge_vectors.shape[0], dtype=torch.bool)
    trainable[paths[~old][paths[~old] >= 0]] = True
    trainable[paths[old][paths[old] >= 0]] = False
    states = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    model.requires_grad_(False)
    head.edge_vectors.requires_grad_(True)
    try:
        with _kept_sparse_flag(model):
            yield trainable.to(head.edge_vectors.device)
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(states[name])


__all__ = ["refresh_after_add", "replay_sample"]
