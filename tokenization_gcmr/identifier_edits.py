"""Collections that grow and shrink: new identifiers for new images, removal of old ones, checked before applied.

An edit is prepared in full (`prepare_add`, `prepare_remove`), which checks every input and builds the new table,
token rows and trie without touching the tokenizer; `ImageIdTokenizer.apply_edit` then only swaps them in. A failed
call therefore changes nothing, and the model side (`modeling_gcmr/collection_edits_gcmr.py`) applies the same
prepared edit to its own tensors.

New identifiers follow their id type's rules:

- atomic: a new token `<a_i>`;
- numeric / string: the next free number (the row number: rows are never reused, a removed image keeps its row);
- semantic: the text pieces of the image's first caption;
- coarse_fine: the codes of a given neighbour (`neighbors=`: `model.add_images` passes the existing identifier the
  trained model retrieves first for the image, so the new one sits under the prefix the model routes such images
  to), else the nearest coarse centroid, then per fine level the nearest codebook entry (`residual_kmeans`: greedy
  on the residual, as built; `rqvae`: the table keeps each code's mean embedding, not the RQ-VAE, so the code whose
  mean is nearest);
- structured: down the existing tree, at each node the child whose centroid (the model's summed edge vectors,
  which start as the cluster means) is nearest, then a new position in the leaf cluster reached;

and, where the result repeats an existing identifier (or one of the same call), a uniqueness token `<u_j>` as the
builders add. A removal keeps the row (and its edges), marks it removed and kills its trie edges.

Each edit chains the tokenizer's identifier signature (sha256 of the previous one and of the edit), so a model and a
tokenizer from different edits never match; the chain costs O(edit), not O(collection).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .identifier_table import IdentifierTable
from .prefix_trie import PrefixTrie

_STRUCTURED_UNIT = re.compile(r"^<s(\d+)_(\d+)>$")
_COARSE_FINE_UNIT = re.compile(r"^<(?:c_(\d+)|f(\d+)_(\d+))>$")
_UNIQUENESS_UNIT = re.compile(r"<u_(\d+)>")
# Squared distances of larger values overflow float32.
MAX_ABS_FEATURE = 1e15
# Rows scored against the centroids per block (bounded memory at 100k new images).
ASSIGN_BLOCK = 8192


class CollectionEditError(ValueError):
    """An add or remove that cannot be applied; nothing was changed."""


@dataclass(frozen=True)
class CollectionEdit:
    """A checked change of a tokenizer's identifiers, ready to apply (`ImageIdTokenizer.apply_edit`).

    Args:
        kind: "add" or "remove".
        base_signature / signature: the tokenizer's identifier signature before and after.
        table: the identifier table after the edit.
        rows: the rows added, or removed.
        token_rows: (N, L) every identifier's token ids after an add (None for a removal).
        trie: the prefix trie after an add (None for a removal: the trie is edited in place).
        removed_paths: the trie paths of the removed rows (a removal).
        new_units: the new identifier tokens of an add, in vocabulary order.
        unit_ids: the token id of every unit after an add.
        vocab_size: the vocabulary size after the edit.
    """

    kind: str
    base_signature: str
    signature: str
    table: IdentifierTable
    rows: np.ndarray
    token_rows: np.ndarray | None
    trie: PrefixTrie | None
    removed_paths: np.ndarray | None
    new_units: tuple[str, ...]
    unit_ids: np.ndarray | None
    vocab_size: int


# ----------------------------------------------------------------------------------------------------- input checks

def check_keys(keys: Sequence[str], key_to_row: dict[str, int], table: IdentifierTable,
               adding: bool) -> tuple[str, ...]:
    """The keys as a tuple of unique non-empty strings, new (adding) or current (removing)."""
    if isinstance(keys, (str, bytes)) or not hasattr(keys, "__iter__"):
        raise CollectionEditError(f"keys must be a list of image keys (strings), got {type(keys).__name__}")
    keys = tuple(keys)
    if not keys:
        raise CollectionEditError("keys is empty: pass at least one image key")
    seen: dict[str, int] = {}
    removed = table.removed
    for position, key in enumerate(keys):
        if not isinstance(key, str) or not key.strip():
            raise CollectionEditError(f"key at position {position} must be a non-empty string, got {key!r}")
        if key in seen:
            raise CollectionEditError(f"duplicate key {key!r} at positions {seen[key]} and {position} of this call")
        seen[key] = position
        row = key_to_row.get(key)
        is_removed = row is not None and removed is not None and bool(removed[row])
        if adding and row is not None:
            reason = ("was removed from the collection; a removed key cannot be added again (use a new key)"
                      if is_removed else "is already in the collection")
            raise CollectionEditError(f"image key {key!r} {reason}")
        if not adding and row is None:
            raise CollectionEditError(f"image key {key!r} is not in the collection (unknown key)")
        if not adding and is_removed:
            raise CollectionEditError(f"image key {key!r} was already removed")
    return keys


def check_features(features: Any, num_keys: int, name: str = "image_embeds") -> np.ndarray:
    """(num_keys, D) finite float32 features."""
    if hasattr(features, "detach"):
        features = features.detach().cpu().numpy()
    array = np.asarray(features)
    if array.dtype.kind not in "fiu" or array.ndim != 2 or array.shape[0] != num_keys or array.shape[1] < 1:
        raise CollectionEditError(f"{name} must be a float array of shape ({num_keys}, D), one row per key, got "
                                  f"shape {array.shape} and dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    bad = ~np.isfinite(array).all(axis=1) | (np.abs(array) > MAX_ABS_FEATURE).any(axis=1)
    if bad.any():
        raise CollectionEditError(f"{name} row {int(np.flatnonzero(bad)[0])} holds NaN, inf or a value beyond "
                                  f"+-{MAX_ABS_FEATURE:g}")
    return array


def first_captions(captions: Any, keys: tuple[str, ...]) -> list[str]:
    """Each key's first caption (a caption, or a non-empty list of captions, per key)."""
    if captions is None:
        raise CollectionEditError("semantic identifiers are spelled with the image's caption: pass captions=, one "
                                  "caption (or list of captions) per key")
    if isinstance(captions, str) or len(captions) != len(keys):
        raise CollectionEditError(f"captions must hold one entry per key ({len(keys)})")
    first = []
    for key, entry in zip(keys, captions):
        if not isinstance(entry, str) and isinstance(entry, Sequence) and entry:
            entry = entry[0]
        if not isinstance(entry, str) or not entry.strip():
            raise CollectionEditError(f"the first caption of key {key!r} is empty or not a string: {entry!r}")
        first.append(entry)
    return first


