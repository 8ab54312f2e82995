"""A checkpoint saved by the code before format 2 (tests/fixtures/legacy_v1_checkpoint, made by
tests/fixtures/make_legacy_v1_checkpoint.py at commit 5fcf056) still loads and answers as it did then: with this
package, and through remote code when the folder carries today's code files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from subprocess_utils import run_without_package

from modeling_gcmr import GcmrForRetrieval
from tokenization_gcmr import ImageIdTokenizer

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "legacy_v1_checkpoint"


def expected() -> dict:
    return json.loads((FIXTURE / "expected_results.json").read_text())


def assert_same_hits(got, want):
    assert [[key for key, _ in row] for row in got] == [[key for key, _ in row] for row in want]
    for got_row, want_row in zip(got, want):
        np.testing.assert_allclose([s for _, s in got_row], [s for _, s in want_row], rtol=1e-5, atol=1e-4)


def test_format_1_checkpoint_loads_and_answers_as_before():
    model, tokenizer = GcmrForRetrieval.from_pretrained(FIXTURE), ImageIdTokenizer.from_pretrained(FIXTURE)
    assert model.config.format_version == 1 and model.identifier_head is None
    want = expected()
    assert_same_hits(model.retrieve(want["queries"], tokenizer, top_k=3, num_beams=4), want["text"])
    images = torch.tensor(want["image_queries"])
    assert_same_hits(model.retrieve(tokenizer=tokenizer, image_embeds=images, top_k=2, num_beams=3), want["image"])
    with pytest.raises(ValueError, match=r"rerank re-scores .* text head \(format 1\)"):
        model.retrieve(want["queries"], tokenizer, rerank="features")
    with pytest.raises(ValueError, match=r"store_image_features needs the identifier head; .* text head"):
        model.store_image_features(torch.zeros(len(tokenizer.keys), 4))
    assert not model.config.stores_image_features


def test_format_1_checkpoint_loads_through_todays_remote_code(tmp_path):
    folder = tmp_path / "legacy"
    shutil.copytree(FIXTURE, folder)
    for package in ("modeling_gcmr", "tokenization_gcmr"):
        for path in (ROOT / package).glob("*.py"):
            if path.name != "__init__.py":
                shutil.copy(path, folder / path.name)
    want = expected()
    got = run_without_package(
        f"""
        import json, torch
        from transformers import AutoModel, AutoTokenizer
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)
        print(json.dumps({{
            "text": model.retrieve({want["queries"]!r}, tokenizer, top_k=3, num_beams=4),
            "image": model.retrieve(tokenizer=tokenizer, image_embeds=torch.tensor({want["image_queries"]!r}),
                                    top_k=2, num_beams=3),
            "module": type(model).__module__,
        }}))
        """,
        cwd=str(tmp_path),
    )
    assert got["module"].startswith("transformers_modules")
    assert_same_hits(got["text"], want["text"])
    assert_same_hits(got["image"], want["image"])


def test_format_1_config_sizes_are_checked_against_its_weights(tmp_path):
    """The format 1 checkpoint shares the loader: a config.json that builds what its weights do not hold is refused."""
    folder = tmp_path / "legacy"
    shutil.copytree(FIXTURE, folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["num_decoder_layers"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"text_config\.num_decoder_layers mismatch: config\.json .* sets "
                                         r"text_config\.num_decoder_layers = 2, which builds 2 layers in "
                                         r"backbone\.decoder\.block; model\.safetensors holds 1"):
        GcmrForRetrieval.from_pretrained(folder)
