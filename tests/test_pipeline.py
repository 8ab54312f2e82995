"""The "generative-image-retrieval" pipeline: in process, from a saved folder through remote code, and on bad input."""
import json

import pytest
import torch
from subprocess_utils import run_without_package
from transformers import pipeline

from modeling_gcmr import GcmrConfig, GcmrForRetrieval
from modeling_gcmr.pipeline_gcmr import PIPELINE_TASK, GcmrRetrievalPipeline
from modeling_gcmr.publishing.checkpoint import save_retriever
from modeling_gcmr.training.synthetic import FEATURE_DIM, make_synthetic_corpus
from tokenization_gcmr import ImageIdTokenizer, build_identifiers

QUERIES = ["a red circle to the left of a blue square", "a green cross above a pink diamond"]


@pytest.fixture(scope="module")
def corpus():
    return make_synthetic_corpus(12, captions_per_image=2, seed=3)


@pytest.fixture(scope="module")
def retriever(corpus, text_tokenizer):
    """An untrained tiny model and its tokenizer: decoding is still trie-constrained, so every hit is a real key."""
    torch.manual_seed(0)
    table = build_identifiers(corpus["image_key"], "coarse_fine", embeddings=corpus["image_embeds"], seed=0)
    tokenizer = ImageIdTokenizer(text_tokenizer, table)
    text_config = dict(model_type="t5", vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_heads=2,
                       num_layers=1, num_decoder_layers=1, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = GcmrForRetrieval(GcmrConfig(text_config=text_config, image_embed_dim=FEATURE_DIM, num_beams=4))
    model.set_identifier_vocabulary(tokenizer)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def pipe(retriever):
    # importing modeling_gcmr registered the task name with transformers' pipeline registry
    model, tokenizer = retriever
    return pipeline(PIPELINE_TASK, model=model, tokenizer=tokenizer, device="cpu")


def test_pipeline_matches_retrieve(pipe, retriever):
    model, tokenizer = retriever
    assert isinstance(pipe, GcmrRetrievalPipeline)
    expected = model.retrieve(QUERIES[:1], tokenizer, top_k=3, num_beams=4)[0]
    results = pipe(QUERIES[0], top_k=3, num_beams=4)
    assert [r["rank"] for r in results] == list(range(1, len(expected) + 1))
    assert [r["image_key"] for r in results] == [key for key, _ in expected]
    assert [r["score"] for r in results] == pytest.approx([score for _, score in expected], abs=1e-5)
    assert results == sorted(results, key=lambda r: -r["score"])


def test_pipeline_batches_a_list_of_queries_like_single_calls(pipe):
    singles = [pipe(query, top_k=2) for query in QUERIES]
    batched = pipe(QUERIES, top_k=2, batch_size=2)
    assert len(batched) == len(QUERIES)
    for single, batch in zip(singles, batched):
        assert [r["image_key"] for r in batch] == [r["image_key"] for r in single]
        assert [r["score"] for r in batch] == pytest.approx([r["score"] for r in single], abs=1e-4)


def test_pipeline_attaches_images_from_a_lookup(retriever, corpus):
    model, tokenizer = retriever
    images = dict(zip(corpus["image_key"], corpus["image"]))
    results = GcmrRetrievalPipeline(model=model, tokenizer=tokenizer, device="cpu", images=images)(QUERIES[1], top_k=2)
    assert results and all(r["image"] is images[r["image_key"]] for r in results)


@pytest.mark.parametrize(
    "query, error, message",
    [
        (42, TypeError, "queries must be strings; item 0 is int"),
        ("   ", ValueError, "must not be empty or whitespace"),
        ([], ValueError, "no queries given"),
        (["fine", None], TypeError, "item 1 is NoneType"),
    ],
)
def test_pipeline_rejects_bad_queries(pipe, query, error, message):
    with pytest.raises(error, match=message):
        pipe(query)


def test_pipeline_rejects_bad_parameters(pipe):
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        pipe(QUERIES[0], top_k=0)
    with pytest.raises(ValueError, match="num_beams must be a positive int"):
        pipe(QUERIES[0], num_beams=-1)
    with pytest.raises(TypeError, match="unexpected parameters"):
        pipe(QUERIES[0], temperature=0.7)


def test_every_saved_checkpoint_runs_the_pipeline_without_the_package(retriever, tmp_path):
    model, tokenizer = retriever
    folder = tmp_path / "checkpoint"
    save_retriever(model, tokenizer, str(folder))
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"][PIPELINE_TASK]["impl"] == "pipeline_gcmr.GcmrRetrievalPipeline"
    assert (folder / "pipeline_gcmr.py").is_file()
    expected = model.retrieve(QUERIES, tokenizer, top_k=3, num_beams=4)

    result = run_without_package(
        f"""
        import json
        from transformers import pipeline
        pipe = pipeline({PIPELINE_TASK!r}, model={str(folder)!r}, trust_remote_code=True, device="cpu")
        auto = pipeline(model={str(folder)!r}, trust_remote_code=True, device="cpu")
        print(json.dumps({{"hits": pipe({QUERIES!r}, top_k=3, num_beams=4), "task": auto.task,
                          "cls": type(pipe).__name__, "module": type(pipe).__module__}}))
        """,
        cwd=str(tmp_path),
    )
    assert result["cls"] == "GcmrRetrievalPipeline" and result["task"] == PIPELINE_TASK
    assert result["module"].startswith("transformers_modules")
    for remote, local in zip(result["hits"], expected):
        assert [r["image_key"] for r in remote] == [key for key, _ in local]
        assert [r["score"] for r in remote] == pytest.approx([score for _, score in local], abs=1e-4)