# ----------------------------------------------------------------------------------------------------- units
class _Units:
    """The table's units plus the ones an add creates, and their token ids."""

    def __init__(self, table: IdentifierTable, unit_ids: np.ndarray, text_vocab: dict[str, int],
                 num_identifier_tokens: int, num_text: int):
        self.table = table
        self.index = {unit: position for position, unit in enumerate(table.units)}
        self.unit_ids = unit_ids
        self.text_vocab = text_vocab
        self.num_text = num_text
        self.next_token = num_text + num_identifier_tokens
        self.added: list[tuple[str, bool, np.ndarray | None]] = []
        self.added_ids: list[int] = []

    def get(self, unit: str, is_text: bool = False, vector: np.ndarray | None = None) -> int:
        """The unit's index, adding it when it is new."""
        position = self.index.get(unit)
        if position is not None:
            return position
        if is_text:
            if unit not in self.text_vocab:
                raise CollectionEditError(f"text piece {unit!r} is not in the text vocabulary")
            token = self.text_vocab[unit]
        else:
            if unit in self.text_vocab:
                raise CollectionEditError(f"identifier unit {unit!r} is already a text token")
            token, self.next_token = self.next_token, self.next_token + 1
        position = len(self.index)
        self.index[unit] = position
        self.added.append((unit, is_text, vector))
        self.added_ids.append(token)
        return position

    def all_ids(self) -> np.ndarray:
        return np.concatenate([self.unit_ids, np.asarray(self.added_ids, dtype=np.int64)])

    def token_ids(self, codes: np.ndarray) -> np.ndarray:
        ids = self.all_ids()
        return np.where(codes >= 0, ids[np.maximum(codes, 0)], -1)

    def new_identifier_units(self) -> tuple[str, ...]:
        return tuple(unit for unit, is_text, _ in self.added if not is_text)


