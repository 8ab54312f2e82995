"""The one front door for queries: validation, the truncation policy, search limits and batching.

`retrieve()`, the pipeline and the training examples all go through here, so a query means the same thing in
training and in search:

- text queries are strings (a str, or any list, tuple, generator or numpy array of them); anything else, an empty
  or whitespace-only string, is refused with the item's position;
- a lone surrogate (half of a UTF-16 pair, such as "\\ud800", which no UTF-8 tokenizer can take) becomes U+FFFD,
  with one warning per call: a query is a user's text, and one broken character should not cost its other words
  (a well-formed pair written as two escapes becomes its character); training captions get the same treatment;
- every query is cut to `config.query_token_limit` tokens (the encoder's position limit, else 512), with one
  warning; before tokenizing, a query is cut to `CHARS_PER_TOKEN` characters per allowed token, so a huge string
  never reaches the tokenizer whole;
- a query none of whose tokens is a real word piece (only control, zero-width or unknown characters) is flagged:
  it gets no hits and an `UnusableQueryWarning`, rather than confident hits for nothing;
- image queries (`image_embeds`, `pixel_values`) must be finite float arrays;
- `top_k` and `num_beams` are positive ints, capped at the number of identifiers (a larger beam finds nothing
  more), and `num_beams` is raised to `top_k`;
- `rerank_weight` is a finite number in `RERANK_WEIGHT_RANGE`.
"""
from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Longer than any word piece of a real vocabulary; the cut only spares the tokenizer a pathological string.
CHARS_PER_TOKEN = 64
# Upper bound of top_k / num_beams whatever the corpus size: beam search keeps num_beams hypotheses per query.
MAX_BEAMS = 1024
# rerank="hybrid" scores a candidate by its generative score plus rerank_weight times its feature score, both a scale
# times dot products. 0 keeps the generative order; at 100 the features outweigh it a hundredfold (for the features
# alone, rerank="features"). Past that the generative part drowns in float32 rounding, and a huge weight (1e39)
# overflows to inf, or nan, and ranks nothing.
RERANK_WEIGHT_RANGE = (0.0, 100.0)
# Rows per block of `check_finite_rows`.
FINITE_CHECK_ROWS = 65_536
_SURROGATE = re.compile("[\ud800-\udfff]")


class UnusableQueryWarning(UserWarning):
    """A query had no usable token (only control, zero-width or unknown characters); it got no hits."""


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def as_query_list(queries: Any) -> list[str]:
    """The queries as a list of non-blank strings; a TypeError or ValueError names the offending item."""
    if isinstance(queries, str):
        return validate_query_texts([queries])
    if isinstance(queries, np.ndarray):
        if queries.ndim != 1:
            raise ValueError(f"a numpy array of queries must be 1-D, got shape {queries.shape}")
        queries = queries.tolist()
    elif isinstance(queries, (bytes, dict)) or not isinstance(queries, Iterable):
        raise TypeError(f"queries must be a string or a list of strings, got {type(queries).__name__}")
    return validate_query_texts(list(queries))


def validate_query_texts(queries: list[Any]) -> list[str]:
    if not queries:
        raise ValueError("no queries given: pass a string or a non-empty list of strings")
    for index, query in enumerate(queries):
        if not isinstance(query, str):
            raise TypeError(f"queries must be strings; item {index} is {type(query).__name__}: {query!r:.80}")
        if not query.strip():
            raise ValueError(f"queries must not be empty or whitespace; item {index} is {query!r}")
    return replace_lone_surrogates(queries)


def replace_lone_surrogates(texts: list[str]) -> list[str]:
    """`texts` with each lone surrogate replaced by U+FFFD (one warning naming the first such text)."""
    if not any(_SURROGATE.search(text) for text in texts):
        return texts
    fixed = [text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace") for text in texts]
    bad = [index for index, (old, new) in enumerate(zip(texts, fixed)) if new.count("\ufffd") > old.count("\ufffd")]
    if bad:
        warnings.warn(
            f"{len(bad)} text{' holds' if len(bad) == 1 else 's hold'} lone surrogates (half of a UTF-16 pair, which "
            f"cannot be encoded), replaced with U+FFFD: item {bad[0]} is {texts[bad[0]]!r:.60}",
            UserWarning,
            stacklevel=3,
        )
    return fixed


def check_positive_int(name: str, value: Any) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_rerank_weight(value: Any) -> float:
    """`rerank_weight` as a float; a ValueError naming it and `RERANK_WEIGHT_RANGE` unless it is a finite number in
    that range."""
    low, high = RERANK_WEIGHT_RANGE
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or not low <= value <= high):
        raise ValueError(f"rerank_weight must be a finite number from {low:g} to {high:g} (the weight of the stored "
                         "features' score added to the generative score in rerank='hybrid'; for the features alone "
                         f"use rerank='features'), got {value!r}")
    return float(value)


