"""ImageIdTokenizer: a text vocabulary for queries plus one token sequence (identifier) per image.

The vocabulary is the text tokenizer's ids ``[0, V_text)`` followed by the identifier table's new
units ``[V_text, V_text + n_new)``. Query text is encoded exactly as the text tokenizer encodes it
(normalizer, pre-tokenizer, model and post-processor all come from its ``tokenizers.Tokenizer``);
identifiers map to token ids through a unit -> id array, and back through the prefix trie.

Copied flat into checkpoints (Hub custom code): it imports its siblings only as ``from .name import X``.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizer

from .identifier_edits import CollectionEdit, CollectionEditError, prepare_add, prepare_remove
from .identifier_table import (
    TABLE_HEADER_NAME,
    TABLE_WEIGHTS_NAME,
    IdentifierTable,
    IdentifierTableError,
    atomic_write_bytes,
    save_staged,
)
from .prefix_trie import PrefixTrie

TEXT_TOKENIZER_FILE = "text_tokenizer.json"
# transformers marks "no limit" with a huge model_max_length (1e30); anything this large is no real limit.
NO_LENGTH_LIMIT = 10**9
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
VOCAB_FILES_NAMES = {
    "text_tokenizer_file": TEXT_TOKENIZER_FILE,
    "identifier_table_file": TABLE_HEADER_NAME,
    "identifier_weights_file": TABLE_WEIGHTS_NAME,
}
_SPECIAL_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Conventional names, used only when a bare tokenizers.Tokenizer (which has no named roles) is passed.
_CONVENTIONAL_SPECIALS = {
    "pad_token": ("<pad>", "[PAD]"),
    "eos_token": ("</s>", "<|endoftext|>"),
    "unk_token": ("<unk>", "[UNK]"),
    "bos_token": ("<s>",),
    "sep_token": ("[SEP]",),
    "cls_token": ("[CLS]",),
    "mask_token": ("[MASK]", "<mask>"),
}


def _copy_backend(text_tokenizer: Any) -> tuple[Tokenizer, dict[str, str]]:
    """A private copy of the text tokenizer's ``tokenizers.Tokenizer`` and its special-token roles."""
    if isinstance(text_tokenizer, Tokenizer):
        backend = Tokenizer.from_str(text_tokenizer.to_str())
        vocab = backend.get_vocab(with_added_tokens=True)
        specials = {
            role: next(name for name in names if name in vocab)
            for role, names in _CONVENTIONAL_SPECIALS.items()
            if any(name in vocab for name in names)
        }
    elif isinstance(getattr(text_tokenizer, "backend_tokenizer", None), Tokenizer):
        backend = Tokenizer.from_str(text_tokenizer.backend_tokenizer.to_str())
        specials = {
            role: str(getattr(text_tokenizer, role))
            for role in _SPECIAL_ATTRIBUTES
            if getattr(text_tokenizer, role, None) is not None
        }
    else:
        raise TypeError(
            "text_tokenizer must be a transformers fast tokenizer (with .backend_tokenizer) or a tokenizers.Tokenizer, "
            f"got {type(text_tokenizer).__name__}"
        )
    # Truncation and padding are applied by transformers on the combined vocabulary, never inside the backend.
    backend.no_truncation()
    backend.no_padding()
    return backend, specials


def _load_backend(path: str | None, folder: str | None) -> Tokenizer:
    # ValueError, not OSError: from_pretrained replaces an OSError's message with a generic one.
    if not path or not os.path.isfile(path):
        raise ValueError(f"text tokenizer file is missing: {path or os.path.join(folder or '.', TEXT_TOKENIZER_FILE)}")
    try:
        return Tokenizer.from_file(path)
    except Exception as err:  # tokenizers raises a bare Exception for unreadable JSON
        raise ValueError(f"{path} is not a readable tokenizers file (truncated?): {err}") from err


def _require_tokenizer_config(folder: str | None) -> None:
    # Without it the special tokens are unknown and the load would fail later with "neither an EOS nor a SEP token".
    if folder and os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, TOKENIZER_CONFIG_FILE)):
        raise ValueError(
            f"{TOKENIZER_CONFIG_FILE} is missing from {folder}: it holds the tokenizer's special tokens (EOS ends every "
            "identifier) and its auto_map. The tokenizer was not saved there completely (an interrupted save?): save "
            "it again, with save_retriever(model, tokenizer, folder) for model and tokenizer together"
        )