# ----------------------------------------------------------------------------------------------------- id types
def _atomic(units: _Units, count: int, features: np.ndarray | None, **_: Any) -> list[list[int]]:
    table = units.table
    number = len(table.units)
    rows = []
    for index in range(count):
        while f"<a_{number}>" in units.index:
            number += 1
        vector = None if features is None else features[index]
        rows.append([units.get(f"<a_{number}>", vector=vector)])
    return rows


def _row_numbers(table: IdentifierTable, count: int) -> range:
    # The builders number rows 0..N-1 (shuffled); a new row takes its own row number, never used before.
    return range(len(table.keys), len(table.keys) + count)


def _numeric(units: _Units, count: int, **_: Any) -> list[list[int]]:
    table = units.table
    width = int(table.lengths()[0]) if len(table.keys) else 1
    digits = [units.get(f"<n_{digit}>") for digit in range(10)]
    return [[digits[int(c)] for c in str(number).zfill(width)] for number in _row_numbers(table, count)]


def _pieces(units: _Units, texts: list[str], tokenize: Callable[[str], list[str]]) -> list[list[int]]:
    rows = []
    for text in texts:
        pieces = tokenize(text)
        if not pieces:
            raise CollectionEditError(f"the text {text!r} has no token to spell an identifier with")
        rows.append([units.get(piece, is_text=True) for piece in pieces])
    return rows


def _string(units: _Units, count: int, tokenize: Callable[[str], list[str]], **_: Any) -> list[list[int]]:
    return _pieces(units, [str(number) for number in _row_numbers(units.table, count)], tokenize)


def _semantic(units: _Units, count: int, tokenize: Callable[[str], list[str]], captions: list[str],
              **_: Any) -> list[list[int]]:
    limit = int(units.table.options.get("max_length", 16))
    return [row[:limit] for row in _pieces(units, captions, tokenize)]


