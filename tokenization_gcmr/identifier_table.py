"""The identifier table: one unique token sequence per image key, and its on-disk format.

On disk a table is two files in one folder: ``identifier_table.safetensors`` (the integer codes, the
text-unit flags and the optional unit vectors) and ``identifier_table.json`` (format version, id_type,
options, keys, units and a content hash). Loading checks the version and the hash, so a truncated or
mixed-up pair of files fails loudly instead of answering with the wrong images.

A table that was edited after it was built (images added or removed, `identifier_edits.py`) also carries the
`removed` mask (its rows stay: the model's vectors and the trie's edges keep their numbers) and its
`edit_signature`; it is written as format 2, which older readers refuse instead of answering with removed images.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from safetensors.numpy import load_file, save_file

FORMAT_VERSION = 1
# Tables with edits (a removed mask and an edit signature); unedited tables are still written as format 1.
EDITED_FORMAT_VERSION = 2
READABLE_VERSIONS = (FORMAT_VERSION, EDITED_FORMAT_VERSION)
TABLE_WEIGHTS_NAME = "identifier_table.safetensors"
TABLE_HEADER_NAME = "identifier_table.json"


class IdentifierTableError(ValueError):
    """A table that is inconsistent, or a table file that is missing, truncated or from elsewhere."""


# -- the tokenization side's one atomic-write helper ----------------------------------------------------------------
# The modeling side has its own in modeling_gcmr/atomic_write_gcmr.py: a checkpoint's two packages never share a file.
# Same rules: temporary name then rename, the umask's permissions (tempfile makes 0600 files and 0700 folders), files
# flushed before they are renamed, and staging folders named `.gcmr-staging-<pid>-<8 hex>` so that the next save
# removes exactly those of saves that were killed.
_STAGING = re.compile(r"^\.gcmr-staging-(?P<pid>[0-9]+)-[0-9a-f]{8}$")


def _umask() -> int:
    # /proc first: os.umask(x) to read it would briefly change it for every other thread.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _finish(path: str, directory: bool = False) -> None:
    """Give a new file or folder the umask's permissions and flush it to disk."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())
    _fsync(path)


