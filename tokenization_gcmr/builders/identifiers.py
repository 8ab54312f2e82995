"""``build_identifiers``: one unique identifier per image, for the six id_types of GRACE and ACE.

Every builder returns an :class:`IdentifierTable`. Identifiers are unique whatever the data: types
that can collide (string, semantic, coarse_fine) suffix every member of a colliding group with a
uniqueness token ``<u_j>`` (j = its rank in the group, in key order), and the structured builder
falls back to splitting by order where k-means cannot split a node. Same inputs and seed give the
same table, bit for bit (on the same machine and library versions).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Sequence

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from ..identifier_table import IdentifierTable
from .features import FeatureMatrix, code_means, open_features
from .quantizers import (
    ASSIGN_BATCH,
    assign,
    digit_tree_numbers,
    kmeans_centroids,
    residual_kmeans,
    sample_rows,
    train_rqvae,
)

PROGRESS_MIN_ITEMS = 50_000
_TYPES = {"int": int, "bool": bool, "float": (int, float), "str": str}


class _Options:
    """Checks every field against its annotation and its ``min`` / ``choices`` metadata."""

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            expected = _TYPES.get(spec.type)
            if expected is not None and (
                not isinstance(value, expected) or (spec.type != "bool" and isinstance(value, bool))
            ):
                raise ValueError(f"option {spec.name!r} must be {spec.type}, got {value!r}")
            if "min" in spec.metadata and value < spec.metadata["min"]:
                raise ValueError(f"option {spec.name!r} must be >= {spec.metadata['min']}, got {value!r}")
            if "choices" in spec.metadata and value not in spec.metadata["choices"]:
                raise ValueError(f"option {spec.name!r} must be one of {spec.metadata['choices']}, got {value!r}")

    def to_json(self) -> dict[str, Any]:
        """JSON-safe values; a text tokenizer is recorded by its class name."""
        resolved = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.name == "text_tokenizer":
                value = f"{type(value).__module__}.{type(value).__qualname__}"
            resolved[spec.name] = value
        return resolved


def _option(default: Any, help: str, **metadata: Any) -> Any:
    return field(default=default, metadata={"help": help, **metadata})


_TEXT_TOKENIZER_HELP = (
    "The text tokenizer whose pieces spell the identifier: a transformers tokenizer (`.tokenize`) or a "
    "`tokenizers.Tokenizer` (`.encode(text, add_special_tokens=False).tokens`). Required."
)


@dataclass(frozen=True)
class NumericOptions(_Options):
    """`numeric`: the decimal digits of a running index, fixed width, one shared token `<n_d>` per digit."""

    order: str = _option(
        "auto",
        "How the running index is assigned: 'clusters' (a balanced hierarchical k-means on the embeddings, 10 "
        "branches per digit, so that every digit prefix is a cluster of similar images), 'arbitrary' (GRACE: key "
        "order, permuted with the seed when `shuffle`), 'auto' (clusters when embeddings are given, else arbitrary).",
        choices=("auto", "clusters", "arbitrary"),
    )
    shuffle: bool = _option(True, "order 'arbitrary': permute the running index with the seed, so digits carry no "
                                  "corpus order.")
    kmeans_iterations: int = _option(20, "order 'clusters': faiss k-means iterations per node.", min=1)
    train_sample: int = _option(
        2_560, "order 'clusters': train each node's k-means on at most this many seeded rows (256 per centroid).", min=2
    )


@dataclass(frozen=True)
class StringOptions(NumericOptions):
    """`string`: the same running index as `numeric` (same `order`), written as text and tokenized.

    In cluster order the text is zero-padded to a fixed width, so that every piece boundary is a digit prefix and so
    a cluster of the digit tree; GRACE's arbitrary order writes the index without leading zeros."""

    text_tokenizer: Any = _option(None, _TEXT_TOKENIZER_HELP)


@dataclass(frozen=True)
class SemanticOptions(_Options):
    """`semantic` (GRACE): the text pieces of each image's first caption."""

    text_tokenizer: Any = _option(None, _TEXT_TOKENIZER_HELP)
    max_length: int = _option(16, "Keep at most this many caption pieces (before any uniqueness token).", min=1)


@dataclass(frozen=True)
class StructuredOptions(_Options):
    """`structured` (GRACE): hierarchical k-means; tokens `<s{level}_{code}>`, the last one the leaf position."""

    branching: int = _option(30, "k of the k-means at every node (GRACE: 30).", min=2)
    leaf_size: int = _option(30, "A node of at most this many images becomes a leaf (GRACE: 30).", min=1)
    kmeans_iterations: int = _option(20, "faiss k-means iterations per node.", min=1)
    train_sample: int = _option(
        8_192, "Train each node's k-means on at most this many seeded rows (~256 per centroid at k=30).", min=2
    )


