"""The model card: metadata, model-index round trip, body, input checks, and a usage snippet that runs as written."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from subprocess_utils import run_without_package

from modeling_gcmr import GcmrConfig, GcmrForRetrieval
from modeling_gcmr.publishing.checkpoint import save_retriever
from modeling_gcmr.publishing.model_card import (
    BASELINE_CONFIG,
    PIPELINE_TAG,
    build_model_card,
    extract_usage_snippet,
)
from tokenization_gcmr import ImageIdTokenizer, build_identifiers

METRICS = {"recall@1": 0.5, "recall@5": np.float64(0.8), "recall@10": 0.9, "mrr@10": 0.625, "num_queries": 40}
BASELINE = {"recall@1": 0.4, "recall@5": 0.7, "recall@10": 0.85, "mrr@10": 0.52}
TRAINING_ARGS = {"learning_rate": np.float32(1e-3), "num_train_epochs": 30, "per_device_train_batch_size": 16,
                 "optim": "adamw_torch", "lr_scheduler_type": "linear"}
TINY_QUERY = "a small red circle left of a blue square"


def build_tiny_retriever(text_tokenizer, num_images: int = 8, prefix: str = "img", id_type: str = "numeric",
                         seed: int = 0):
    """An untrained tiny T5-backed retriever (keys `{prefix}-NN`); decoding is trie-constrained all the same."""
    torch.manual_seed(seed)
    table = build_identifiers([f"{prefix}-{i:02d}" for i in range(num_images)], id_type, seed=0)
    tokenizer = ImageIdTokenizer(text_tokenizer, table)
    text_config = dict(model_type="t5", vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_heads=2,
                       num_layers=1, num_decoder_layers=1, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = GcmrForRetrieval(GcmrConfig(text_config=text_config, num_beams=4))
    model.set_identifier_vocabulary(tokenizer)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def tiny_retriever(text_tokenizer):
    model, tokenizer = build_tiny_retriever(text_tokenizer)
    return model, tokenizer, TINY_QUERY


def _card(**overrides) -> ModelCard:
    kwargs = dict(model_name="gcmr-tiny-cf", id_type="coarse_fine", corpus_size=np.int64(120),
                  dataset_name="synthetic-shapes", training_args=TRAINING_ARGS, metrics=METRICS,
                  baseline_metrics=BASELINE, repo_id="tester/gcmr-tiny-cf",
                  extra={"identifier signature": "3f2a|9c"})
    kwargs.update(overrides)
    return build_model_card(**kwargs)


def test_metadata_round_trips_through_a_saved_readme(tmp_path):
    path = tmp_path / "README.md"
    _card().save(path)
    loaded = ModelCard.load(path)
    data = loaded.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == PIPELINE_TAG
    assert data.datasets == ["synthetic-shapes"]
    assert data.license == "apache-2.0"
    for tag in ("custom_code", "generative-retrieval", "cross-modal-retrieval", "gcmr", "identifier-coarse-fine"):
        assert tag in data.tags
    assert data.model_name == "gcmr-tiny-cf"
    got = {(r.metric_type, r.metric_config): r.metric_value for r in data.eval_results}
    assert got == {
        ("recall@1", None): 0.5, ("recall@5", None): 0.8, ("recall@10", None): 0.9, ("mrr@10", None): 0.625,
        ("recall@1", BASELINE_CONFIG): 0.4, ("recall@5", BASELINE_CONFIG): 0.7,
        ("recall@10", BASELINE_CONFIG): 0.85, ("mrr@10", BASELINE_CONFIG): 0.52,
    }
    baseline_names = {r.metric_name for r in data.eval_results if r.metric_config == BASELINE_CONFIG}
    assert baseline_names == {"Recall@1 (dense baseline)", "Recall@5 (dense baseline)",
                              "Recall@10 (dense baseline)", "MRR@10 (dense baseline)"}
    assert {r.dataset_split for r in data.eval_results} == {"test"}
    assert {r.task_type for r in data.eval_results} == {PIPELINE_TAG}
    # The raw YAML has one model-index entry named after the model, as the Hub expects.
    index = data.to_dict()["model-index"]
    assert [entry["name"] for entry in index] == ["gcmr-tiny-cf"]


def test_body_states_identifiers_corpus_hyperparameters_and_both_results():
    text = _card().text
    assert "`coarse_fine`" in text and "residual" in text
    assert "| Corpus size | 120 images |" in text
    assert "| learning_rate | 0.001 |" in text  # float32 noise removed
    assert "| num_train_epochs | 30 |" in text and "| optim | adamw_torch |" in text
    assert "| gcmr-tiny-cf | 50.0 | 80.0 | 90.0 | 62.5 |" in text
    assert "| Dense dual-encoder baseline | 40.0 | 70.0 | 85.0 | 52.0 |" in text
    assert "| identifier signature | 3f2a\\|9c |" in text  # a pipe in a value does not break the table
    snippet = extract_usage_snippet(text)
    assert 'AutoModel.from_pretrained("tester/gcmr-tiny-cf", trust_remote_code=True)' in snippet
    assert 'AutoTokenizer.from_pretrained("tester/gcmr-tiny-cf", trust_remote_code=True)' in snippet
    assert "model.retrieve([" in snippet and "top_k=5" in snippet


def test_without_baseline_only_the_model_is_reported():
    card = _card(baseline_metrics=None)
    assert len(card.data.eval_results) == 4
    assert all(r.metric_config is None for r in card.data.eval_results)
    assert "baseline |" not in card.text


def test_without_held_out_queries_the_card_says_so_and_claims_no_results(tmp_path):
    card = _card(metrics=None, baseline_metrics=None)
    assert not card.data.eval_results and "model-index" not in card.content
    assert "Not evaluated" in card.text and "baseline" not in card.text.lower()
    card.save(tmp_path / "README.md")  # still a valid card with metadata and a usage snippet
    assert ModelCard.load(tmp_path / "README.md").data.pipeline_tag == card.data.pipeline_tag
    assert "AutoModel.from_pretrained" in extract_usage_snippet(card)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"metrics": None}, "baseline_metrics without metrics"),
        ({"metrics": {"recall@1": 0.5, "recall@5": 0.8, "recall@10": 0.9}}, "metrics is missing 'mrr@10'"),
        ({"metrics": {**METRICS, "recall@5": 80.0}}, "metrics['recall@5'] must be a fraction in [0, 1]"),
        ({"baseline_metrics": {**BASELINE, "recall@1": "high"}}, "baseline_metrics['recall@1']"),
        ({"id_type": "barcode"}, "id_type must be one of"),
        ({"corpus_size": 0}, "corpus_size must be a positive integer"),
        ({"training_args": {"callback": object()}}, "training_args['callback'] is not JSON-serializable"),
        ({"training_args": {"lr": float("nan")}}, "training_args['lr'] must be finite"),
        ({"dataset_name": " "}, "dataset_name must be a non-empty string"),
    ],
)
def test_bad_input_is_named(overrides, message):
    with pytest.raises(ValueError) as info:
        _card(**overrides)
    assert message in str(info.value)


def test_usage_snippet_runs_as_written_without_the_package(tiny_retriever, tmp_path):
    """Save model + tokenizer + card; run the card's own snippet in a process where gcmr is not importable."""
    model, tokenizer, query = tiny_retriever
    folder = tmp_path / "gcmr-tiny"
    card = _card(repo_id=str(folder), example_query=query)
    save_retriever(model, tokenizer, folder, card)
    expected = [[key, round(float(score), 4)] for key, score in model.retrieve([query], tokenizer, top_k=5)[0]]

    snippet = extract_usage_snippet((folder / "README.md").read_text())
    # The snippet runs verbatim; one line after it reports what it retrieved.
    code = snippet + "\nimport json\nprint(json.dumps([[k, round(float(s), 4)] for k, s in hits[0]]))\n"
    result = run_without_package(code, cwd=str(tmp_path))
    assert result == expected and len(expected) >= 1
