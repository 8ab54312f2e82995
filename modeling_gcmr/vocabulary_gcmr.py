"""Fitting a model to a tokenizer's identifier vocabulary, and checking that the two belong together.

Every identifier type gets the identifier head by default: the model keeps the tokenizer's trie paths and one vector
per trie edge (`identifier_head_gcmr.py`). A trie edge is a token in the context of its prefix whatever the token
is, so identifiers spelled with the text tokenizer's own pieces (string, semantic) are paths like any other and
start, like them, as constrained inner-product search. The text head (the LM head over the whole vocabulary,
resized to the tokenizer) is kept where the config asks for it (`GcmrConfig(identifier_head="text")`: models that
were fitted before string and semantic identifiers moved to the identifier head say so in their config) and for
every checkpoint of format 1. The tokenizer object is only used through its methods: a Hub file on this
side never imports the tokenization package.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .atomic_write_gcmr import MIXED_SAVES_HINT
from .identifier_head_gcmr import SHARED_EOS_ROW, share_forced_eos_rows
from .query_inputs_gcmr import check_finite_rows

INITS = ("auto", "dense", "unit_vectors", "random")


def set_identifier_vocabulary(model: Any, tokenizer: Any, init: str = "auto", seed: int = 0, *,
                              image_embeds: Any = None) -> None:
    """See `GcmrForRetrieval.set_identifier_vocabulary`."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    table = tokenizer.identifier_table
    config = model.config
    # The config chooses: "text" stays text (old string/semantic checkpoints, users of the LM head); None or
    # "identifier" gets the identifier head, whatever tokens the identifiers are spelled with.
    text_head = config.format_version == 1 or config.identifier_head == "text"
    features = None if image_embeds is None else _feature_matrix(image_embeds, len(table.keys))
    if text_head:
        # With init="auto" image features are simply not used: the text head has no identifier vectors.
        if init in ("dense", "unit_vectors"):
            raise ValueError(
                "this model scores identifiers with the text head (config.identifier_head='text'), which has no "
                "identifier vectors to initialise (from image features or unit vectors); use init='random', or a "
                "config with identifier_head=None for the identifier head"
            )
        model.resize_token_embeddings(len(tokenizer))
    else:
        if init == "dense" and features is None:
            raise ValueError("init='dense' needs image_embeds: one feature row per key of the tokenizer")
        dim = features.shape[1] if features is not None else None
        trie = tokenizer.prefix_trie
        paths = torch.as_tensor(trie.paths(tokenizer.identifier_token_rows))
        rows = torch.arange(trie.num_edges)
        if config.shared_eos_vector:
            paths, rows = share_forced_eos_rows(paths, trie.num_edges)
        num_rows = int(rows.max()) + 1 if len(rows) else 0
        head = model.install_identifier_head(paths, torch.as_tensor(tokenizer.identifier_token_rows), num_rows, dim)
        head.remember_edge_rows(trie, rows)
        _fit_encoder_vocabulary(model, tokenizer.num_text_tokens)
        if init in ("auto", "dense") and features is not None:
            head.initialize_from_features(features)
            if config.shared_eos_vector:
                # What a forced EOS edge is left with is exactly zero (the edge before it took its identifier's
                # whole rest); the init's per-depth means would leave rounding, or a mean over depths, in the row.
                with torch.no_grad():
                    head.edge_vectors[SHARED_EOS_ROW] = 0.0
        elif init in ("auto", "unit_vectors") and table.unit_vectors is not None:
            vectors, edge_tokens = _token_vectors(tokenizer, head.edge_vectors.shape[1], seed)
            # Per vector row: the shared EOS row is an EOS edge's (-1), as each edge mapped to it.
            head.initialize_from_tokens(vectors, torch.full((num_rows,), -1, dtype=torch.long).index_put_(
                (rows,), edge_tokens))
        elif init == "unit_vectors":
            raise ValueError(f"init='unit_vectors' needs identifier_table.unit_vectors; the {table.id_type!r} table has "
                             "none: pass image_embeds (init='dense') or use init='random'")
        else:
            generator = torch.Generator().manual_seed(seed)
            dim = head.edge_vectors.shape[1]
            with torch.no_grad():
                head.edge_vectors.copy_(torch.randn(head.edge_vectors.shape, generator=generator) / dim**0.5)
        config.identifier_head = "identifier"
        # Labels end with the tokenizer's EOS, whatever the backbone's own convention.
        config.eos_token_id = int(tokenizer.eos_token_id)
    if config.format_version != 1 and text_head:
        config.identifier_head = "text"
    config.identifier_signature = str(tokenizer.identifier_signature)
    config.max_identifier_length = int(tokenizer.max_identifier_length)