@dataclass(frozen=True)
class AtomicOptions(_Options):
    """`atomic`: one new token `<a_i>` per image (no options)."""


@dataclass(frozen=True)
class CoarseFineOptions(_Options):
    """`coarse_fine` (ACE): `<c_k>` coarse k-means token, `<f{level}_{code}>` residual tokens, `<u_j>` on collision."""

    num_coarse: int = _option(256, "Clusters of the coarse k-means (capped at the number of training rows).", min=1)
    num_levels: int = _option(3, "Fine residual-quantization levels M.", min=1)
    codebook_size: int = _option(256, "Entries per fine codebook (capped at the number of training rows).", min=1)
    fine_quantizer: str = _option(
        "rqvae",
        "Fine quantizer: 'rqvae' (a trained torch RQ-VAE, as in ACE; far fewer collisions) or 'residual_kmeans' "
        "(faiss k-means level after level; no training, faster).",
        choices=("residual_kmeans", "rqvae"),
    )
    kmeans_iterations: int = _option(20, "faiss k-means iterations (coarse, residual levels, RQ-VAE codebook init).", min=1)
    train_sample: int = _option(
        65_536, "Train the quantizers (k-means, RQ-VAE) on at most this many seeded rows (256 per centroid).", min=1
    )
    rqvae_hidden_dim: int = _option(256, "RQ-VAE: hidden width of the encoder and decoder MLPs.", min=1)
    rqvae_latent_dim: int = _option(64, "RQ-VAE: latent (codebook) dimension.", min=1)
    rqvae_epochs: int = _option(20, "RQ-VAE: passes over the training rows.", min=0)
    rqvae_batch_size: int = _option(1024, "RQ-VAE: training batch size.", min=1)
    rqvae_learning_rate: float = _option(1e-3, "RQ-VAE: Adam learning rate.", min=0.0)
    rqvae_commitment_weight: float = _option(0.25, "RQ-VAE: weight of the commitment loss.", min=0.0)
    rqvae_num_threads: int = _option(1, "RQ-VAE: torch threads while training (fixed for reproducibility).", min=1)


# ----------------------------------------------------------------------------- packing helpers


