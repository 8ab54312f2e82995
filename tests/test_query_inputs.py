"""The query front door (issue 8): every kind of query a user can pass is accepted or refused clearly, queries are
cut to what the encoder takes on every backbone, search limits are capped, and nothing answers confidently for a
query that says nothing."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from transformers import pipeline
from transformers.testing_utils import CaptureLogger

from modeling_gcmr import PIPELINE_TASK, GcmrConfig, GcmrForRetrieval, UnusableQueryWarning, query_inputs_gcmr
from tokenization_gcmr import ImageIdTokenizer, build_identifiers

NUM_KEYS, DIM = 12, 6


@pytest.fixture(scope="module")
def setup(text_tokenizer):
    keys = [f"img{i}" for i in range(NUM_KEYS)]
    features = np.random.default_rng(0).normal(size=(NUM_KEYS, DIM)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    tokenizer = ImageIdTokenizer(text_tokenizer, build_identifiers(keys, "atomic", embeddings=features, seed=0))
    torch.manual_seed(0)
    # T5 has relative positions: no position limit, so the documented default (512 tokens) applies.
    text_config = dict(model_type="t5", vocab_size=tokenizer.num_text_tokens, d_model=16, d_ff=32, d_kv=4,
                       num_heads=4, num_layers=1)
    model = GcmrForRetrieval(GcmrConfig(text_config=text_config, image_embed_dim=DIM, num_beams=4))
    model.set_identifier_vocabulary(tokenizer, image_embeds=features)
    return model.eval(), tokenizer, features


def test_queries_on_t5_are_cut_to_the_default_limit_with_one_warning(setup):
    model, tokenizer, _ = setup
    assert model.config.max_encoder_positions is None and model.config.query_token_limit == 512
    huge = "a red circle left of a blue square " * 3000  # 105,000 characters, ~21,000 tokens
    with CaptureLogger(query_inputs_gcmr.logger) as captured:
        hits = model.retrieve([huge, "a red circle"], tokenizer, top_k=3)
        model.retrieve([huge], tokenizer, top_k=3)
    assert captured.out.count("are cut to 512 tokens") == 1
    ids = query_inputs_gcmr.query_token_ids(tokenizer, [huge], model.config.query_token_limit)[0]
    assert len(ids) == 512
    # what the encoder saw is the query's first 512 tokens
    cut = tokenizer.decode(ids, skip_special_tokens=True)
    assert [k for k, _ in model.retrieve([cut], tokenizer, top_k=3)[0]] == [k for k, _ in hits[0]]


def test_the_query_limit_can_be_set_and_training_uses_the_same_cut(setup):
    from modeling_gcmr.training.examples import build_query_examples

    model, tokenizer, _ = setup
    rows = build_query_examples(["a red circle left of a blue square " * 50], ["img0"], tokenizer, 16)
    assert len(rows[0]["input_ids"]) == 16
    assert len(query_inputs_gcmr.query_token_ids(tokenizer, ["a red circle left of a blue square " * 50], 16)[0]) == 16


@pytest.mark.parametrize("queries", [
    ("a red circle", "a big star"),
    (query for query in ["a red circle", "a big star"]),
    np.array(["a red circle", "a big star"]),
])
def test_lists_tuples_generators_and_string_arrays_are_queries(setup, queries):
    model, tokenizer, _ = setup
    expected = model.retrieve(["a red circle", "a big star"], tokenizer, top_k=2)
    assert model.retrieve(queries, tokenizer, top_k=2) == expected


@pytest.mark.parametrize("queries, error, message", [
    ([b"bytes"], TypeError, "item 0 is bytes"),
    ([np.float32(1.0)], TypeError, "item 0 is float32"),
    (42, TypeError, "got int"),
    ({"q": 1}, TypeError, "got dict"),
    (np.array([["a", "b"]]), ValueError, "must be 1-D"),
    ([], ValueError, "no queries given"),
    (["ok", "  "], ValueError, "item 1 is '  '"),
])
def test_what_is_not_a_query_is_refused_by_position(setup, queries, error, message):
    model, tokenizer, _ = setup
    with pytest.raises(error, match=message):
        model.retrieve(queries, tokenizer)


@pytest.mark.parametrize("text", ["\u200b\u200b\u200b", "\x00\x01\x02", "\u200d\ufeff", "\u2063"])
def test_a_query_without_a_usable_token_gets_no_hits_and_a_warning(setup, text):
    model, tokenizer, _ = setup
    with pytest.warns(UnusableQueryWarning, match="item 1"):
        hits = model.retrieve(["a red circle", text], tokenizer, top_k=3)
    assert len(hits[0]) == 3 and hits[1] == []
    pipe = pipeline(PIPELINE_TASK, model=model, tokenizer=tokenizer, device="cpu")
    with pytest.warns(UnusableQueryWarning):
        assert pipe(text, top_k=3) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_image_queries_with_nan_or_inf_are_refused(setup, bad):
    model, tokenizer, features = setup
    queries = torch.tensor(features[:3])
    queries[1, 2] = bad
    with pytest.raises(ValueError, match="image_embeds row 1 holds NaN or inf"):
        model.retrieve(tokenizer=tokenizer, image_embeds=queries)


def test_the_first_non_finite_row_is_named_past_the_first_block(setup, monkeypatch):
    # Rows are checked in blocks (a full-size mask is half a gigabyte at a million rows): the row named is the
    # first bad one of the whole matrix, for queries and for the features a model stores alike.
    monkeypatch.setattr(query_inputs_gcmr, "FINITE_CHECK_ROWS", 4)
    model, tokenizer, features = setup
    stored = torch.tensor(features)
    stored[9, 0], stored[11, 1] = float("nan"), float("inf")
    with pytest.raises(ValueError, match="image features row 9 holds NaN or inf"):
        model.store_image_features(stored)
    with pytest.raises(ValueError, match="image_embeds row 9 holds NaN or inf"):
        model.retrieve(tokenizer=tokenizer, image_embeds=stored)
    query_inputs_gcmr.check_finite_rows(torch.tensor(features), "image features")


def test_image_queries_as_numpy_arrays_or_lists_are_accepted(setup):
    model, tokenizer, features = setup
    as_tensor = model.retrieve(tokenizer=tokenizer, image_embeds=torch.tensor(features[:2]), top_k=2)
    assert model.retrieve(tokenizer=tokenizer, image_embeds=features[:2], top_k=2) == as_tensor
    assert model.retrieve(tokenizer=tokenizer, image_embeds=features[:2].tolist(), top_k=2) == as_tensor
    with pytest.raises(TypeError, match="image_embeds must be a float tensor or array of numbers"):
        model.retrieve(tokenizer=tokenizer, image_embeds=[["a", "b"]])


def test_search_limits_are_capped_at_the_identifiers():
    assert query_inputs_gcmr.search_limits(10**9, None, 10, num_identifiers=12) == (12, 12)
    assert query_inputs_gcmr.search_limits(3, 10**6, 10, num_identifiers=10**7) == (3, query_inputs_gcmr.MAX_BEAMS)
    with pytest.raises(ValueError, match="num_beams must be a positive int, got '4'"):
        query_inputs_gcmr.search_limits(3, "4", 10, 12)


def test_an_image_only_batch_is_a_memorize_batch(setup):
    model, tokenizer, features = setup
    labels = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(ids) for ids in tokenizer.encode_identifiers(tokenizer.keys[:4])], batch_first=True,
        padding_value=-100)
    model.train()
    try:
        out = model(image_embeds=torch.tensor(features[:4]), labels=labels)
        out.loss.backward()
    finally:
        model.eval()
        model.zero_grad()
    assert torch.isfinite(out.loss) and out.logits.shape == (4, NUM_KEYS)
    # before training, an image's own identifier is its best: memorizing starts as exact lookup
    assert out.logits.argmax(dim=1).tolist() == [0, 1, 2, 3]


def test_warnings_do_not_escape_for_ordinary_queries(setup):
    model, tokenizer, _ = setup
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnusableQueryWarning)
        model.retrieve(["a red circle", "a blue square"], tokenizer)


def _surrogate_warnings(caught) -> list[str]:
    return [str(warning.message) for warning in caught if "lone surrogates" in str(warning.message)]


def test_a_lone_surrogate_is_replaced_with_one_warning_in_search_the_pipeline_and_training(setup):
    """Issue 17: "a \\ud800 dog" raised the tokenizers' TypeError; it now searches as "a \\ufffd dog"."""
    from modeling_gcmr.training.examples import build_query_examples

    model, tokenizer, _ = setup
    replaced = model.retrieve(["a red \ufffd circle", "a big star"], tokenizer, top_k=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hits = model.retrieve(["a red \ud800 circle", "a big \udfff\ud800 star"], tokenizer, top_k=3)
    assert _surrogate_warnings(caught) == [
        "2 texts hold lone surrogates (half of a UTF-16 pair, which cannot be encoded), replaced with U+FFFD: "
        "item 0 is 'a red \\ud800 circle'"]
    assert [[key for key, _ in row] for row in hits[:1]] == [[key for key, _ in row] for row in replaced[:1]]
    assert all(len(row) == 3 for row in hits)
    # a well-formed pair written as two escapes is its character, with no warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.retrieve("\ud83d\ude00 a red circle", tokenizer, top_k=3)
    assert _surrogate_warnings(caught) == []

    pipe = pipeline(PIPELINE_TASK, model=model, tokenizer=tokenizer, device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = pipe(["a red \ud800 circle", "a \ud800 star"], top_k=3)
    assert len(_surrogate_warnings(caught)) == 1 and all(len(result) == 3 for result in results)

    with pytest.warns(UserWarning, match="lone surrogates"):
        rows = build_query_examples(["a red \ud800 circle"], ["img0"], tokenizer, 16)
    assert rows[0]["input_ids"] == query_inputs_gcmr.query_token_ids(tokenizer, ["a red \ufffd circle"], 16)[0]
