"""The image features that `build_identifiers` reads: in memory, memory-mapped, or streamed as batches.

Everything reaches the builders as a :class:`FeatureMatrix`, read in row blocks of ``ASSIGN_BATCH``, so a
memory-mapped million-row matrix is never loaded whole, and the in-memory and the memory-mapped build run the
same code on the same blocks (hence the same table, bit for bit). An iterator of batches is written once to a
temporary float32 file and then read like a memory-mapped one.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .quantizers import ASSIGN_BATCH

# Squared distances of larger values overflow float32 inside k-means.
MAX_ABS_EMBEDDING = 1e15
_SAFETENSORS_DTYPES = {
    "F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": np.uint16,
    "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64,
    "U8": np.uint8, "U16": np.uint16, "U32": np.uint32, "U64": np.uint64,
}
_MAX_SAFETENSORS_HEADER = 100_000_000


class FeatureMatrix:
    """A read-only (N, D) float32 view of the features, converted block by block as it is read.

    ``x[a:b]`` and ``x[sorted_rows]`` return float32 C-contiguous arrays (possibly views of an in-memory
    float32 input: never write into them); :meth:`blocks` walks the rows in blocks; :meth:`subset` is a lazy
    view on some rows (a node of the structured tree too large to gather at once).
    """

    def __init__(self, array: np.ndarray, source: str, bfloat16: bool = False, rows: np.ndarray | None = None):
        self._array = array
        self._bfloat16 = bfloat16
        self._rows = rows
        self.source = source

    def __len__(self) -> int:
        return len(self._array) if self._rows is None else len(self._rows)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), int(self._array.shape[1])

    def __getitem__(self, index: slice | np.ndarray) -> np.ndarray:
        block = self._array[index] if self._rows is None else self._array[self._rows[index]]
        if self._bfloat16:  # bfloat16 is the top half of a float32
            return (block.astype(np.uint32) << 16).view(np.float32)
        return np.ascontiguousarray(block, dtype=np.float32)

    def blocks(self, batch_size: int = ASSIGN_BATCH) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 block) over all rows, ``batch_size`` rows at a time."""
        for start in range(0, len(self), batch_size):
            yield start, self[start : start + batch_size]

    def subset(self, rows: np.ndarray) -> "FeatureMatrix":
        """A lazy view on ``rows`` (ascending indices of this matrix)."""
        return FeatureMatrix(self._array, self.source, self._bfloat16, rows if self._rows is None else self._rows[rows])

    def check_values(self) -> None:
        """Raise naming the first row that is not finite or too large; one pass, one block in memory."""
        for start, block in self.blocks():
            check_block(block, start, self.source)


def check_block(block: np.ndarray, first_row: int, source: str) -> None:
    """Raise naming the first row of a float32 block that holds NaN/inf or a value beyond MAX_ABS_EMBEDDING."""
    bad = ~np.isfinite(block).all(axis=1)
    if bad.any():
        row = first_row + int(np.flatnonzero(bad)[0])
        raise ValueError(f"embeddings row {row}{source} holds NaN or inf (the first such row)")
    if block.size and max(-float(block.min()), float(block.max())) > MAX_ABS_EMBEDDING:
        row = first_row + int(np.flatnonzero((np.abs(block) > MAX_ABS_EMBEDDING).any(axis=1))[0])
        raise ValueError(
            f"embeddings row {row}{source} holds a value beyond +-{MAX_ABS_EMBEDDING:g}; normalize the embeddings"
        )


def code_means(features: FeatureMatrix, codes: np.ndarray) -> list[np.ndarray]:
    """Per column of ``codes`` (N, L; -1 = none): the mean feature of the rows of each used code, in code order.

    One pass over the features: each block's rows are sorted by code and summed in float64.
    """
    used = [np.unique(column[column >= 0]) for column in codes.T]
    sums = [np.zeros((len(u), features.shape[1]), dtype=np.float64) for u in used]
    for start, block in features.blocks():
        for level, column in enumerate(codes[start : start + len(block)].T):
            keep = np.flatnonzero(column >= 0)
            labels = np.searchsorted(used[level], column[keep])
            order = np.argsort(labels, kind="stable")
            labels = labels[order]
            starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
            if len(keep):
                sums[level][labels[starts]] += np.add.reduceat(block[keep[order]], starts, axis=0, dtype=np.float64)
    counts = [np.bincount(np.searchsorted(u, c[c >= 0]), minlength=len(u)) for u, c in zip(used, codes.T)]
    return [(s / n[:, None]).astype(np.float32) for s, n in zip(sums, counts)]


# ----------------------------------------------------------------------------- opening the input


@contextlib.contextmanager
def open_features(embeddings: Any, keys: tuple[str, ...]) -> Iterator[FeatureMatrix]:
    """The checked features, one row per key, whatever form they came in; an iterator's temporary file is
    removed afterwards."""
    num_keys = len(keys)
    if isinstance(embeddings, (str, os.PathLike)):
        features = _open_file(Path(embeddings), keys)
    elif hasattr(embeddings, "__next__"):  # an iterator of batches (a list of rows stays an array-like)
        with tempfile.TemporaryDirectory(prefix="gcmr-features-") as directory:
            array = _spool(embeddings, num_keys, Path(directory))
            yield FeatureMatrix(array, "")
            del array
        return
    else:
        embeddings = _tensor_to_numpy(embeddings)
        where = f" (file {embeddings.filename})" if isinstance(embeddings, np.memmap) and embeddings.filename else ""
        features = FeatureMatrix(_check_array(np.asarray(embeddings), num_keys, where), where)
    features.check_values()
    yield features