def _fsync(path: str) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_save_to(path: str, save: Callable[[str], Any]) -> None:
    """Call ``save(temporary_path)`` next to ``path``, then rename the finished file into place."""
    folder, name = os.path.split(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
    os.close(descriptor)
    try:
        save(temporary)
        _finish(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""

    def save(temporary: str) -> None:
        with open(temporary, "wb") as handle:
            handle.write(data)

    atomic_save_to(path, save)


def _is_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _move_order(name: str) -> tuple[int, str]:
    # Code, then the table's tensors before its header (as IdentifierTable.save writes them), the config last.
    if name.endswith(".py"):
        return 0, name
    if name.endswith(".safetensors"):
        return 1, name
    return (3 if name.endswith("config.json") else 2), name


def save_staged(directory: str, save: Callable[[str], Any]) -> Any:
    """Run ``save(staging)`` in a staging folder inside ``directory``, then move each finished file in.

    No file of ``directory`` is ever 0 bytes or truncated. The tokenizer's config goes in last (after the code and
    the identifier table, whose header follows its tensors). Returns what ``save`` returned.
    """
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        match = _STAGING.match(name)
        if match and not _is_running(int(match["pid"])):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    staging = os.path.join(directory, f".gcmr-staging-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(staging)
    try:
        result = save(staging)
        names = sorted(os.listdir(staging), key=_move_order)
        for name in names:
            _finish(os.path.join(staging, name), os.path.isdir(os.path.join(staging, name)))
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
        _fsync(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


@dataclass(frozen=True, eq=False)
class IdentifierTable:
    """Identifiers of a corpus: row ``i`` of ``codes`` indexes ``units`` and names ``keys[i]``.

    ``codes`` is int32 (N, L), right-padded with -1. ``unit_is_text[u]`` tells whether unit ``u`` is a
    piece of the text tokenizer's vocabulary (string and semantic identifiers) or a new identifier
    token to add to the vocabulary. ``unit_vectors`` optionally holds a vector per unit (a centroid or
    a codebook entry, NaN where none) to initialise identifier-token embeddings.
    """

    keys: tuple[str, ...]
    codes: np.ndarray
    units: tuple[str, ...]
    unit_is_text: np.ndarray
    id_type: str
    options: dict[str, Any] = field(default_factory=dict)
    unit_vectors: np.ndarray | None = None
    removed: np.ndarray | None = None
    edit_signature: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(self.keys))
        object.__setattr__(self, "units", tuple(self.units))
        object.__setattr__(self, "codes", np.ascontiguousarray(self.codes, dtype=np.int32))
        object.__setattr__(self, "unit_is_text", np.ascontiguousarray(self.unit_is_text, dtype=bool))
        if self.unit_vectors is not None:
            object.__setattr__(self, "unit_vectors", np.ascontiguousarray(self.unit_vectors, dtype=np.float32))
        if self.removed is not None:
            object.__setattr__(self, "removed", np.ascontiguousarray(self.removed, dtype=bool))
        self.validate()

    @classmethod
    def edited(cls, **fields: Any) -> "IdentifierTable":
        """A table made by an edit whose new rows the caller has already checked (`identifier_edits.py`).

        A full `validate` sorts every row (seconds at a million identifiers); an edit checks only what it changes.
        """
        table = object.__new__(cls)
        for name, value in fields.items():
            object.__setattr__(table, name, value)
        return table

    @property
    def is_edited(self) -> bool:
        return self.removed is not None or self.edit_signature is not None

    def live_mask(self) -> np.ndarray:
        """True for the rows whose image is in the collection."""
        return np.ones(len(self.keys), dtype=bool) if self.removed is None else ~self.removed

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def max_length(self) -> int:
        """The longest identifier, in tokens (EOS not counted)."""
        return int(self.codes.shape[1])

    def lengths(self) -> np.ndarray:
        """Tokens per identifier (padding not counted)."""
        return (self.codes >= 0).sum(axis=1)

    def validate(self) -> None:
        """Raise IdentifierTableError naming the first inconsistency found."""
        codes = self.codes
        if codes.ndim != 2:
            raise IdentifierTableError(f"codes must be 2-D (N, L), got shape {codes.shape}")
        if codes.shape[0] != len(self.keys):
            raise IdentifierTableError(f"{codes.shape[0]} code rows for {len(self.keys)} keys")
        if not all(isinstance(key, str) for key in self.keys):
            raise IdentifierTableError("keys must be strings")
        if len(set(self.keys)) != len(self.keys):
            seen: set[str] = set()
            duplicate = next(key for key in self.keys if key in seen or seen.add(key))
            raise IdentifierTableError(f"keys are not unique: {duplicate!r} appears more than once")
        if len(set(self.units)) != len(self.units):
            raise IdentifierTableError("units are not unique")
        if self.unit_is_text.shape != (len(self.units),):
            raise IdentifierTableError(f"unit_is_text has shape {self.unit_is_text.shape}, expected ({len(self.units)},)")
        if codes.size and (codes.max() >= len(self.units) or codes.min() < -1):
            raise IdentifierTableError(f"codes must lie in [-1, {len(self.units)}), found [{codes.min()}, {codes.max()}]")
        valid = codes >= 0
        if codes.shape[0] and (codes.shape[1] == 0 or not valid[:, 0].all()):
            raise IdentifierTableError("every identifier needs at least one token")
        # Right padding only: once a row is padded, it stays padded.
        if codes.shape[1] > 1 and (valid[:, 1:] & ~valid[:, :-1]).any():
            raise IdentifierTableError("codes must be right-padded with -1")
        if self.unit_vectors is not None and (self.unit_vectors.ndim != 2 or self.unit_vectors.shape[0] != len(self.units)):
            raise IdentifierTableError(
                f"unit_vectors has shape {self.unit_vectors.shape}, expected ({len(self.units)}, D)"
            )
        if self.removed is not None and self.removed.shape != (codes.shape[0],):
            raise IdentifierTableError(f"removed has shape {self.removed.shape}, expected ({codes.shape[0]},)")
        if codes.shape[0] > 1:
            distinct, first_row = np.unique(codes, axis=0, return_index=True)
            if len(distinct) != codes.shape[0]:
                row = int(np.setdiff1d(np.arange(codes.shape[0]), first_row)[0])
                raise IdentifierTableError(f"identifiers are not unique: row {row} ({self.keys[row]!r}) repeats an earlier row")

    @property
    def content_hash(self) -> str:
        """sha256 over every field; two tables with the same hash decode to the same images."""
        digest = hashlib.sha256()
        digest.update(self.id_type.encode())
        digest.update(json.dumps(self.options, sort_keys=True).encode())
        digest.update(json.dumps(list(self.keys)).encode())
        digest.update(json.dumps(list(self.units)).encode())
        digest.update(str(self.codes.shape).encode())
        digest.update(self.codes.tobytes())
        digest.update(self.unit_is_text.tobytes())
        if self.unit_vectors is not None:
            digest.update(str(self.unit_vectors.shape).encode())
            digest.update(self.unit_vectors.tobytes())
        if self.is_edited:  # an unedited table hashes exactly as before edits existed
            digest.update(b"removed" + (b"" if self.removed is None else self.removed.tobytes()))
            digest.update(str(self.edit_signature).encode())
        return digest.hexdigest()

    def save(self, directory: str) -> None:
        """Write both files atomically (temporary name, then rename); the header goes last."""
        os.makedirs(directory, exist_ok=True)
        tensors = {"codes": self.codes, "unit_is_text": self.unit_is_text.astype(np.uint8)}
        if self.unit_vectors is not None:
            tensors["unit_vectors"] = self.unit_vectors
        version = EDITED_FORMAT_VERSION if self.is_edited else FORMAT_VERSION
        if self.removed is not None:
            tensors["removed"] = self.removed.astype(np.uint8)
        header = {
            "format_version": version,
            "id_type": self.id_type,
            "options": self.options,
            "num_identifiers": len(self.keys),
            "content_hash": self.content_hash,
            "keys": list(self.keys),
            "units": list(self.units),
        }
        if self.is_edited:
            header["edit_signature"] = self.edit_signature
        metadata = {"format_version": str(version), "content_hash": header["content_hash"]}
        atomic_save_to(
            os.path.join(directory, TABLE_WEIGHTS_NAME), lambda path: save_file(tensors, path, metadata=metadata)
        )
        atomic_write_bytes(os.path.join(directory, TABLE_HEADER_NAME), json.dumps(header).encode())

    @classmethod
    def load(cls, directory: str) -> "IdentifierTable":
        """Load and verify a table; errors name the file and what is wrong with it."""
        header_path = os.path.join(directory, TABLE_HEADER_NAME)
        weights_path = os.path.join(directory, TABLE_WEIGHTS_NAME)
        return cls.from_files(header_path, weights_path)

    @classmethod
    def from_files(cls, header_path: str, weights_path: str) -> "IdentifierTable":
        for path in (header_path, weights_path):
            if not path or not os.path.isfile(path):
                raise IdentifierTableError(f"identifier table file is missing: {path}")
        try:
            with open(header_path, encoding="utf-8") as handle:
                header = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise IdentifierTableError(f"{header_path} is not valid JSON (truncated?): {err}") from err
        if not isinstance(header, dict):
            raise IdentifierTableError(f"{header_path} must hold a JSON object, got {type(header).__name__}")
        version = header.get("format_version")
        if version not in READABLE_VERSIONS:
            raise IdentifierTableError(
                f"{header_path} has format_version {version!r}; this version of gcmr reads {READABLE_VERSIONS}"
            )
        if (version == EDITED_FORMAT_VERSION) != ("edit_signature" in header):
            raise IdentifierTableError(f"{header_path}: format_version 2 is for edited tables (with edit_signature), "
                                       f"format_version 1 for the others; this header has version {version} "
                                       f"{'without' if version == EDITED_FORMAT_VERSION else 'with'} one")
        for name in ("id_type", "options", "keys", "units", "content_hash"):
            if name not in header:
                raise IdentifierTableError(f"{header_path} lacks the field {name!r}")
        try:
            tensors = load_file(weights_path)
        except Exception as err:  # safetensors raises several types for a damaged file
            raise IdentifierTableError(f"{weights_path} cannot be read (truncated or not safetensors): {err}") from err
        for name in ("codes", "unit_is_text"):
            if name not in tensors:
                raise IdentifierTableError(f"{weights_path} lacks the tensor {name!r}")
        try:
            table = cls(
                keys=header["keys"],
                codes=tensors["codes"],
                units=header["units"],
                unit_is_text=tensors["unit_is_text"].astype(bool),
                id_type=header["id_type"],
                options=header["options"],
                unit_vectors=tensors.get("unit_vectors"),
                removed=tensors["removed"].astype(bool) if "removed" in tensors else None,
                edit_signature=header.get("edit_signature"),
            )
        except IdentifierTableError as err:
            raise IdentifierTableError(
                f"{weights_path} and {header_path} do not agree ({err}): they come from different saves (an interrupted "
                "save?) or one is damaged; save the tokenizer again (save_retriever(model, tokenizer, folder) for a "
                "checkpoint)"
            ) from err
        if table.content_hash != header["content_hash"]:
            raise IdentifierTableError(
                f"content hash mismatch: {header_path} says {header['content_hash'][:12]}…, the data hashes to "
                f"{table.content_hash[:12]}…; the two files come from different saves (an interrupted save?) or one is "
                "damaged; save the tokenizer again (save_retriever(model, tokenizer, folder) for a checkpoint)"
            )
        return table

    def new_units(self) -> list[str]:
        """The units that are new tokens for the vocabulary, in the order they are added."""
        return [unit for unit, is_text in zip(self.units, self.unit_is_text) if not is_text]


def table_from_sequences(
    keys: Sequence[str], sequences: Sequence[Sequence[int]], units: Sequence[str], **fields: Any
) -> IdentifierTable:
    """Pack ragged code sequences into a right-padded table (a convenience for builders and tests)."""
    width = max((len(seq) for seq in sequences), default=1)
    codes = np.full((len(sequences), width), -1, dtype=np.int32)
    for row, seq in enumerate(sequences):
        codes[row, : len(seq)] = seq
    unit_is_text = fields.pop("unit_is_text", np.zeros(len(units), dtype=bool))
    return IdentifierTable(keys=tuple(keys), codes=codes, units=tuple(units), unit_is_text=unit_is_text, **fields)
