"""A checkpoint folder (model + ImageIdTokenizer) loads with trust_remote_code=True in a process where the gcmr
packages are not importable, and gives exactly the same retrieve() results; mismatched vocabularies fail loudly."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from subprocess_utils import run_without_package
from test_modeling import EMBED_DIM, id_tokenizer, retriever
from transformers import AutoModel

QUERIES = ["a small red circle left of a blue square", "a big green star", "3 tiny pink rings above a cross"]


def _image_queries() -> torch.Tensor:
    return torch.randn(2, EMBED_DIM, generator=torch.Generator().manual_seed(5))


def _results(model, tokenizer) -> dict:
    return {
        "text": model.retrieve(QUERIES, tokenizer, top_k=3, num_beams=4),
        "text_greedy": model.retrieve(QUERIES[:1], tokenizer, top_k=1, num_beams=1),
        "image": model.retrieve(tokenizer=tokenizer, image_embeds=_image_queries(), top_k=2, num_beams=3),
    }


def _as_json(results: dict) -> dict:
    return json.loads(json.dumps(results))


def test_remote_code_checkpoint_gives_the_same_retrieve_results(tmp_path, make_id_tokenizer):
    tokenizer = id_tokenizer(make_id_tokenizer)
    model = retriever(tokenizer, fusion="coarse_to_fine")
    before = _results(model, tokenizer)
    assert all(len(hits) == 3 for hits in before["text"])
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    # nothing is pickled: the folder holds safetensors and JSON next to the code
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in os.listdir(tmp_path))
    image_queries = _image_queries().tolist()

    after = run_without_package(
        f"""
        import json, torch
        from transformers import AutoModel, AutoTokenizer
        folder = {str(tmp_path)!r}
        model = AutoModel.from_pretrained(folder, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        assert not type(model).__module__.startswith("modeling_gcmr"), type(model).__module__
        queries = {QUERIES!r}
        results = {{
            "text": model.retrieve(queries, tokenizer, top_k=3, num_beams=4),
            "text_greedy": model.retrieve(queries[:1], tokenizer, top_k=1, num_beams=1),
            "image": model.retrieve(tokenizer=tokenizer, image_embeds=torch.tensor({image_queries!r}), top_k=2,
                                    num_beams=3),
            "module": type(model).__module__,
        }}
        print(json.dumps(results))
        """,
        cwd=str(tmp_path),
    )
    assert after.pop("module").startswith("transformers_modules")
    # Keys exactly; scores within a tolerance: memory-mapped weights are not 64-byte aligned like fresh ones, so
    # CPU kernels may take another path and differ in the last float digits.
    expected = _as_json(before)
    assert after.keys() == expected.keys()
    for name, rows in expected.items():
        assert [[key for key, _ in hits] for hits in after[name]] == [[key for key, _ in hits] for hits in rows], name
        for got, want in zip(after[name], rows):
            np.testing.assert_allclose([score for _, score in got], [score for _, score in want], rtol=1e-5, atol=1e-4)


def test_mismatched_identifier_vocabulary_is_refused(make_id_tokenizer, text_tokenizer):
    tokenizer = id_tokenizer(make_id_tokenizer)
    model = retriever(tokenizer)
    other = id_tokenizer(make_id_tokenizer, seed=1)  # same size, different identifiers
    assert len(other) == len(tokenizer) and other.identifier_signature != tokenizer.identifier_signature
    with pytest.raises(ValueError, match="identifier vocabulary mismatch"):
        model.retrieve(QUERIES, other)
    bigger = id_tokenizer(make_id_tokenizer, num_keys=40)
    model.config.identifier_signature = None  # a model that never recorded one still checks the size
    with pytest.raises(ValueError, match="tokenizer has 40 identifiers, the model's identifier head 10"):
        model.retrieve(QUERIES, bigger)
    with pytest.raises(ValueError, match="no identifier vocabulary"):
        model.retrieve(QUERIES, text_tokenizer)


def test_retrieve_validates_its_arguments(make_id_tokenizer):
    tokenizer = id_tokenizer(make_id_tokenizer)
    model = retriever(tokenizer)
    with pytest.raises(ValueError, match="exactly one of queries, image_embeds or pixel_values"):
        model.retrieve(QUERIES, tokenizer, image_embeds=_image_queries())
    with pytest.raises(ValueError, match="top_k"):
        model.retrieve(QUERIES, tokenizer, top_k=0)
    with pytest.raises(ValueError, match="batch_size"):
        model.retrieve(QUERIES, tokenizer, batch_size=0)
    with pytest.raises(TypeError, match="item 1 is int"):
        model.retrieve(["a red circle", 3], tokenizer)
    # batching does not change the answers
    # Padding changes matmul shapes, so batched scores may differ in the last float digits only.
    one_by_one = model.retrieve(QUERIES, tokenizer, top_k=2, batch_size=1)
    batched = model.retrieve(QUERIES, tokenizer, top_k=2)
    assert [[key for key, _ in hits] for hits in one_by_one] == [[key for key, _ in hits] for hits in batched]
    for single, together in zip(one_by_one, batched):
        assert [score for _, score in single] == pytest.approx([score for _, score in together], abs=1e-4)


def test_loaded_checkpoint_keeps_the_identifier_signature(tmp_path, make_id_tokenizer):
    tokenizer = id_tokenizer(make_id_tokenizer)
    retriever(tokenizer).save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert loaded.config.identifier_signature == tokenizer.identifier_signature
    assert loaded.config.max_identifier_length == tokenizer.max_identifier_length


def test_retrieve_rejects_blank_queries(make_id_tokenizer):
    tokenizer = id_tokenizer(make_id_tokenizer)
    model = retriever(tokenizer)
    for blank in ("", "   \t"):
        with pytest.raises(ValueError, match="item 1 is"):
            model.retrieve([QUERIES[0], blank], tokenizer)


def test_retrieve_truncates_queries_the_encoder_cannot_take_and_says_so_once(make_id_tokenizer, caplog):
    """The tiny BERT encoder has 32 positions: an unchecked 200-word query would index past them."""
    tokenizer = id_tokenizer(make_id_tokenizer)
    model = retriever(tokenizer, backbone="encoder_decoder")
    long_query = " ".join(["red circle left of a blue square"] * 30)
    with caplog.at_level("WARNING"):
        hits = model.retrieve([long_query, QUERIES[0]], tokenizer, top_k=2, num_beams=2)
        model.retrieve([long_query], tokenizer, top_k=2, num_beams=2)
    warnings = [record for record in caplog.records if "are cut to" in record.getMessage()]
    assert len(warnings) == 1 and "32 tokens" in warnings[0].getMessage()
    assert all(key in tokenizer.keys for query_hits in hits for key, _ in query_hits)
    # what the encoder saw is the query cut to its first 32 tokens
    cut = tokenizer.decode(tokenizer(long_query, truncation=True, max_length=32)["input_ids"], skip_special_tokens=True)
    assert [key for key, _ in model.retrieve([cut], tokenizer, top_k=2, num_beams=2)[0]] == [key for key, _ in hits[0]]