def _tensor_to_numpy(value: Any) -> Any:
    """A torch tensor (any device; bfloat16, which numpy lacks, as float32) as a numpy array; anything else as is."""
    if not hasattr(value, "detach"):
        return value
    value = value.detach().cpu()
    return (value.float() if str(value.dtype) == "torch.bfloat16" else value).numpy()


def _check_array(array: np.ndarray, num_keys: int, where: str) -> np.ndarray:
    if array.dtype.kind not in "fiu":
        raise ValueError(f"embeddings{where} must be numbers, got dtype {array.dtype}")
    if array.ndim != 2 or array.shape[1] < 1:
        raise ValueError(f"embeddings{where} must have shape (num_keys, dim) = ({num_keys}, D), got {array.shape}")
    if array.shape[0] != num_keys:
        raise ValueError(f"embeddings{where} has {array.shape[0]} rows for {num_keys} keys")
    return array


def _open_file(path: Path, keys: tuple[str, ...]) -> FeatureMatrix:
    """A .npy file (np.load with mmap_mode='r') or a safetensors file, memory-mapped, never read whole."""
    where = f" (file {path})"
    if not path.is_file():
        raise ValueError(f"embeddings file {path} does not exist")
    if path.suffix == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as error:  # object arrays, a corrupt header
            raise ValueError(f"embeddings file {path} is not a numeric .npy array: {error}") from error
        return FeatureMatrix(_check_array(array, len(keys), where), where)
    if path.suffix == ".safetensors":
        array, bfloat16 = _map_safetensors(path, keys)
        return FeatureMatrix(_check_array(array, len(keys), where), where, bfloat16)
    raise ValueError(f"embeddings file {path} must be a .npy or a .safetensors file")


def _map_safetensors(path: Path, keys: tuple[str, ...]) -> tuple[np.ndarray, bool]:
    """Memory-map the `embeddings` tensor (or the only tensor) of a safetensors file; check its image keys.

    safetensors is an 8-byte header length, a JSON header and the raw little-endian tensors, so one tensor
    is a plain np.memmap at its offset.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if size < 8 or not 0 < length <= min(_MAX_SAFETENSORS_HEADER, size - 8):
            raise ValueError(f"embeddings file {path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"embeddings file {path} is not a safetensors file: {error}") from error
    if not isinstance(header, dict):
        raise ValueError(f"embeddings file {path} is not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    names = sorted(header)
    name = "embeddings" if "embeddings" in header else names[0] if len(names) == 1 else None
    if name is None:
        raise ValueError(f"embeddings file {path} holds tensors {names}; expected one, or one named 'embeddings'")
    info = header[name]
    try:
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        shape = tuple(int(size) for size in info["shape"])
        begin, end = (int(offset) for offset in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"embeddings file {path}: tensor {name!r} has a malformed header entry {info!r}") from error
    if dtype is None:
        raise ValueError(f"embeddings file {path}: tensor {name!r} has dtype {info['dtype']}; expected numbers")
    if end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize or 8 + length + end > size:
        raise ValueError(f"embeddings file {path}: tensor {name!r} does not fit its shape {shape} (file truncated?)")
    stored_keys = metadata.get("image_keys")
    if stored_keys is not None:
        stored_keys = json.loads(stored_keys)
        if stored_keys != list(keys):
            differ = (i for i, (stored, given) in enumerate(zip(stored_keys, keys)) if stored != given)
            row = next(differ, min(len(stored_keys), len(keys)))
            raise ValueError(
                f"embeddings file {path} lists other image keys than `keys` (first difference at row {row}); "
                "pass the keys in the file's order"
            )
    if not shape or 0 in shape:
        return np.zeros(shape, dtype=dtype), info["dtype"] == "BF16"
    array = np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r", offset=8 + length + begin, shape=shape)
    return array, info["dtype"] == "BF16"


def _spool(batches: Iterator[Any], num_keys: int, directory: Path) -> np.memmap:
    """Check each batch (width, numbers, finite) and append it to a float32 file; memory-map the result."""
    path = directory / "embeddings.f32"
    width, rows = None, 0
    try:
        with open(path, "wb") as handle:
            for number, batch in enumerate(batches):
                batch = np.asarray(_tensor_to_numpy(batch))
                where = f" (batch {number}, from row {rows})"
                if batch.dtype.kind not in "fiu":
                    raise ValueError(f"embeddings{where} must be numbers, got dtype {batch.dtype}")
                if batch.ndim != 2 or batch.shape[1] < 1:
                    raise ValueError(f"embeddings{where} must be a 2-D batch (rows, dim), got shape {batch.shape}")
                if width is None:
                    width = batch.shape[1]
                elif batch.shape[1] != width:
                    raise ValueError(f"embeddings{where} has width {batch.shape[1]}; batch 0 had width {width}")
                if rows + len(batch) > num_keys:
                    raise ValueError(f"embeddings batches hold more than {num_keys} rows (one per key){where}")
                block = np.ascontiguousarray(batch, dtype=np.float32)
                check_block(block, rows, "")
                handle.write(block.tobytes())
                rows += len(block)
    except OSError as error:
        raise OSError(
            f"writing the embeddings batches to {path} failed ({error}); it needs {num_keys} x dim x 4 bytes "
            "free (set TMPDIR to a larger disk)"
        ) from error
    if rows != num_keys:
        raise ValueError(f"embeddings batches hold {rows} rows for {num_keys} keys")
    return np.memmap(path, dtype=np.float32, mode="r", shape=(num_keys, width))


__all__ = ["FeatureMatrix", "check_block", "code_means", "open_features"]
