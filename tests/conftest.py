"""Test-wide settings: offline, a throw-away HF_HOME, and helpers shared by the test modules.

The environment is set at import time, before transformers or huggingface_hub read it.
"""
import atexit
import os
import shutil
import sys
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="gcmr-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = _HF_HOME
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

sys.path.insert(0, os.path.dirname(__file__))

import random  # noqa: E402

import pytest  # noqa: E402

_COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey", "pink"]
_SHAPES = ["circle", "square", "triangle", "star", "hexagon", "cross", "ring", "diamond"]
_SIZES = ["small", "large", "tiny", "big"]
_RELATIONS = ["left of", "right of", "above", "below", "next to", "inside"]


def synthetic_captions(count: int, seed: int = 0) -> list[str]:
    """Captions like "a small red circle left of a blue square" (some with a count, so digits occur)."""
    rng = random.Random(seed)
    captions = []
    for index in range(count):
        first = f"{rng.choice(_SIZES)} {rng.choice(_COLORS)} {rng.choice(_SHAPES)}"
        second = f"{rng.choice(_COLORS)} {rng.choice(_SHAPES)}"
        if index % 5 == 0:
            captions.append(f"{rng.randint(0, 99)} {first}s {rng.choice(_RELATIONS)} a {second}")
        else:
            captions.append(f"a {first} {rng.choice(_RELATIONS)} a {second}")
    return captions


@pytest.fixture(scope="session")
def caption_corpus() -> list[str]:
    """A few hundred synthetic captions, the same in every test session."""
    return synthetic_captions(400)


@pytest.fixture(scope="session")
def text_tokenizer(caption_corpus):
    """A tiny T5-style WordPiece tokenizer (<pad>=0, </s>=1, <unk>=2) trained on `caption_corpus`."""
    from tokenization_gcmr.builders.text_vocabulary import train_text_tokenizer

    return train_text_tokenizer(caption_corpus, vocab_size=200)


@pytest.fixture
def make_id_tokenizer(text_tokenizer):
    """Factory: ``make_id_tokenizer(table, tokenizer=None) -> ImageIdTokenizer`` (default text vocab: `text_tokenizer`)."""
    from tokenization_gcmr.tokenization_gcmr import ImageIdTokenizer

    def make(table, tokenizer=None):
        return ImageIdTokenizer(tokenizer if tokenizer is not None else text_tokenizer, table)

    return make
