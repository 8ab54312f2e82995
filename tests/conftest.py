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


def dense_start_retriever(text_tokenizer, keys: list[str], features, id_type: str, **options):
    """A tiny T5 retriever over `features` (N, D): `id_type` identifiers built from them (`options` to the builder),
    the dense-aware start, and the features stored for re-ranking. Returns (model in eval mode, tokenizer)."""
    import torch

    from modeling_gcmr import GcmrConfig, GcmrForRetrieval
    from tokenization_gcmr import ImageIdTokenizer, build_identifiers

    tokenizer = ImageIdTokenizer(text_tokenizer, build_identifiers(keys, id_type, embeddings=features, seed=0,
                                                                   **options))
    torch.manual_seed(0)
    model = GcmrForRetrieval(GcmrConfig(text_config=dict(
        model_type="t5", vocab_size=tokenizer.num_text_tokens, d_model=16, d_ff=32, d_kv=4, num_heads=4,
        num_layers=1), image_embed_dim=features.shape[1]))
    model.set_identifier_vocabulary(tokenizer, init="dense", image_embeds=features)
    model.store_image_features(features)
    return model.eval(), tokenizer

