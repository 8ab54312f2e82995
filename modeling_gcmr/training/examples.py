"""The two training steps of GRACE as one `datasets.Dataset`.

*Learning to memorize* maps an image to its identifier; *learning to retrieve* maps a caption (or a
pseudo-query) to it. `build_training_examples` turns a corpus into rows tagged with their `task`, ready for
`GcmrDataCollator` (`collator.py`) and a plain `Trainer`.

Schedules:
  * ``joint`` (GRACE): memorize and retrieve rows mixed; the Trainer's random sampler mixes them in every batch.
  * ``sequential``: all memorize rows (``phase_epochs`` passes, each reshuffled) followed by all retrieve rows
    (``phase_epochs`` passes). Train it with ``TrainingArguments(train_sampling_strategy="sequential")`` so the
    Trainer keeps that order; one Trainer epoch is then the whole curriculum, and more epochs repeat it. The
    order lives in the data, not in a sampler, so `resume_from_checkpoint` (which skips consumed batches) and
    multi-process sharding (accelerate splits the ordered batches) keep working unchanged.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import datasets
import numpy as np
from transformers.utils import logging

from ..configuration_gcmr import DEFAULT_QUERY_TOKENS
from ..query_inputs_gcmr import query_token_ids

MEMORIZE, RETRIEVE = "memorize", "retrieve"
IMAGE_COLUMNS = ("image", "image_embeds")
_ROW_FEATURES = {
    "task": datasets.Value("string"),
    "image_key": datasets.Value("string"),
    "input_ids": datasets.Sequence(datasets.Value("int32")),
    "labels": datasets.Sequence(datasets.Value("int32")),
}

logger = logging.get_logger(__name__)


@dataclass
class TrainingExamplesConfig:
    """How the corpus becomes memorize and retrieve examples."""

    schedule: Literal["joint", "sequential"] = field(
        default="joint",
        metadata={"help": "'joint': mixed and shuffled (GRACE). 'sequential': all memorize rows, then all retrieve rows."},
    )
    memorize_ratio: float = field(
        default=1.0,
        metadata={
            "help": "Expected memorize examples per image: the integer part is repeated, the fraction is sampled "
            "(0.5 = a random half of the images)."
        },
    )
    retrieve_ratio: float = field(
        default=1.0, metadata={"help": "Expected retrieve examples per caption or pseudo-query, like memorize_ratio."}
    )
    use_pseudo_queries: bool = field(
        default=True,
        metadata={"help": "Turn pseudo-queries (the 'pseudo_queries' column, or the mapping given) into retrieve rows."},
    )
    memorize_prompt: str = field(
        default="", metadata={"help": "Text that accompanies the image in a memorize example (the task cue)."}
    )
    train_splits: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "With a 'split' column: the splits whose captions are training queries. Images of other "
            "splits are only memorized (and take pseudo-queries). None: every caption trains."
        },
    )
    phase_epochs: int = field(
        default=1, metadata={"help": "Sequential schedule: passes over each phase inside one Trainer epoch."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of ratio sampling and shuffling."})

    def __post_init__(self):
        if self.schedule not in ("joint", "sequential"):
            raise ValueError(f"schedule must be 'joint' or 'sequential', got {self.schedule!r}")
        for name in ("memorize_ratio", "retrieve_ratio"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.memorize_ratio == 0 and self.retrieve_ratio == 0:
            raise ValueError("memorize_ratio and retrieve_ratio are both 0: there would be no training example")
        if self.phase_epochs < 1:
            raise ValueError(f"phase_epochs must be >= 1, got {self.phase_epochs}")
        if self.train_splits is not None:
            self.train_splits = tuple(self.train_splits)


def build_training_examples(
    corpus: datasets.Dataset,
    tokenizer,
    config: TrainingExamplesConfig | None = None,
    pseudo_queries: Mapping[str, Sequence[str]] | None = None,
    query_token_limit: int = DEFAULT_QUERY_TOKENS,
) -> datasets.Dataset:
    """Memorize and retrieve rows for `corpus` (columns from `load_corpus`), labelled by `tokenizer` (`ImageIdTokenizer`).

    Rows carry `task`, `image_key`, `input_ids` (the query, or the memorize prompt), `labels` (identifier ids +
    EOS) and the corpus' image columns (`image` and/or `image_embeds`: filled for memorize rows, None for
    retrieve rows). `pseudo_queries` maps image keys to extra queries (e.g. generated captions); they add to a
    `pseudo_queries` column when the corpus has one. Queries are cut as search cuts them: pass the model's
    `config.query_token_limit`.
    """
    config = config or TrainingExamplesConfig()
    _check_corpus(corpus, config)
    rng = np.random.default_rng(config.seed)
    keys = list(corpus["image_key"])
    queries = _training_queries(corpus, config, pseudo_queries)
    labels = dict(zip(keys, tokenizer.encode_identifiers(keys)))

    memorize_rows = np.repeat(np.arange(len(keys)), _copies(len(keys), config.memorize_ratio, rng))
    query_pairs = [(key, text) for key in keys for text in queries[key]]
    retrieve_pairs = [query_pairs[i] for i in np.repeat(np.arange(len(query_pairs)), _copies(len(query_pairs), config.retrieve_ratio, rng))]

    memorize = _memorize_rows(corpus, memorize_rows, tokenizer, labels, config, query_token_limit)
    retrieve = _retrieve_rows(retrieve_pairs, tokenizer, labels, query_token_limit, memorize.features)
    if not len(memorize) + len(retrieve):
        raise ValueError("no training example: the ratios and the corpus leave no memorize and no retrieve row")
    if config.schedule == "joint":
        parts = [part for part in (memorize, retrieve) if len(part)]
        return datasets.concatenate_datasets(parts).shuffle(seed=config.seed).flatten_indices()
    phases = [
        phase.shuffle(seed=config.seed + epoch)
        for phase in (memorize, retrieve)
        for epoch in range(config.phase_epochs)
        if len(phase)
    ]
    return datasets.concatenate_datasets(phases).flatten_indices()


def build_query_examples(queries: Sequence[str], gold_keys: Sequence[str], tokenizer,
                         query_token_limit: int = DEFAULT_QUERY_TOKENS) -> datasets.Dataset:
    """Retrieve rows for held-out queries (e.g. `split_captions(...).queries`), used as the Trainer's eval_dataset."""
    if len(queries) != len(gold_keys):
        raise ValueError(f"{len(queries)} queries but {len(gold_keys)} gold keys")
    distinct = list(dict.fromkeys(gold_keys))  # an image with several queries is encoded once
    labels = dict(zip(distinct, tokenizer.encode_identifiers(distinct)))
    return _retrieve_rows(list(zip(gold_keys, queries)), tokenizer, labels, query_token_limit, None)