def _pack_levels(
    local: np.ndarray, unit_name: Callable[[int, int], str], level_vectors: Callable[[int, np.ndarray], np.ndarray]
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Turn per-level codes (N, L; -1 padded) into unit indices; only codes in use become units."""
    codes = np.full(local.shape, -1, dtype=np.int32)
    units: list[str] = []
    vectors = []
    for level in range(local.shape[1]):
        column = local[:, level]
        valid = column >= 0
        used = np.unique(column[valid])
        codes[valid, level] = len(units) + np.searchsorted(used, column[valid])
        units.extend(unit_name(level, int(code)) for code in used)
        vectors.append(level_vectors(level, used))
    return codes, units, np.concatenate(vectors).astype(np.float32)


def _append_uniqueness(codes: np.ndarray, units: list[str]) -> tuple[np.ndarray, list[str], int]:
    """Suffix `<u_j>` to every row that equals another row (j = its rank among them) or is empty.

    Returns the new codes, the units with the `<u_j>` appended, and how many `<u_j>` were added.
    """
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    lengths = (codes >= 0).sum(axis=1)
    needs_suffix = (counts[inverse] > 1) | (lengths == 0)
    if not needs_suffix.any():
        return codes, units, 0
    order = np.argsort(inverse, kind="stable")
    group_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(codes), dtype=np.int64)
    rank[order] = np.arange(len(codes)) - group_start[inverse[order]]
    num_suffixes = int(rank[needs_suffix].max()) + 1
    width = codes.shape[1] + int((lengths[needs_suffix] == codes.shape[1]).any())
    widened = np.full((len(codes), width), -1, dtype=np.int32)
    widened[:, : codes.shape[1]] = codes
    rows = np.flatnonzero(needs_suffix)
    widened[rows, lengths[rows]] = len(units) + rank[rows]
    return widened, units + [f"<u_{j}>" for j in range(num_suffixes)], num_suffixes


def _tokenize(text_tokenizer: Any, texts: list[str]) -> list[list[str]]:
    if isinstance(text_tokenizer, Tokenizer):
        return [encoding.tokens for encoding in text_tokenizer.encode_batch(texts, add_special_tokens=False)]
    if hasattr(text_tokenizer, "tokenize"):
        return [list(text_tokenizer.tokenize(text)) for text in texts]
    raise ValueError(
        f"text_tokenizer must be a transformers tokenizer or a tokenizers.Tokenizer, got {type(text_tokenizer).__name__}"
    )


def _text_table(pieces: list[list[str]]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Codes over the text pieces (units in first-seen order, unit_is_text=True) plus `<u_j>` suffixes."""
    vocabulary: dict[str, int] = {}
    codes = np.full((len(pieces), max(1, max(len(seq) for seq in pieces))), -1, dtype=np.int32)
    for row, seq in enumerate(pieces):
        codes[row, : len(seq)] = [vocabulary.setdefault(piece, len(vocabulary)) for piece in seq]
    codes, units, _ = _append_uniqueness(codes, list(vocabulary))
    return codes, units, np.arange(len(units)) < len(vocabulary)


def _running_index(num_items: int, shuffle: bool, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(num_items) if shuffle else np.arange(num_items)


def _progress(num_items: int, description: str, steps: int | None = None, unit: str = "image") -> tqdm:
    """A progress bar over ``steps`` (default: the images), shown for large builds on a terminal."""
    disable = True if num_items < PROGRESS_MIN_ITEMS else None
    return tqdm(total=steps or num_items, desc=description, unit=unit, disable=disable)


# ----------------------------------------------------------------------------- builders
# Each returns (codes, units, unit_is_text, unit_vectors).


def _running_numbers(opts: NumericOptions, seed: int, keys, embeddings, width: int, id_type: str) -> np.ndarray:
    """The running index of `numeric` and `string` identifiers, in the order `opts.order` asks for."""
    order = opts.order if opts.order != "auto" else ("arbitrary" if embeddings is None else "clusters")
    if order == "arbitrary":
        return _running_index(len(keys), opts.shuffle, seed)
    if embeddings is None:
        raise ValueError(f"{id_type} order 'clusters' needs embeddings: a float array of shape ({len(keys)}, D)")
    with _progress(len(keys), f"{id_type} identifiers") as bar:
        return digit_tree_numbers(embeddings, width, seed, opts.kmeans_iterations, opts.train_sample, bar.update)


def _build_numeric(opts: NumericOptions, seed: int, keys, embeddings, captions):
    width = len(str(len(keys) - 1))
    index = _running_numbers(opts, seed, keys, embeddings, width, "numeric")
    codes = (index[:, None] // 10 ** np.arange(width - 1, -1, -1)) % 10
    return codes, [f"<n_{digit}>" for digit in range(10)], np.zeros(10, dtype=bool), None


def _build_string(opts: StringOptions, seed: int, keys, embeddings, captions):
    width = len(str(len(keys) - 1))
    index = _running_numbers(opts, seed, keys, embeddings, width, "string")
    clustered = opts.order != "arbitrary" and embeddings is not None
    texts = [str(i).zfill(width) if clustered else str(i) for i in index]
    return (*_text_table(_tokenize(opts.text_tokenizer, texts)), None)


def _build_semantic(opts: SemanticOptions, seed: int, keys, embeddings, captions):
    pieces = [seq[: opts.max_length] for seq in _tokenize(opts.text_tokenizer, captions)]
    return (*_text_table(pieces), None)


def _build_atomic(opts: AtomicOptions, seed: int, keys, embeddings, captions):
    return np.arange(len(keys))[:, None], [f"<a_{i}>" for i in range(len(keys))], np.zeros(len(keys), dtype=bool), None


def _split_node(
    x: FeatureMatrix | np.ndarray, opts: StructuredOptions, seed: int, rng: np.random.Generator
) -> np.ndarray:
    """Child index (0..m-1, m >= 2) of every row of a node: k-means, or by order where k-means cannot split."""
    k = min(opts.branching, len(x))
    centroids = kmeans_centroids(x[sample_rows(len(x), opts.train_sample, rng)], k, seed, opts.kmeans_iterations)
    labels = assign(x, centroids)
    if labels.min() >= 0:
        used, labels = np.unique(labels, return_inverse=True)
        if len(used) > 1:
            return labels.reshape(-1)
    return np.arange(len(x)) * k // len(x)


def _build_structured(opts: StructuredOptions, seed: int, keys, embeddings: FeatureMatrix, captions):
    num_items = len(embeddings)
    rng = np.random.default_rng(seed)
    local = np.full((num_items, 4), -1, dtype=np.int64)
    stack = [(np.arange(num_items), 0)]
    with _progress(num_items, "structured identifiers") as bar:
        while stack:
            rows, depth = stack.pop()
            if depth == local.shape[1]:
                local = np.concatenate([local, np.full_like(local, -1)], axis=1)
            if len(rows) <= opts.leaf_size:
                local[rows, depth] = np.arange(len(rows))
                bar.update(len(rows))
                continue
            # The root is all rows; a node too large to gather at once is a lazy view read in blocks (a
            # million-row memory-mapped input is never loaded whole); smaller nodes are gathered (cheaper).
            if len(rows) == num_items:
                node = embeddings
            else:
                node = embeddings.subset(rows) if len(rows) > ASSIGN_BATCH else embeddings[rows]
            labels = _split_node(node, opts, seed, rng)
            local[rows, depth] = labels
            order = np.argsort(labels, kind="stable")
            children = np.split(rows[order], np.flatnonzero(np.diff(labels[order])) + 1)
            stack.extend((child, depth + 1) for child in reversed(children))
    local = local[:, : int((local >= 0).sum(axis=1).max())]
    means = code_means(embeddings, local)
    codes, units, vectors = _pack_levels(local, lambda level, code: f"<s{level}_{code}>", lambda level, _: means[level])
    return codes, units, np.zeros(len(units), dtype=bool), vectors


def _build_coarse_fine(opts: CoarseFineOptions, seed: int, keys, embeddings: FeatureMatrix, captions):
    # The quantizers train on a bounded seeded sample; every pass over all rows reads one block at a time.
    rng = np.random.default_rng(seed)
    train_rows = sample_rows(len(embeddings), opts.train_sample, rng)
    fine_steps = opts.num_levels if opts.fine_quantizer == "residual_kmeans" else 1
    with _progress(len(embeddings), "coarse_fine identifiers", 2 + fine_steps, unit="step") as bar:
        train = embeddings[train_rows]
        centroids = kmeans_centroids(train, min(opts.num_coarse, len(train_rows)), seed, opts.kmeans_iterations)
        coarse = assign(embeddings, centroids)
        train = train - centroids[coarse[train_rows]]
        bar.update()
        residual_blocks = (
            (start, block - centroids[coarse[start : start + len(block)]]) for start, block in embeddings.blocks()
        )
        if opts.fine_quantizer == "residual_kmeans":
            fine, codebooks = residual_kmeans(
                train, residual_blocks, len(embeddings), opts.num_levels, opts.codebook_size, seed,
                opts.kmeans_iterations, bar.update,
            )
        else:
            fine = train_rqvae(
                train,
                residual_blocks,
                len(embeddings),
                num_levels=opts.num_levels,
                codebook_size=opts.codebook_size,
                hidden_dim=opts.rqvae_hidden_dim,
                latent_dim=opts.rqvae_latent_dim,
                epochs=opts.rqvae_epochs,
                batch_size=opts.rqvae_batch_size,
                learning_rate=opts.rqvae_learning_rate,
                commitment_weight=opts.rqvae_commitment_weight,
                num_threads=opts.rqvae_num_threads,
                seed=seed,
                iterations=opts.kmeans_iterations,
                on_step=bar.update,
            )
            fine_means = code_means(embeddings, fine)
    local = np.concatenate([coarse[:, None], fine], axis=1)

    def level_vectors(level: int, used: np.ndarray) -> np.ndarray:
        if level == 0:
            return centroids[used]
        if opts.fine_quantizer == "residual_kmeans":
            return codebooks[level - 1][used]
        return fine_means[level - 1]

    codes, units, vectors = _pack_levels(
        local, lambda level, code: f"<c_{code}>" if level == 0 else f"<f{level}_{code}>", level_vectors
    )
    codes, units, num_suffixes = _append_uniqueness(codes, units)
    vectors = np.concatenate([vectors, np.full((num_suffixes, vectors.shape[1]), np.nan, dtype=np.float32)])
    return codes, units, np.zeros(len(units), dtype=bool), vectors


_BUILDERS: dict[str, tuple[type, Callable]] = {
    "numeric": (NumericOptions, _build_numeric),
    "string": (StringOptions, _build_string),
    "semantic": (SemanticOptions, _build_semantic),
    "structured": (StructuredOptions, _build_structured),
    "atomic": (AtomicOptions, _build_atomic),
    "coarse_fine": (CoarseFineOptions, _build_coarse_fine),
}
ID_TYPES = tuple(_BUILDERS)
OPTIONS_CLASSES = {id_type: spec[0] for id_type, spec in _BUILDERS.items()}


# ----------------------------------------------------------------------------- input checks


def _check_keys(keys: Sequence[str]) -> tuple[str, ...]:
    if isinstance(keys, (str, bytes)) or not hasattr(keys, "__iter__"):
        raise ValueError(f"keys must be a sequence of strings, got {type(keys).__name__}")
    keys = tuple(keys)
    if not keys:
        raise ValueError("keys is empty: an identifier table needs at least one image key")
    first_row: dict[str, int] = {}
    for row, key in enumerate(keys):
        if not isinstance(key, str):
            raise ValueError(f"key at row {row} must be a string, got {type(key).__name__} {key!r}")
        if not key.strip():
            raise ValueError(f"key at row {row} is empty")
        if key in first_row:
            raise ValueError(f"duplicate key {key!r} at rows {first_row[key]} and {row}")
        first_row[key] = row
    return keys


def _first_captions(captions: Sequence[str | Sequence[str]], keys: tuple[str, ...]) -> list[str]:
    if isinstance(captions, str) or len(captions) != len(keys):
        count = "a single string" if isinstance(captions, str) else f"{len(captions)} entries"
        raise ValueError(f"captions must hold one entry per key ({len(keys)}), got {count}")
    first = []
    for row, entry in enumerate(captions):
        if not isinstance(entry, str):
            entry = list(entry) if isinstance(entry, Sequence) else entry
            if not isinstance(entry, list) or not entry:
                raise ValueError(f"captions of row {row} (key {keys[row]!r}) must be a string or a non-empty list of strings")
            entry = entry[0]
        if not isinstance(entry, str) or not entry.strip():
            raise ValueError(f"first caption of row {row} (key {keys[row]!r}) is empty or not a string: {entry!r}")
        first.append(entry)
    return first


# ----------------------------------------------------------------------------- entry point


def build_identifiers(
    keys: Sequence[str],
    id_type: str,
    embeddings: Any = None,
    captions: Sequence[str | Sequence[str]] | None = None,
    seed: int = 0,
    **options: Any,
) -> IdentifierTable:
    """Build one unique identifier per key.

    Args:
        keys: the image keys, unique non-empty strings; row ``i`` of the table names ``keys[i]``.
        id_type: one of ``numeric``, ``string``, ``semantic``, ``structured``, ``atomic``, ``coarse_fine``.
        embeddings: the image features, (N, D) numbers, finite; required by ``structured`` and ``coarse_fine``.
            An array-like or CPU tensor; a memory-mapped array (``np.load(path, mmap_mode="r")``,
            ``np.memmap``); the path of a ``.npy`` or ``.safetensors`` file (memory-mapped); or an iterator of
            (b, D) batches (written once to a temporary file). Files and iterators are read in blocks of
            65,536 rows: the build holds a bounded sample and one block, never the whole matrix.
        captions: per key a caption or a list of captions (the first is used); required by ``semantic``.
        seed: seeds every random choice (shuffles, k-means, RQ-VAE); 0 <= seed < 2**31.
        **options: the fields of the id_type's options class (:data:`OPTIONS_CLASSES`).
    """
    if id_type not in _BUILDERS:
        raise ValueError(f"unknown id_type {id_type!r}; expected one of {', '.join(ID_TYPES)}")
    options_class, builder = _BUILDERS[id_type]
    valid = [spec.name for spec in fields(options_class)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option {unknown[0]!r} for id_type {id_type!r}; valid options: {', '.join(valid) or '(none)'}"
        )
    opts = options_class(**options)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an integer in [0, 2**31), got {seed!r}")
    seed = int(seed)
    keys = _check_keys(keys)
    if embeddings is None and id_type in ("structured", "coarse_fine"):
        raise ValueError(f"id_type {id_type!r} needs embeddings: a float array of shape ({len(keys)}, D)")
    if captions is not None:
        captions = _first_captions(captions, keys)
    elif id_type == "semantic":
        raise ValueError("id_type 'semantic' needs captions: one caption (or list of captions) per key")
    if "text_tokenizer" in valid and opts.text_tokenizer is None:
        raise ValueError(f"id_type {id_type!r} needs the option text_tokenizer= (a transformers or tokenizers tokenizer)")
    with contextlib.ExitStack() as stack:
        if embeddings is not None:  # checked here for every id_type, before anything is built
            embeddings = stack.enter_context(open_features(embeddings, keys))
        codes, units, unit_is_text, unit_vectors = builder(opts, seed, keys, embeddings, captions)
    return IdentifierTable(
        keys=keys,
        codes=codes,
        units=units,
        unit_is_text=unit_is_text,
        id_type=id_type,
        options={**opts.to_json(), "seed": seed},
        unit_vectors=unit_vectors,
    )
