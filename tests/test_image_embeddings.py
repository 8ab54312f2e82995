"""Image embeddings from a CLIP checkpoint loaded by path (offline), precomputed features and the baseline."""
import numpy as np
import pytest
import torch
from transformers import BertConfig, CLIPConfig, CLIPImageProcessorPil, CLIPModel

from modeling_gcmr.dense.dual_encoder import (
    DualEncoderConfig,
    DualEncoderModel,
    train_dual_encoder,
)
from modeling_gcmr.dense.image_embeddings import (
    compute_image_embeddings,
    load_image_embeddings,
    save_image_embeddings,
)
from modeling_gcmr.training.data import load_corpus
from modeling_gcmr.training.synthetic import FEATURE_DIM, make_synthetic_corpus


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(make_synthetic_corpus(10, seed=4))


def test_clip_checkpoint_by_path(corpus, tmp_path):
    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config={**tower, "vocab_size": 99, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    embeddings = compute_image_embeddings(corpus, str(tmp_path / "clip"), batch_size=3)
    assert embeddings.shape == (10, 16) and embeddings.dtype == np.float32
    with torch.no_grad():
        pixels = processor(images=[corpus[7]["image"]], return_tensors="pt")["pixel_values"]
        expected = model.get_image_features(pixel_values=pixels).pooler_output[0].numpy()
    assert np.allclose(embeddings[7], expected, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="not 'precomputed' or a local checkpoint"):
        compute_image_embeddings(corpus, str(tmp_path / "nothing-here"))


def test_precomputed_and_dual_encoder_features(corpus):
    precomputed = compute_image_embeddings(corpus, "precomputed")
    assert precomputed.shape == (10, FEATURE_DIM)
    assert np.array_equal(precomputed, np.asarray(corpus["image_embeds"], dtype=np.float32))
    with pytest.raises(ValueError, match="needs an `image_embeds` column"):
        compute_image_embeddings(corpus.remove_columns("image_embeds"), "precomputed")
    model = DualEncoderModel(
        DualEncoderConfig(
            text_config=BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
            image_embed_dim=FEATURE_DIM,
            projection_dim=8,
        )
    )
    features = compute_image_embeddings(corpus, model, batch_size=4)
    assert features.shape == (10, 8) and np.allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    assert model.training  # the mode it came in with is restored


def test_dual_encoder_trained_on_the_corpus(corpus):
    # Without an image column the baseline trains on `image_embeds` (the pixel tower is tested elsewhere).
    embeds_only = corpus.remove_columns("image")
    features = compute_image_embeddings(embeds_only, train_dual_encoder(embeds_only).model)
    assert features.shape == (10, 64) and np.isfinite(features).all()
    assert len({tuple(np.round(row, 4)) for row in features}) == 10


def test_embedding_file_round_trip(tmp_path):
    keys = ["b", "a", "c"]
    values = np.arange(6, dtype=np.float32).reshape(3, 2)
    save_image_embeddings(tmp_path / "emb.safetensors", keys, values)
    loaded_keys, loaded = load_image_embeddings(tmp_path / "emb.safetensors")
    assert loaded_keys == keys and np.array_equal(loaded, values)
    with pytest.raises(ValueError, match="one embedding row per key"):
        save_image_embeddings(tmp_path / "bad.safetensors", keys[:2], values)