def _nearest(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (squared L2) of every point, blockwise."""
    norms = (centroids.astype(np.float64) ** 2).sum(axis=1)
    found = np.empty(len(points), dtype=np.int64)
    for start in range(0, len(points), ASSIGN_BLOCK):
        block = points[start : start + ASSIGN_BLOCK].astype(np.float64)
        found[start : start + ASSIGN_BLOCK] = np.argmin(norms[None, :] - 2.0 * block @ centroids.T, axis=1)
    return found


def _coarse_fine(units: _Units, count: int, features: np.ndarray | None, neighbors: np.ndarray | None = None,
                 **_: Any) -> list[list[int]]:
    table = units.table
    if neighbors is not None:
        return _neighbor_codes(units, features, neighbors)
    if features is None:
        raise CollectionEditError("coarse_fine identifiers are built from image features: pass image_embeds")
    if table.unit_vectors is None or table.unit_vectors.shape[1] != features.shape[1]:
        width = None if table.unit_vectors is None else table.unit_vectors.shape[1]
        raise CollectionEditError(f"image features have width {features.shape[1]}; the coarse_fine table's centroids "
                                  f"and codebooks have width {width}: pass the features the identifiers came from")
    levels: dict[int, list[int]] = {}
    for position, unit in enumerate(table.units):
        match = _COARSE_FINE_UNIT.match(unit)
        if match:
            levels.setdefault(0 if match[1] is not None else int(match[2]), []).append(position)
    greedy = table.options.get("fine_quantizer", "residual_kmeans") == "residual_kmeans"
    codes = np.empty((count, len(levels)), dtype=np.int64)
    residual = features.copy()
    for column, level in enumerate(sorted(levels)):
        candidates = np.asarray(levels[level])
        vectors = table.unit_vectors[candidates]
        # Level 0 and residual_kmeans codebooks quantize the residual; rqvae levels keep each code's mean embedding.
        chosen = candidates[_nearest(residual if (greedy or level == 0) else features, vectors)]
        codes[:, column] = chosen
        residual -= table.unit_vectors[chosen]
    return codes.tolist()


def _neighbor_codes(units: _Units, features: np.ndarray | None, neighbors: np.ndarray) -> list[list[int]]:
    """Each new image takes the codes of the existing identifier `neighbors[i]` (without its uniqueness token), the
    one the trained model ranks first for the image; rows without a neighbor (-1) fall back to the centroids."""
    table = units.table
    neighbors = np.asarray(neighbors, dtype=np.int64)
    if neighbors.shape != (len(features),) or (neighbors >= len(table.keys)).any():
        raise CollectionEditError(f"neighbors must hold one row index (or -1) per new image, got {neighbors.shape}")
    missing = np.flatnonzero(neighbors < 0)
    fallback = dict(zip(missing.tolist(), _coarse_fine(units, len(missing), features[missing]))) if len(missing) else {}
    suffixes = {position for position, unit in enumerate(table.units) if unit.startswith("<u_")}
    rows = []
    for index, row in enumerate(neighbors.tolist()):
        if row < 0:
            rows.append(fallback[index])
            continue
        codes = [int(code) for code in table.codes[row] if code >= 0]
        rows.append(codes[:-1] if codes[-1] in suffixes else codes)
    return rows


def _structured(units: _Units, count: int, features: np.ndarray | None, edge_vectors: np.ndarray | None,
                trie: PrefixTrie, unit_of_token: Callable[[int], str], **_: Any) -> list[list[int]]:
    if features is None or edge_vectors is None:
        raise CollectionEditError("structured identifiers are placed down the model's tree: add images with "
                                  "model.add_images(keys, tokenizer, image_embeds=...) (image features needed)")
    if edge_vectors.shape != (trie.num_edges, features.shape[1]):
        raise CollectionEditError(f"edge vectors of shape {edge_vectors.shape} do not fit the trie "
                                  f"({trie.num_edges} edges) and features of width {features.shape[1]}")
    offsets, tokens, children, eos = trie.offsets, trie.child_tokens, trie.child_nodes, trie.eos_token_id
    taken_positions: dict[int, int] = {}
    rows = []
    for x in features.astype(np.float64):
        node, reached, path = 0, np.zeros_like(x), []
        while True:
            edges = np.arange(offsets[node], offsets[node + 1])
            edges = edges[tokens[edges] != eos]
            inner = children[edges]
            is_leaf_cluster = len(edges) == 0 or all(
                offsets[c + 1] - offsets[c] == 1 and tokens[offsets[c]] == eos for c in inner)
            if is_leaf_cluster:
                level = len(path)
                used = [int(m[2]) for m in (_STRUCTURED_UNIT.match(unit_of_token(int(t))) for t in tokens[edges]) if m]
                position = max(taken_positions.get(node, -1), max(used, default=-1)) + 1
                taken_positions[node] = position
                path.append(units.get(f"<s{level}_{position}>", vector=x.astype(np.float32)))
                break
            best = int(np.argmin(((x - reached - edge_vectors[edges]) ** 2).sum(axis=1)))
            reached = reached + edge_vectors[edges[best]]
            match = _STRUCTURED_UNIT.match(unit_of_token(int(tokens[edges[best]])))
            if match is None:
                raise CollectionEditError("the structured table has a token that is not <s{level}_{code}>")
            path.append(units.index[match[0]])
            node = int(inner[best])
        rows.append(path)
    return rows


RULES: dict[str, Callable[..., list[list[int]]]] = {
    "atomic": _atomic,
    "numeric": _numeric,
    "string": _string,
    "semantic": _semantic,
    "coarse_fine": _coarse_fine,
    "structured": _structured,
}


# ----------------------------------------------------------------------------------------------------- uniqueness
def _unique_rows(rows: list[list[int]], units: _Units, trie: PrefixTrie) -> list[list[int]]:
    """Rows that repeat an identifier (kept or removed) or an earlier row of the call get the first free `<u_j>`."""
    width = max(len(row) for row in rows)
    codes = np.full((len(rows), width), -1, dtype=np.int64)
    for index, row in enumerate(rows):
        codes[index, : len(row)] = row
    existing = trie.lookup(units.token_ids(codes), live_only=False) >= 0
    _, first = np.unique(codes, axis=0, return_index=True)
    repeated = existing.copy()
    repeated[np.setdiff1d(np.arange(len(rows)), first)] = True
    if not repeated.any():
        return rows
    taken = {tuple(rows[i]) for i in np.flatnonzero(~repeated)}
    free = _free_suffixes(rows, np.flatnonzero(repeated), units, trie)
    result = list(rows)
    for index in np.flatnonzero(repeated):
        while True:
            j = next(free[tuple(rows[index])])
            candidate = rows[index] + [units.get(f"<u_{j}>", vector=_nan_vector(units))]
            if tuple(candidate) not in taken:
                break
        taken.add(tuple(candidate))
        result[index] = candidate
    return result


def _free_suffixes(rows: list[list[int]], repeated: np.ndarray, units: _Units,
                   trie: PrefixTrie) -> dict[tuple, Iterator[int]]:
    """Per repeated row's codes, the uniqueness indices j whose `<u_j>` after them is free, ascending.

    One walk to the node of every distinct repeated row and a read of its children: probing j = 0, 1, ... one row
    at a time made an add O(adds x group size), hours for 10,000 images added to a million, and one lookup of every
    (codes, existing `<u_j>`) pair took 0.64 s of such an add. A `<u_j>` that is not a unit yet is free.
    """
    bases = list(dict.fromkeys(tuple(rows[i]) for i in repeated))
    suffixes = {int(match[1]): position for unit, position in units.index.items()
                if (match := _UNIQUENESS_UNIT.fullmatch(unit))}
    count = max(suffixes) + 1 if suffixes else 0
    used = np.zeros((len(bases), count), dtype=bool)
    if count:
        codes = np.full((len(bases), max(len(base) for base in bases)), -1, dtype=np.int64)
        for position, base in enumerate(bases):
            codes[position, : len(base)] = base
        # The trie spells removed identifiers too (live_only=False): their rows stay in the table.
        base_of_child, child_tokens = trie.children(units.token_ids(codes), live_only=False)
        numbers, positions = map(np.asarray, zip(*suffixes.items()))
        tokens = units.token_ids(positions)
        number_of_token = np.full(max(int(tokens.max()), int(child_tokens.max(initial=0))) + 1, -1)
        number_of_token[tokens] = numbers
        numbers_used = number_of_token[child_tokens]
        suffix = numbers_used >= 0
        used[base_of_child[suffix], numbers_used[suffix]] = True
    return {base: itertools.chain(np.flatnonzero(~row).tolist(), itertools.count(count))
            for base, row in zip(bases, used)}


def _nan_vector(units: _Units) -> np.ndarray | None:
    vectors = units.table.unit_vectors
    return None if vectors is None else np.full(vectors.shape[1], np.nan, dtype=np.float32)


# ----------------------------------------------------------------------------------------------------- signatures
def chain_signature(previous: str, kind: str, *parts: bytes) -> str:
    """The identifier signature after an edit: sha256 of the one before and of what the edit changed."""
    digest = hashlib.sha256(f"gcmr-edit\n{previous}\n{kind}\n".encode())
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------- edits
def prepare_add(tokenizer: Any, keys: Sequence[str], features: Any = None, captions: Any = None,
                edge_vectors: np.ndarray | None = None, neighbors: np.ndarray | None = None) -> CollectionEdit:
    """New identifiers for `keys` (see the module docstring); nothing is changed until `apply_edit`.

    `neighbors` (coarse_fine): per new image the row of the existing identifier whose codes it takes (-1: the
    centroids decide), e.g. the one the trained model retrieves first for the image (`model.add_images`)."""
    table = tokenizer.identifier_table
    keys = check_keys(keys, tokenizer._key_to_row, table, adding=True)
    features = None if features is None else check_features(features, len(keys))
    rule = RULES.get(table.id_type)
    if rule is None:
        raise CollectionEditError(f"identifiers of type {table.id_type!r} cannot be added to")
    units = _Units(table, tokenizer._unit_ids, tokenizer._text_vocab, len(tokenizer._new_units), tokenizer._num_text)
    trie = tokenizer.prefix_trie
    if neighbors is not None and (table.id_type != "coarse_fine" or features is None):
        raise CollectionEditError("neighbors= places coarse_fine identifiers and needs the image features")
    rows = rule(units, len(keys), features=features, edge_vectors=edge_vectors, trie=trie, neighbors=neighbors,
                tokenize=tokenizer._tokenize, unit_of_token=tokenizer._convert_id_to_token,
                captions=first_captions(captions, keys) if table.id_type == "semantic" else None)
    rows = _unique_rows(rows, units, trie)

    width = max(table.max_length, max(len(row) for row in rows))
    new_codes = np.full((len(rows), width), -1, dtype=np.int32)
    for index, row in enumerate(rows):
        new_codes[index, : len(row)] = row
    old_codes = table.codes
    if width > old_codes.shape[1]:
        old_codes = np.pad(old_codes, ((0, 0), (0, width - old_codes.shape[1])), constant_values=-1)
    codes = np.concatenate([old_codes, new_codes])
    added_units = [unit for unit, _, _ in units.added]
    unit_vectors = table.unit_vectors
    if unit_vectors is not None and units.added:
        extra = [np.full(unit_vectors.shape[1], np.nan, np.float32) if vector is None else vector
                 for _, _, vector in units.added]
        unit_vectors = np.concatenate([unit_vectors, np.stack(extra).astype(np.float32)])
    removed = np.concatenate([~table.live_mask(), np.zeros(len(keys), dtype=bool)])
    base = tokenizer.identifier_signature
    signature = chain_signature(base, "add", json.dumps(list(keys)).encode(), new_codes.tobytes(),
                                json.dumps(added_units).encode())
    new_table = IdentifierTable.edited(
        keys=table.keys + keys, codes=codes, units=table.units + tuple(added_units),
        unit_is_text=np.concatenate([table.unit_is_text, np.array([t for _, t, _ in units.added], dtype=bool)]),
        id_type=table.id_type, options=table.options, unit_vectors=unit_vectors, removed=removed,
        edit_signature=signature)

    token_dtype = tokenizer.identifier_token_rows.dtype
    new_token_rows = units.token_ids(new_codes).astype(token_dtype)
    old_rows = tokenizer.identifier_token_rows
    if width > old_rows.shape[1]:
        old_rows = np.pad(old_rows, ((0, 0), (0, width - old_rows.shape[1])), constant_values=-1)
    token_rows = np.concatenate([old_rows, new_token_rows])
    vocab_size = len(tokenizer) + len(units.new_identifier_units())
    new_trie = PrefixTrie.from_sequences(token_rows, tokenizer.eos_token_id, vocab_size)
    if removed.any():
        new_trie.remove_identifiers(new_trie.paths(token_rows[removed]))
    return CollectionEdit("add", base, signature, new_table, np.arange(len(table.keys), len(codes)), token_rows,
                          new_trie, None, units.new_identifier_units(), units.all_ids(), vocab_size)


def prepare_remove(tokenizer: Any, keys: Sequence[str]) -> CollectionEdit:
    """Mark `keys` removed: their identifiers leave the trie (edges stay, dead); nothing changes until applied."""
    table = tokenizer.identifier_table
    keys = check_keys(keys, tokenizer._key_to_row, table, adding=False)
    rows = np.fromiter((tokenizer._key_to_row[key] for key in keys), dtype=np.int64, count=len(keys))
    removed = ~table.live_mask()
    removed[rows] = True
    base = tokenizer.identifier_signature
    signature = chain_signature(base, "remove", np.sort(rows).tobytes())
    fields = {name: getattr(table, name) for name in ("keys", "codes", "units", "unit_is_text", "id_type",
                                                      "options", "unit_vectors")}
    new_table = IdentifierTable.edited(**fields, removed=removed, edit_signature=signature)
    paths = tokenizer.prefix_trie.paths(tokenizer.identifier_token_rows[rows])
    return CollectionEdit("remove", base, signature, new_table, rows, None, None, paths, (), None, len(tokenizer))


__all__ = ["CollectionEdit", "CollectionEditError", "chain_signature", "prepare_add", "prepare_remove"]