def search_limits(top_k: Any, num_beams: Any, default_beams: int, num_identifiers: int) -> tuple[int, int]:
    """(top_k, num_beams) checked and capped: beams >= top_k, both <= the identifiers (and <= MAX_BEAMS)."""
    top_k = check_positive_int("top_k", top_k)
    num_beams = default_beams if num_beams is None else check_positive_int("num_beams", num_beams)
    cap = max(1, min(num_identifiers, MAX_BEAMS))
    top_k = min(top_k, cap)
    if num_beams < top_k:
        logger.warning_once(f"num_beams={num_beams} < top_k={top_k}: raising num_beams to {top_k} so that beam search "
                            "can return top_k distinct identifiers")
    return top_k, min(max(num_beams, top_k), cap)


def query_token_ids(tokenizer: Any, texts: list[str], limit: int) -> list[list[int]]:
    """Token ids of each query, cut to `limit` tokens (or the tokenizer's smaller `model_max_length`).

    The one truncation policy of the package: training examples, `retrieve()` and the pipeline all call it. One
    warning says when a query is cut.
    """
    model_max = getattr(tokenizer, "model_max_length", None)
    if _is_int(model_max) and 1 < model_max < limit:
        limit = int(model_max)
    texts = replace_lone_surrogates([text[: limit * CHARS_PER_TOKEN] for text in texts])
    ids = tokenizer(texts, truncation=False)["input_ids"]
    if max((len(row) for row in ids), default=0) > limit:
        logger.warning_once(f"queries longer than {limit} tokens are cut to {limit} tokens (the encoder's limit)")
        ids = tokenizer(texts, truncation=True, max_length=limit)["input_ids"]
    return ids


def tokenize_queries(tokenizer: Any, texts: list[str], limit: int) -> tuple[dict[str, torch.Tensor], list[bool]]:
    """`query_token_ids` padded into tensors, and which queries have a usable token (not special, not unknown)."""
    ids = query_token_ids(tokenizer, texts, limit)
    unusable = {tokenizer.unk_token_id, *tokenizer.all_special_ids}
    usable = [any(token not in unusable for token in row) for row in ids]
    return dict(tokenizer.pad({"input_ids": ids}, return_tensors="pt")), usable


def warn_unusable(texts: list[str], usable: list[bool]) -> None:
    bad = [index for index, ok in enumerate(usable) if not ok]
    if bad:
        warnings.warn(
            f"{len(bad)} quer{'y has' if len(bad) == 1 else 'ies have'} no usable token (only control, zero-width or "
            f"unknown characters) and get no hits: item {bad[0]} is {texts[bad[0]]!r:.60}",
            UnusableQueryWarning,
            stacklevel=3,
        )


def as_image_queries(values: Any, name: str) -> torch.Tensor:
    """Image queries as a finite float tensor; numpy arrays and nested lists are accepted."""
    if isinstance(values, (str, bytes)) or values is None:
        raise TypeError(f"{name} must be a float tensor or array, got {type(values).__name__}")
    try:
        tensor = values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values, dtype=np.float32))
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be a float tensor or array of numbers: {error}") from error
    if not tensor.is_floating_point():
        tensor = tensor.float()
    if tensor.ndim == 0 or tensor.shape[0] == 0:
        raise ValueError(f"{name} needs at least one query row, got shape {tuple(tensor.shape)}")
    check_finite_rows(tensor, name, "; image queries must be finite")
    return tensor


def check_finite_rows(values: torch.Tensor, name: str, advice: str = "") -> None:
    """A ValueError naming the first row of `values` (rows first) that holds NaN or inf: the one finiteness check
    for queries, image features and added images. Checked in blocks of rows: a full-size boolean mask is half a
    gigabyte at a million 512-d rows."""
    rows = values.reshape(values.shape[0], -1) if values.ndim else values.reshape(1, 1)
    for start in range(0, rows.shape[0], FINITE_CHECK_ROWS):
        finite = torch.isfinite(rows[start : start + FINITE_CHECK_ROWS]).all(dim=1)
        if not bool(finite.all()):
            raise ValueError(f"{name} row {start + int(torch.nonzero(~finite)[0])} holds NaN or inf{advice}")


__all__ = [
    "CHARS_PER_TOKEN",
    "FINITE_CHECK_ROWS",
    "MAX_BEAMS",
    "RERANK_WEIGHT_RANGE",
    "UnusableQueryWarning",
    "as_image_queries",
    "as_query_list",
    "check_finite_rows",
    "check_positive_int",
    "check_rerank_weight",
    "search_limits",
    "query_token_ids",
    "replace_lone_surrogates",
    "tokenize_queries",
    "validate_query_texts",
    "warn_unusable",
]