def _load_table(header_path: str | None, weights_path: str | None, folder: str | None) -> IdentifierTable:
    base = folder or "."
    return IdentifierTable.from_files(
        header_path or os.path.join(base, TABLE_HEADER_NAME), weights_path or os.path.join(base, TABLE_WEIGHTS_NAME)
    )


def _special_token_templates(backend: Tokenizer) -> dict[bool, list[int | str]]:
    """How the text post-processor wraps one sequence and a pair: e.g. T5 ``["A", 1]``, BERT ``[101, "A", 102]``.

    Probed from the post-processor itself, so any template (T5, BERT, RoBERTa, ...) is reproduced exactly.
    """
    templates = {}
    for pair in (False, True):
        encoding = backend.encode(["a"], ["a"] if pair else None, is_pretokenized=True, add_special_tokens=True)
        template: list[int | str] = []
        for token_id, sequence_id in zip(encoding.ids, encoding.sequence_ids):
            item = token_id if sequence_id is None else "AB"[sequence_id]
            if isinstance(item, int) or not template or template[-1] != item:
                template.append(item)
        templates[pair] = template
    return templates


class ImageIdTokenizer(PreTrainedTokenizer):
    """Tokenizer for generative cross-modal retrieval: query text plus image identifiers in one vocabulary.

    Args:
        text_tokenizer: a transformers fast tokenizer (T5, BERT, or one from ``train_text_tokenizer``) or a
            ``tokenizers.Tokenizer``. Its special tokens become this tokenizer's (EOS falls back to SEP).
        identifier_table: the corpus identifiers (from ``build_identifiers``).
        text_tokenizer_file, identifier_table_file, identifier_weights_file: the saved files, used by
            ``from_pretrained`` instead of the two objects.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        text_tokenizer: Any = None,
        identifier_table: IdentifierTable | None = None,
        text_tokenizer_file: str | None = None,
        identifier_table_file: str | None = None,
        identifier_weights_file: str | None = None,
        **kwargs: Any,
    ) -> None:
        folder = kwargs.get("name_or_path")
        if text_tokenizer is not None:
            backend, specials = _copy_backend(text_tokenizer)
            max_length = getattr(text_tokenizer, "model_max_length", None)
            if isinstance(max_length, int) and max_length < NO_LENGTH_LIMIT:
                kwargs.setdefault("model_max_length", max_length)
        else:
            _require_tokenizer_config(folder)
            backend, specials = _load_backend(text_tokenizer_file, folder), {}
        table = identifier_table if identifier_table is not None else _load_table(
            identifier_table_file, identifier_weights_file, folder
        )
        if not isinstance(table, IdentifierTable):
            raise TypeError(f"identifier_table must be an IdentifierTable, got {type(table).__name__}")
        self._text_backend = backend
        self._table = table
        self._build_vocabulary()
        self._special_templates = _special_token_templates(backend)
        self._trie: PrefixTrie | None = None
        self._signature: str | None = None

        for role, token in specials.items():
            kwargs.setdefault(role, token)
        if kwargs.get("eos_token") is None and kwargs.get("sep_token") is not None:
            kwargs["eos_token"] = kwargs["sep_token"]
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(**kwargs)
        if self.eos_token_id is None:
            raise ValueError("the text tokenizer has neither an EOS nor a SEP token; identifiers need one to end")

    def _build_vocabulary(self) -> None:
        text_vocab = self._text_backend.get_vocab(with_added_tokens=True)
        num_text = len(text_vocab)
        if set(text_vocab.values()) != set(range(num_text)):
            raise ValueError(f"the text vocabulary's ids are not contiguous 0..{num_text - 1}")
        self._text_vocab = text_vocab
        self._text_tokens = [""] * num_text
        for token, index in text_vocab.items():
            self._text_tokens[index] = token
        units, is_text = self._table.units, self._table.unit_is_text
        unit_ids = np.empty(len(units), dtype=np.int64)
        new_units: list[str] = []
        for index, (unit, text) in enumerate(zip(units, is_text)):
            if text:
                if unit not in text_vocab:
                    raise IdentifierTableError(
                        f"identifier table built with a different text tokenizer: unit {unit!r} missing from the text vocabulary"
                    )
                unit_ids[index] = text_vocab[unit]
            else:
                if unit in text_vocab:
                    raise IdentifierTableError(
                        f"identifier unit {unit!r} is already a token of the text vocabulary; mark it as a text unit or rename it"
                    )
                unit_ids[index] = num_text + len(new_units)
                new_units.append(unit)
        self._num_text = num_text
        self._unit_ids = unit_ids
        self._new_units = new_units
        self._unit_to_id = {unit: num_text + rank for rank, unit in enumerate(new_units)}
        codes = self._table.codes
        # (N, L) token ids, -1 padded: identifier_ids is one row slice, the trie builds from it directly.
        self._token_rows = np.where(codes >= 0, unit_ids[np.maximum(codes, 0)], -1).astype(
            np.int32 if self.vocab_size <= np.iinfo(np.int32).max else np.int64
        )
        self._lengths = self._table.lengths().tolist()
        self._key_to_row = {key: row for row, key in enumerate(self._table.keys)}

    # --- vocabulary (the python-backend contract) -------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._num_text + len(self._new_units)

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self._text_vocab)
        vocab.update(self._unit_to_id)
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self._text_backend.encode(text, add_special_tokens=False).tokens

    def _convert_token_to_id(self, token: str) -> int:
        index = self._text_vocab.get(token)
        if index is None:
            index = self._unit_to_id.get(token, self.unk_token_id)
        return index

    def _convert_id_to_token(self, index: int) -> str:
        if 0 <= index < self._num_text:
            return self._text_tokens[index]
        if self._num_text <= index < self.vocab_size:
            return self._new_units[index - self._num_text]
        raise IndexError(f"token id {index} is outside the vocabulary [0, {len(self)})")

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Text runs go through the text tokenizer's decoder; identifier tokens stay as they are."""
        parts: list[str] = []
        run: list[str] = []
        decoder = self._text_backend.decoder
        for token in tokens + [None]:
            if token is not None and token in self._text_vocab:
                run.append(token)
                continue
            if run:
                parts.append(decoder.decode(run) if decoder is not None else " ".join(run))
                run = []
            if token is not None:
                parts.append(token)
        return " ".join(part for part in parts if part)

    def _with_template(self, token_ids_0: list, token_ids_1: list | None, special: Any, sequence: Any) -> list:
        out: list = []
        for item in self._special_templates[token_ids_1 is not None]:
            if item == "A":
                out.extend(sequence(token_ids_0))
            elif item == "B":
                out.extend(sequence(token_ids_1))
            else:
                out.append(special(item))
        return out

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        return self._with_template(token_ids_0, token_ids_1, lambda item: item, lambda ids: ids)

    def get_special_tokens_mask(
        self, token_ids_0: list, token_ids_1: list | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            special_ids = set(self.all_special_ids)
            return [int(token in special_ids) for token in token_ids_0 + (token_ids_1 or [])]
        return self._with_template(token_ids_0, token_ids_1, lambda item: 1, lambda ids: [0] * len(ids))

    # --- identifiers ------------------------------------------------------------------------------

    @property
    def identifier_table(self) -> IdentifierTable:
        return self._table

    @property
    def keys(self) -> tuple[str, ...]:
        return self._table.keys

    @property
    def num_text_tokens(self) -> int:
        return self._num_text

    @property
    def identifier_token_ids(self) -> np.ndarray:
        """Ids of the new identifier tokens (a contiguous range after the text vocabulary)."""
        return np.arange(self._num_text, self.vocab_size, dtype=np.int64)

    @property
    def max_identifier_length(self) -> int:
        return self._table.max_length

    @property
    def identifier_token_rows(self) -> np.ndarray:
        """(N, L) token ids of every identifier, right-padded with -1 (row i is key i)."""
        return self._token_rows

    @property
    def prefix_trie(self) -> PrefixTrie:
        """The identifiers (each followed by EOS) as a CSR prefix trie; built on first use. Removed images'
        identifiers keep their edges (the edge numbers stay) but are dead: they can never be generated."""
        if self._trie is None:
            trie = PrefixTrie.from_sequences(self.identifier_token_rows, self.eos_token_id, len(self))
            removed = ~self._table.live_mask()
            if removed.any():
                trie.remove_identifiers(trie.paths(self.identifier_token_rows[removed]))
            trie.identifier_signature = self.identifier_signature  # apply_edit keeps it current
            self._trie = trie
        return self._trie

    @property
    def removed_keys(self) -> tuple[str, ...]:
        """Keys of the images removed from the collection (their rows stay in the table, never generated)."""
        removed = self._table.removed
        return () if removed is None else tuple(self._table.keys[row] for row in np.flatnonzero(removed))

    @property
    def current_keys(self) -> tuple[str, ...]:
        """The keys of the collection now: `keys` without the removed ones."""
        if self._table.removed is None:
            return self._table.keys
        return tuple(key for key, live in zip(self._table.keys, self._table.live_mask()) if live)

    # --- collection edits (identifier_edits.py; model.add_images / remove_images edit model and tokenizer together)
    def prepare_add(self, keys: Sequence[str], image_embeds: Any = None, captions: Any = None,
                    edge_vectors: np.ndarray | None = None, neighbors: np.ndarray | None = None) -> CollectionEdit:
        """The tokenizer half of `model.add_images` (use that): new identifiers for `keys`, nothing changed until
        `apply_edit`. Takes what the id type needs (see `identifier_edits.prepare_add`)."""
        return prepare_add(self, keys, image_embeds, captions, edge_vectors, neighbors)

    def prepare_remove(self, keys: Sequence[str]) -> CollectionEdit:
        """Check a removal of `keys`, without changing anything; `apply_edit` makes it so."""
        return prepare_remove(self, keys)

    def apply_edit(self, edit: CollectionEdit) -> None:
        """Swap in a prepared edit (nothing here can fail half-way: every check ran in `prepare_*`)."""
        if edit.base_signature != self.identifier_signature:
            raise CollectionEditError("this edit was prepared for another state of the tokenizer (signature "
                                      f"{edit.base_signature[:12]}..., now {self.identifier_signature[:12]}...)")
        if edit.kind == "add":
            first = len(self._table.keys)
            self._lengths.extend((edit.token_rows[first:] >= 0).sum(axis=1).tolist())
            self._key_to_row.update((key, first + index) for index, key in enumerate(edit.table.keys[first:]))
            self._unit_to_id.update((unit, self._num_text + len(self._new_units) + rank)
                                    for rank, unit in enumerate(edit.new_units))
            self._new_units.extend(edit.new_units)
            self._unit_ids = edit.unit_ids
            self._token_rows = edit.token_rows
            self._trie = edit.trie
            self._table = edit.table
            self._update_total_vocab_size()
        else:
            self._table = edit.table
            if self._trie is not None:
                self._trie.remove_identifiers(edit.removed_paths)
        self._signature = edit.signature
        if self._trie is not None:  # a processor may hold this very trie
            self._trie.identifier_signature = edit.signature

    @property
    def identifier_signature(self) -> str:
        """sha256 of the identifier table and the text vocabulary: a model trained on other ids won't match.

        After an edit (images added or removed) the signature chains the edits instead (`identifier_edits.py`).
        """
        if self._signature is None and self._table.edit_signature is not None:
            self._signature = self._table.edit_signature
        if self._signature is None:
            digest = hashlib.sha256(self._table.content_hash.encode())
            digest.update(json.dumps(self._text_tokens, ensure_ascii=False).encode())
            self._signature = digest.hexdigest()
        return self._signature

    def identifier_ids(self, key: str) -> list[int]:
        """Token ids of the identifier of image ``key`` (no EOS)."""
        row = self._key_to_row.get(key)
        if row is None:
            raise KeyError(f"no identifier for image key {key!r} in this tokenizer's table")
        if self._table.removed is not None and self._table.removed[row]:
            raise KeyError(f"image key {key!r} was removed from the collection")
        return self._token_rows[row, : self._lengths[row]].tolist()

    def encode_identifiers(self, keys: Iterable[str]) -> list[list[int]]:
        """Training labels: each key's identifier ids followed by EOS."""
        eos = self.eos_token_id
        return [self.identifier_ids(key) + [eos] for key in keys]

    def keys_for(self, sequences: Sequence[Sequence[int]] | np.ndarray | Any) -> list[str | None]:
        """``key_for`` for a batch (list of lists, or an array / tensor of shape (B, L)); vectorised."""
        if hasattr(sequences, "detach"):
            sequences = sequences.detach().cpu().numpy()
        if isinstance(sequences, np.ndarray):
            rows = sequences.astype(np.int64, copy=False)
            if rows.ndim != 2:
                raise ValueError(f"expected a (batch, length) array of token ids, got shape {rows.shape}")
        else:
            sequences = [list(seq) for seq in sequences]
            rows = np.full((len(sequences), max((len(s) for s in sequences), default=0)), -1, dtype=np.int64)
            for index, seq in enumerate(sequences):
                rows[index, : len(seq)] = seq
        indices = self.prefix_trie.lookup(self._strip_decoration(rows))
        keys = self._table.keys
        return [keys[index] if index >= 0 else None for index in indices.tolist()]

    def key_for(self, token_ids: Sequence[int] | np.ndarray | Any) -> str | None:
        """The image key whose identifier ``token_ids`` spell, or None.

        Tolerates one leading pad / decoder-start token, a trailing EOS and padding after it.
        """
        if hasattr(token_ids, "detach"):
            token_ids = token_ids.detach().cpu().numpy()
        return self.keys_for(np.asarray(token_ids, dtype=np.int64).reshape(1, -1))[0]

    def _strip_decoration(self, rows: np.ndarray) -> np.ndarray:
        """Each row reduced to its bare identifier ids, right-padded with -1; a row that cannot be one becomes all -1.

        Negative values (-1, the -100 of labels) count as padding like the pad token.
        """
        rows = rows.copy()
        pad, eos = self.pad_token_id, self.eos_token_id
        if rows.size == 0:
            return rows
        if pad is not None:
            leading = rows[:, 0] == pad
            rows[leading, :-1] = rows[leading, 1:]
            rows[leading, -1] = -1
            # Trailing padding: every pad after the last non-pad token.
            is_real = (rows != pad) & (rows >= 0)
            last = rows.shape[1] - 1 - np.argmax(is_real[:, ::-1], axis=1)
            last[~is_real.any(axis=1)] = -1
            rows[np.arange(rows.shape[1])[None, :] > last[:, None]] = -1
        lengths = (rows >= 0).sum(axis=1)
        has_gap = ((rows < 0).cumsum(axis=1) > 0) & (rows >= 0)
        ends_with_eos = (lengths > 0) & (rows[np.arange(len(rows)), np.maximum(lengths - 1, 0)] == eos)
        rows[np.flatnonzero(ends_with_eos), lengths[ends_with_eos] - 1] = -1
        # lookup() stops at the first EOS or padding, so a row with either inside must be emptied here.
        bad = has_gap.any(axis=1) | (rows == eos).any(axis=1) | ((rows >= 0).sum(axis=1) == 0)
        rows[bad] = -1
        return rows

    # --- saving -----------------------------------------------------------------------------------

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        if filename_prefix:
            raise ValueError("ImageIdTokenizer keeps fixed file names; filename_prefix is not supported")
        text_path = os.path.join(save_directory, TEXT_TOKENIZER_FILE)
        atomic_write_bytes(text_path, self._text_backend.to_str().encode("utf-8"))
        self._table.save(save_directory)
        return (
            text_path,
            os.path.join(save_directory, TABLE_HEADER_NAME),
            os.path.join(save_directory, TABLE_WEIGHTS_NAME),
        )

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        legacy_format: bool | None = None,
        filename_prefix: str | None = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> tuple[str, ...]:
        """Save every file atomically: write all into a staging folder, then rename each into place.

        A kill never leaves a 0-byte or truncated file. The code files (this module and its relative imports) are
        copied flat next to them, and ``tokenizer_config.json`` gets an ``auto_map`` so ``trust_remote_code=True``
        loads them. With a model in the same folder, ``save_retriever(model, tokenizer, folder)`` saves both as one
        atomic step; this call alone replaces only the tokenizer's files.
        """
        save_directory = str(save_directory)
        if os.path.isfile(save_directory):
            raise NotADirectoryError(f"{save_directory} is a file; save_pretrained needs a folder")
        staged = save_staged(
            save_directory,
            lambda staging: super(ImageIdTokenizer, self).save_pretrained(
                staging, legacy_format=legacy_format, filename_prefix=filename_prefix
            ),
        )
        # The files are flat: the same names, now in save_directory.
        saved = tuple(os.path.join(save_directory, os.path.basename(str(path))) for path in staged)
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
            self.push_to_hub(repo_id, **kwargs)
        return tuple(path for path in saved if os.path.exists(path))


ImageIdTokenizer.register_for_auto_class("AutoTokenizer")
