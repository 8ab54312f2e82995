"""The dense baseline: its loss, exact faiss search, Trainer training that learns, save/load, the example."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, CLIPVisionConfig

from modeling_gcmr.dense.dual_encoder import (
    DenseIndex,
    DualEncoderArguments,
    DualEncoderCollator,
    DualEncoderConfig,
    DualEncoderModel,
    DualEncoderRetriever,
    DualEncoderTrainingArguments,
    caption_pairs,
    train_dual_encoder,
)
from modeling_gcmr.dense.image_embeddings import load_image_embeddings
from modeling_gcmr.evaluation.metrics import evaluate_retriever
from modeling_gcmr.training.data import load_corpus, split_captions
from modeling_gcmr.training.synthetic import make_synthetic_corpus, write_imagefolder

REPO = Path(__file__).resolve().parents[1]

TINY_TEXT = dict(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
TINY_VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(make_synthetic_corpus(40, seed=3))


def test_loss_is_symmetric_infonce():
    torch.manual_seed(0)
    model = DualEncoderModel(DualEncoderConfig(text_config=BertConfig(**TINY_TEXT), image_embed_dim=7, projection_dim=16))
    model.eval()  # dropout off, so two passes agree
    input_ids = torch.randint(3, 60, (4, 6))
    image_embeds = torch.randn(4, 7)
    out = model(input_ids=input_ids, image_embeds=image_embeds)
    assert list(out.keys())[0] == "loss"
    text, image = model.encode_text(input_ids), model.encode_images(image_embeds=image_embeds)
    assert torch.allclose(text.norm(dim=-1), torch.ones(4), atol=1e-5)
    logits = text @ image.t() * model.logit_scale.exp()
    targets = torch.arange(4)
    expected = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
    assert torch.allclose(out.loss, expected, atol=1e-5)
    assert torch.allclose(out.logits_per_image, logits.t(), atol=1e-5)
    assert model(input_ids=input_ids, image_embeds=image_embeds, return_loss=False).loss is None
    assert model(input_ids=input_ids).image_embeds is None  # text only: embeddings, no loss
    with pytest.raises(ValueError, match="width 5, the model expects 7"):
        model.encode_images(image_embeds=torch.randn(2, 5))
    with pytest.raises(ValueError, match="no vision tower"):
        model.encode_images(pixel_values=torch.randn(2, 3, 32, 32))


def test_config_needs_an_image_path():
    with pytest.raises(Exception, match="vision_config.*or `image_embed_dim`"):
        DualEncoderConfig(text_config=BertConfig(**TINY_TEXT))


def test_pixel_tower_gets_gradients_through_the_collator(corpus):
    from transformers import CLIPImageProcessorPil

    from tokenization_gcmr.builders.text_vocabulary import train_text_tokenizer

    tokenizer = train_text_tokenizer((c for cs in corpus["captions"] for c in cs), vocab_size=200)
    config = DualEncoderConfig(
        text_config=BertConfig(**{**TINY_TEXT, "vocab_size": len(tokenizer)}),
        vision_config=CLIPVisionConfig(**TINY_VISION),
        projection_dim=16,
    )
    model = DualEncoderModel(config)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pairs = caption_pairs(corpus)
    assert len(pairs) == sum(len(c) for c in corpus["captions"])
    batch = DualEncoderCollator(tokenizer, processor)([pairs[i] for i in range(5)])
    assert batch["pixel_values"].shape == (5, 3, 32, 32) and "token_type_ids" not in batch
    model(**batch).loss.backward()
    assert model.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert model.logit_scale.grad is not None


def test_dense_index_is_exact_cosine_search():
    rng = np.random.default_rng(0)
    base, queries = rng.normal(size=(50, 8)), rng.normal(size=(6, 8))
    index = DenseIndex([f"k{i}" for i in range(50)], base)
    hits = index.search(queries, top_k=5)
    cosine = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        base / np.linalg.norm(base, axis=1, keepdims=True)
    ).T
    for row, query_hits in enumerate(hits):
        expected = np.argsort(-cosine[row])[:5]
        assert [key for key, _ in query_hits] == [f"k{i}" for i in expected]
        assert np.allclose([s for _, s in query_hits], cosine[row, expected], atol=1e-5)
    assert np.allclose(np.linalg.norm(index.embeddings, axis=1), 1.0, atol=1e-5)
    assert len(index.search(queries[:1], top_k=100)[0]) == 50
    with pytest.raises(ValueError, match="unique"):
        DenseIndex(["a", "a"], base[:2])
    with pytest.raises(ValueError, match=r"queries must be \(n, 8\)"):
        index.search(queries[:, :3])


def test_trainer_learns_the_synthetic_corpus_and_round_trips(corpus, tmp_path):
    split = split_captions(corpus.select(range(24)))
    args = DualEncoderArguments(image_input="embeds", hidden_size=32, num_layers=1, projection_dim=32)
    training_args = DualEncoderTrainingArguments(  # one batch holds all 48 pairs: 40 optimizer steps
        output_dir=str(tmp_path / "run"), num_train_epochs=40, per_device_train_batch_size=48, learning_rate=3e-3, disable_tqdm=True
    )
    retriever = train_dual_encoder(split.train, args, training_args)
    metrics = evaluate_retriever(retriever.retrieve, split.queries, split.gold)
    # 24 images: chance Recall@5 is 0.21. The features spell out the scene, so a trained model does far better.
    assert metrics["recall@5"] >= 0.6, metrics
    hits = retriever.retrieve(split.queries[:3], top_k=10)
    assert all(len(h) == 10 and len({k for k, _ in h}) == 10 for h in hits)
    retriever.save_pretrained(tmp_path / "saved")
    reloaded = DualEncoderRetriever.from_pretrained(tmp_path / "saved", split.train)
    again = reloaded.retrieve(split.queries[:3], top_k=10)
    assert [[k for k, _ in h] for h in again] == [[k for k, _ in h] for h in hits]
    assert np.allclose([s for h in again for _, s in h], [s for h in hits for _, s in h], atol=1e-5)


def test_example_script_trains_and_evaluates(tmp_path):
    folder = write_imagefolder(make_synthetic_corpus(12, seed=6), tmp_path / "corpus")
    (folder / "broken.png").write_text("not a PNG")
    with open(folder / "metadata.jsonl", "a") as metadata:
        metadata.write(json.dumps({"file_name": "broken.png", "captions": ["a", "b", "c"]}) + "\n")
    out = tmp_path / "out"
    command = [
        sys.executable, str(REPO / "examples" / "run_dual_encoder.py"), "--corpus", str(folder), "--skip_bad_rows",
        "--output_dir", str(out), "--do_train", "--do_eval", "--max_steps", "3", "--hidden_size", "16",
        "--num_layers", "1", "--projection_dim", "8", "--disable_tqdm", "true",
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipped 1 of 13 rows" in proc.stderr and "broken.png" in proc.stderr
    results = json.loads((out / "dual_encoder_results.json").read_text())
    assert results["eval_num_queries"] == 12 and 0.0 <= results["eval_recall@1"] <= results["eval_recall@10"] <= 1.0
    assert results["settings"]["model"]["hidden_size"] == 16
    lines = [json.loads(line) for line in (out / "per_query_results.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and all(len(line["hits"]) == 10 for line in lines)
    assert all(line["gold"].startswith("syn_") for line in lines)
    keys, embeddings = load_image_embeddings(out / "image_embeddings.safetensors")
    assert sorted(keys) == [f"syn_{i:05d}" for i in range(12)] and embeddings.shape == (12, 8)
    reloaded = DualEncoderModel.from_pretrained(out)
    assert reloaded.config.vision_config.image_size == 32  # the default: pixels through a CLIP vision tower
