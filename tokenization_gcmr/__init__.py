"""ImageIdTokenizer, the identifier table and the prefix trie; the identifier builders in `builders/`.

The flat files of this folder are the ones a checkpoint carries (the Hub copies them); `builders/` is the toolkit
that makes identifier tables and never travels. This package imports nothing from `modeling_gcmr`: importing
`modeling_gcmr` registers `ImageIdTokenizer` with AutoTokenizer for the "gcmr" model type.
"""
from .identifier_edits import CollectionEdit, CollectionEditError
from .identifier_table import (
    IdentifierTable,
    IdentifierTableError,
    table_from_sequences,
)
from .prefix_trie import PrefixTrie, PrefixTrieError
from .tokenization_gcmr import ImageIdTokenizer

# The builders pull in faiss and torch: import them on first use only.
_LAZY_EXPORTS = {
    "build_identifiers": "builders.identifiers",
    "train_text_tokenizer": "builders.text_vocabulary",
}


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CollectionEdit",
    "CollectionEditError",
    "IdentifierTable",
    "IdentifierTableError",
    "ImageIdTokenizer",
    "PrefixTrie",
    "PrefixTrieError",
    "table_from_sequences",
    *_LAZY_EXPORTS,
]
