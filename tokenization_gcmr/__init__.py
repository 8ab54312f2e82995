"""ImageIdTokenizer and the identifier builders.

Importing this package registers ImageIdTokenizer with AutoTokenizer for the "gcmr" model type, so
``AutoTokenizer.from_pretrained(folder)`` loads a saved tokenizer without remote code.
"""
from transformers import AutoTokenizer

from modeling_gcmr.configuration_gcmr import GcmrConfig

from .identifier_builders import build_identifiers
from .identifier_table import IdentifierTable, IdentifierTableError, table_from_sequences
from .prefix_trie import PrefixTrie, PrefixTrieError
from .text_vocabulary import train_text_tokenizer
from .tokenization_gcmr import ImageIdTokenizer

AutoTokenizer.register(GcmrConfig, tokenizer_class=ImageIdTokenizer, exist_ok=True)

__all__ = [
    "IdentifierTable",
    "IdentifierTableError",
    "ImageIdTokenizer",
    "PrefixTrie",
    "PrefixTrieError",
    "build_identifiers",
    "table_from_sequences",
    "train_text_tokenizer",
]