def check_tokenizer(model: Any, tokenizer: Any) -> None:
    """Raise a ValueError when `tokenizer`'s identifier vocabulary is not the one the model was fitted to."""
    expected = model.config.identifier_signature
    found = getattr(tokenizer, "identifier_signature", None)
    if found is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no identifier vocabulary (identifier_signature); pass the "
            "ImageIdTokenizer saved with this model"
        )
    if expected is not None and expected != found:
        raise ValueError(
            f"identifier vocabulary mismatch: the model was fitted to signature {expected[:16]}..., the tokenizer has "
            f"{str(found)[:16]}...; load the tokenizer saved with this model, or call "
            f"set_identifier_vocabulary(tokenizer) and retrain. {MIXED_SAVES_HINT}"
        )
    if model.config.identifier_head == "identifier":
        if len(tokenizer.keys) != model.config.num_identifiers:
            raise ValueError(
                f"identifier count mismatch: the tokenizer has {len(tokenizer.keys)} identifiers, the model's identifier "
                f"head {model.config.num_identifiers}; call model.set_identifier_vocabulary(tokenizer) before training"
            )
    elif len(tokenizer) != model.vocab_size:
        raise ValueError(
            f"vocabulary size mismatch: the tokenizer has {len(tokenizer)} tokens, the model's output embedding has "
            f"{model.vocab_size} rows; call model.set_identifier_vocabulary(tokenizer) before training"
        )


def _feature_matrix(values: Any, num_keys: int) -> torch.Tensor:
    features = torch.as_tensor(values.detach().cpu() if isinstance(values, torch.Tensor) else np.asarray(values),
                               dtype=torch.float32)
    if features.ndim != 2 or features.shape[0] != num_keys:
        raise ValueError(f"image_embeds must have one row per key of the tokenizer: shape ({num_keys}, D), got "
                         f"{tuple(features.shape)}")
    check_finite_rows(features, "image_embeds")
    return features


def _fit_encoder_vocabulary(model: Any, num_text_tokens: int) -> None:
    """The encoder reads query text only: it needs rows for the text vocabulary, not for identifier tokens."""
    embeddings = model.get_input_embeddings()
    if embeddings.weight.shape[0] < num_text_tokens:
        model.resize_token_embeddings(num_text_tokens)


def _token_vectors(tokenizer: Any, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(vector per new identifier token in width `dim`, the token rank of each trie edge or -1 for EOS edges)."""
    table = tokenizer.identifier_table
    vectors = torch.as_tensor(table.unit_vectors[~table.unit_is_text], dtype=torch.float32)
    if vectors.shape[1] != dim:
        # A fixed random map keeps inner products roughly (Johnson-Lindenstrauss) when widths differ.
        generator = torch.Generator().manual_seed(seed)
        vectors = vectors.nan_to_num(0.0) @ (torch.randn(vectors.shape[1], dim, generator=generator) / dim**0.5)
    edge_tokens = torch.as_tensor(tokenizer.prefix_trie.child_tokens.astype(np.int64)) - tokenizer.num_text_tokens
    return vectors, edge_tokens


__all__ = ["INITS", "check_tokenizer", "set_identifier_vocabulary"]