def _check_corpus(corpus: datasets.Dataset, config: TrainingExamplesConfig) -> None:
    missing = [name for name in ("image_key", "captions") if name not in corpus.column_names]
    if missing:
        raise ValueError(f"corpus lacks column(s) {missing}; its columns are {corpus.column_names} (use load_corpus)")
    if not any(name in corpus.column_names for name in IMAGE_COLUMNS):
        raise ValueError(f"corpus has neither 'image' nor 'image_embeds'; its columns are {corpus.column_names}")
    if config.train_splits is not None and "split" not in corpus.column_names:
        raise ValueError(f"train_splits={config.train_splits} given, but the corpus has no 'split' column")


def _training_queries(corpus, config, extra: Mapping[str, Sequence[str]] | None) -> dict[str, list[str]]:
    """The training queries of every image: its captions (in a training split) plus its pseudo-queries."""
    keys = corpus["image_key"]
    splits = corpus["split"] if config.train_splits is not None else [None] * len(keys)
    queries = {
        key: list(captions) if config.train_splits is None or split in config.train_splits else []
        for key, captions, split in zip(keys, corpus["captions"], splits)
    }
    if not config.use_pseudo_queries:
        return queries
    if "pseudo_queries" in corpus.column_names:
        for key, pseudo in zip(keys, corpus["pseudo_queries"]):
            queries[key].extend(pseudo or [])
    for key, pseudo in (extra or {}).items():
        if key not in queries:
            raise KeyError(f"pseudo_queries names image key {key!r}, which is not in the corpus")
        queries[key].extend(pseudo)
    return queries


def _copies(count: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """How often each of `count` examples is used: floor(ratio), plus one for a random `frac(ratio)` share."""
    whole, fraction = math.floor(ratio), ratio - math.floor(ratio)
    return whole + (rng.random(count) < fraction).astype(np.int64)


def _encode_queries(tokenizer, texts: list[str], limit: int) -> list[list[int]]:
    return query_token_ids(tokenizer, texts, limit) if texts else []


def _memorize_rows(corpus, rows: np.ndarray, tokenizer, labels, config, limit: int) -> datasets.Dataset:
    image_columns = [name for name in IMAGE_COLUMNS if name in corpus.column_names]
    if not len(rows):
        # memorize_ratio=0: add_column on an empty selection fails inside datasets, so build the empty table directly
        features = {**_ROW_FEATURES, **{name: corpus.features[name] for name in image_columns}}
        return datasets.Dataset.from_dict({name: [] for name in features}, features=datasets.Features(features))
    memorize = corpus.select_columns(["image_key", *image_columns]).select(rows.tolist())
    keys = memorize["image_key"]
    prompt = _encode_queries(tokenizer, [config.memorize_prompt], limit)[0]
    memorize = memorize.add_column("task", [MEMORIZE] * len(keys))
    memorize = memorize.add_column("input_ids", [prompt] * len(keys), feature=datasets.Sequence(datasets.Value("int32")))
    memorize = memorize.add_column("labels", [labels[k] for k in keys], feature=datasets.Sequence(datasets.Value("int32")))
    return memorize.select_columns(["task", "image_key", "input_ids", "labels", *image_columns]).flatten_indices()


def _retrieve_rows(pairs, tokenizer, labels, limit: int, image_features) -> datasets.Dataset:
    keys = [key for key, _ in pairs]
    features = dict(_ROW_FEATURES)
    data: dict[str, list[Any]] = {
        "task": [RETRIEVE] * len(keys),
        "image_key": keys,
        "input_ids": _encode_queries(tokenizer, [text for _, text in pairs], limit),
        "labels": [labels[k] for k in keys],
    }
    for name in IMAGE_COLUMNS:
        if image_features is not None and name in image_features:
            features[name] = image_features[name]
            data[name] = [None] * len(keys)
    return datasets.Dataset.from_dict(data, features=datasets.Features(features))


__all__ = ["IMAGE_COLUMNS", "MEMORIZE", "RETRIEVE", "TrainingExamplesConfig", "build_query_examples", "build_training_examples"]
