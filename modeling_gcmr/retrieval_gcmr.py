"""`retrieve()`: queries in, ranked image keys out, through the query front door and the model's decoder.

Text and image queries are validated and batched by `query_inputs_gcmr`; each batch is searched by the head the
model has (the trie beam search of the identifier head, or `generate()` under the trie for the text head), and
optionally re-ranked with the image features stored in the checkpoint:

- `rerank="features"`: the beam's candidates are ordered by `scale * q_0 . x_i` alone (q_0 the query vector, x_i the
  stored feature), i.e. exact inner-product search restricted to what the generative search proposed;
- `rerank="hybrid"`: the generative score plus `rerank_weight` times that feature score.

Stored features cost `identifier_dim` floats per image in the checkpoint and in memory (4 bytes each: 1.5 KB per
image for 384-d features, 2 KB for CLIP's 512-d; 2 GB for a million 512-d images).
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.utils.logging import tqdm

from .prefix_trie_logits_processor import constrained_generate
from .query_inputs_gcmr import (
    as_image_queries,
    as_query_list,
    check_positive_int,
    check_rerank_weight,
    search_limits,
    tokenize_queries,
    warn_unusable,
)
from .trie_beam_search_gcmr import trie_beam_search

RERANK_MODES = (None, "features", "hybrid")


@torch.no_grad()
def retrieve(model: Any, queries: Any = None, tokenizer: Any = None, top_k: int = 10, num_beams: int | None = None,
             batch_size: int = 32, *, image_embeds: Any = None, pixel_values: Any = None, prompt: str = "",
             show_progress: bool | None = None, rerank: str | None = None,
             rerank_weight: float = 1.0) -> list[list[tuple[str, float]]]:
    """See `GcmrForRetrieval.retrieve`."""
    if tokenizer is None:
        raise ValueError("retrieve() needs the tokenizer saved with this model")
    model.check_tokenizer(tokenizer)
    given = [name for name, value in (("queries", queries), ("image_embeds", image_embeds),
                                      ("pixel_values", pixel_values)) if value is not None]
    if len(given) != 1:
        raise ValueError(f"pass exactly one of queries, image_embeds or pixel_values (got {given or 'none'})")
    batch_size = check_positive_int("batch_size", batch_size)
    top_k, num_beams = search_limits(top_k, num_beams, model.config.num_beams, tokenizer.prefix_trie.num_identifiers)
    check_rerank(model, rerank, rerank_weight)
    if queries is not None:
        texts = as_query_list(queries)
        total = len(texts)
    else:
        images = as_image_queries(image_embeds if image_embeds is not None else pixel_values, given[0])
        total = images.shape[0]
    starts = range(0, total, batch_size)
    if show_progress if show_progress is not None else len(starts) > 1:
        starts = tqdm(starts, desc="retrieve", unit="batch")
    keys = tokenizer.keys
    # Texts of similar length share a batch (less padding); the results go back to the caller's order.
    order = sorted(range(total), key=lambda i: len(texts[i])) if queries is not None else list(range(total))
    was_training = model.training
    model.eval()
    try:
        results: list[list[tuple[str, float]]] = [[] for _ in range(total)]
        usable_all = [True] * total
        for start in starts:
            rows = order[start : start + batch_size]
            if queries is not None:
                inputs, usable = tokenize_queries(tokenizer, [texts[i] for i in rows], model.config.query_token_limit)
            else:
                inputs, usable = _image_inputs(model, tokenizer, given[0], images[rows], prompt)
            hits = search(model, tokenizer, inputs, top_k, num_beams, rerank, rerank_weight)
            for row, row_hits, ok in zip(rows, hits, usable):
                results[row] = [(keys[k], s) for k, s in row_hits] if ok else []
                usable_all[row] = ok
        if queries is not None:
            warn_unusable(texts, usable_all)
        return results
    finally:
        model.train(was_training)


def check_rerank(model: Any, rerank: Any, rerank_weight: Any) -> None:
    if rerank not in RERANK_MODES:
        raise ValueError(f"rerank must be one of {RERANK_MODES}, got {rerank!r}")
    if rerank is not None and model.config.identifier_head != "identifier":
        raise ValueError(
            f"rerank re-scores the beam with the identifier head's query vectors and stored image features; this "
            "checkpoint scores identifiers with the text head ("
            f"{'format 1' if model.config.format_version == 1 else 'config.identifier_head=text'}), which has "
            "neither: search without rerank, or fit a model with the "
            "identifier head (set_identifier_vocabulary(tokenizer, image_embeds=features) on a config without "
            "identifier_head='text', then store_image_features) and train it"
        )
    if rerank is not None and model.stored_image_features is None:
        raise ValueError(
            "rerank needs image features stored with the checkpoint, and this one has none: call "
            "model.store_image_features(features) (run_gcmr.py --store_image_features) and save again"
        )
    check_rerank_weight(rerank_weight)


def search(model: Any, tokenizer: Any, inputs: dict[str, torch.Tensor], top_k: int, num_beams: int,
           rerank: str | None = None, rerank_weight: float = 1.0) -> list[list[tuple[int, float]]]:
    """One batch of prepared inputs -> per row, up to `top_k` (identifier index, score) pairs, best first."""
    inputs = {name: value.to(model.device) for name, value in inputs.items()}
    wanted = num_beams if rerank is not None else top_k
    encoded = None
    if model.config.identifier_head == "identifier":
        encoded = model.encode(**inputs)
        hits = trie_beam_search(model, tokenizer.prefix_trie, encoded, num_beams, wanted)
    else:
        hits = constrained_generate(model, tokenizer, inputs, wanted, num_beams)
    if rerank is None:
        return hits
    return _rerank(model, encoded.query_vectors, hits, top_k, rerank, rerank_weight)


def _rerank(model: Any, query_vectors: torch.Tensor, hits: list[list[tuple[int, float]]], top_k: int, mode: str,
            weight: float) -> list[list[tuple[int, float]]]:
    """The beam's candidates re-scored by `scale * q_0 . x_i` (or that plus the generative score), all rows at once."""
    features = model.stored_image_features
    width = max((len(row) for row in hits), default=0)
    if width == 0:
        return [[] for _ in hits]
    scale = float(model.identifier_head.scale)  # check_rerank: only identifier-head models rerank
    indices = torch.tensor([[key for key, _ in row] + [0] * (width - len(row)) for row in hits], device=features.device)
    generative = torch.tensor([[score for _, score in row] + [0.0] * (width - len(row)) for row in hits],
                              device=features.device)
    dense = scale * torch.einsum("bkd,bd->bk", features[indices].float(), query_vectors.float().to(features.device))
    scores = dense if mode == "features" else generative + weight * dense
    lengths = torch.tensor([len(row) for row in hits], device=features.device)
    scores = scores.masked_fill(torch.arange(width, device=features.device)[None] >= lengths[:, None], float("-inf"))
    best, order = scores.topk(min(top_k, width), dim=1)
    return [[(int(indices[row, column]), float(score)) for column, score in zip(order[row].tolist(), best[row].tolist())
             if score != float("-inf")] for row in range(len(hits))]


def _image_inputs(model: Any, tokenizer: Any, name: str, images: torch.Tensor,
                  prompt: str) -> tuple[dict[str, torch.Tensor], list[bool]]:
    inputs = {name: images.to(torch.float32)}
    if prompt or model.config.images_through_encoder:
        # Format 1 always encoded a prompt with the image (empty: just the special tokens).
        text, _ = tokenize_queries(tokenizer, [prompt] * len(images), model.config.query_token_limit)
        inputs.update(text)
    return inputs, [True] * len(images)


__all__ = ["RERANK_MODES", "check_rerank", "retrieve", "search"]
