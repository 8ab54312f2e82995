"""The synthetic corpus: deterministic, distinct scenes, captions that name the scene, round trip to disk."""
import numpy as np
import pytest

from modeling_gcmr.training.data import load_corpus
from modeling_gcmr.training.synthetic import (
    COLOURS,
    FEATURE_DIM,
    make_synthetic_corpus,
    max_synthetic_images,
    write_imagefolder,
)


def test_same_seed_same_corpus_other_seed_other_corpus():
    a, b, c = (make_synthetic_corpus(12, seed=s) for s in (3, 3, 4))
    assert a["captions"] == b["captions"] and a["image_embeds"] == b["image_embeds"]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a["image"], b["image"]))
    assert a["attributes"] != c["attributes"]


def test_scenes_keys_and_captions():
    corpus = make_synthetic_corpus(60, image_size=48, captions_per_image=4, seed=1)
    assert len(set(corpus["image_key"])) == 60
    scenes = [tuple(sorted(a.items())) for a in corpus["attributes"]]
    assert len(set(scenes)) == 60
    for row in corpus.select(range(10)):
        assert row["image"].size == (48, 48) and row["image"].mode == "RGB"
        assert len(set(row["captions"])) == 4
        scene = row["attributes"]
        for caption in row["captions"]:
            for word in (scene["colour_a"], scene["shape_a"], scene["colour_b"], scene["shape_b"]):
                assert word in caption
        # The first object is drawn in its colour in the left (or top) half.
        pixels = np.asarray(row["image"]).reshape(-1, 3)
        assert (np.abs(pixels - COLOURS[scene["colour_a"]]).sum(axis=1) < 10).any()


def test_features_encode_the_scene():
    corpus = make_synthetic_corpus(40, seed=2)
    features = np.asarray(corpus["image_embeds"], dtype=np.float32)
    assert features.shape == (40, FEATURE_DIM)
    # One-hot plus small noise: exactly five entries per row are near 1.
    assert ((features > 0.5).sum(axis=1) == 5).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match=f"between 1 and {max_synthetic_images()}"):
        make_synthetic_corpus(max_synthetic_images() + 1)
    with pytest.raises(ValueError, match="captions_per_image"):
        make_synthetic_corpus(3, captions_per_image=7)


def test_imagefolder_round_trip(tmp_path):
    corpus = make_synthetic_corpus(8, seed=5)
    folder = write_imagefolder(corpus, tmp_path / "syn")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]  # no staging folder left behind
    loaded = load_corpus(folder)
    assert loaded["image_key"] == corpus["image_key"]
    assert loaded["captions"] == corpus["captions"]
    assert np.allclose(loaded["image_embeds"], corpus["image_embeds"])
    assert np.array_equal(np.asarray(loaded[3]["image"]), np.asarray(corpus[3]["image"]))
    write_imagefolder(corpus.select(range(2)), folder)  # replacing an existing folder
    assert len(load_corpus(folder)) == 2
