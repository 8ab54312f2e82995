"""build_identifiers on features that need not fit in memory: memory-mapped .npy / safetensors files, iterators of
batches. The same features in any form give the same table, bit for bit, and bad files or batches are named."""
from __future__ import annotations

import tempfile

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch_file

from modeling_gcmr.dense.image_embeddings import save_image_embeddings
from tokenization_gcmr.builders.identifiers import build_identifiers
from tokenization_gcmr.builders.quantizers import ASSIGN_BATCH

# More rows than one block, so every pass over the features reads several blocks; one big cluster makes a
# structured node larger than a block below the root (the lazy row-subset path).
NUM_ROWS = ASSIGN_BATCH + 4_464
CONFIGS = {
    "coarse_fine rqvae": ("coarse_fine", dict(
        num_coarse=6, codebook_size=8, num_levels=2, train_sample=2_000, rqvae_epochs=1, rqvae_hidden_dim=16,
        rqvae_latent_dim=4, rqvae_batch_size=256, kmeans_iterations=5,
    )),
    "coarse_fine residual_kmeans": ("coarse_fine", dict(
        num_coarse=6, codebook_size=8, num_levels=2, train_sample=2_000, fine_quantizer="residual_kmeans",
        kmeans_iterations=5,
    )),
    "structured": ("structured", dict(branching=2, leaf_size=4_000, train_sample=1_000, kmeans_iterations=5)),
}


@pytest.fixture(scope="module")
def features() -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(7)
    centers = rng.normal(scale=8.0, size=(2, 8))
    labels = (np.arange(NUM_ROWS) >= NUM_ROWS - 3_000).astype(int)  # 67,000 rows in one cluster, 3,000 in the other
    embeddings = (centers[labels] + rng.normal(size=(NUM_ROWS, 8))).astype(np.float32)
    return [f"img{i}" for i in range(NUM_ROWS)], embeddings


def assert_same_table(table, expected) -> None:
    assert table.content_hash == expected.content_hash
    assert table.units == expected.units
    np.testing.assert_array_equal(table.codes, expected.codes)
    np.testing.assert_array_equal(table.unit_vectors, expected.unit_vectors)  # NaN rows compare equal


def batches(array: np.ndarray, size: int):
    return (array[start : start + size] for start in range(0, len(array), size))


@pytest.mark.parametrize("config", CONFIGS)
def test_every_form_of_the_features_gives_the_in_memory_table(config, features, tmp_path):
    id_type, options = CONFIGS[config]
    keys, embeddings = features
    expected = build_identifiers(keys, id_type, embeddings=embeddings, seed=3, **options)
    assert len(set(map(tuple, expected.codes.tolist()))) == NUM_ROWS
    np.save(tmp_path / "features.npy", embeddings)
    save_image_embeddings(tmp_path / "features.safetensors", keys, embeddings)
    memmap = np.memmap(tmp_path / "raw.f32", dtype=np.float32, mode="w+", shape=embeddings.shape)
    memmap[:] = embeddings
    memmap.flush()
    forms = {
        "np.load mmap": np.load(tmp_path / "features.npy", mmap_mode="r"),
        "np.memmap": np.memmap(tmp_path / "raw.f32", dtype=np.float32, mode="r", shape=embeddings.shape),
        ".npy path": str(tmp_path / "features.npy"),
        ".safetensors path": tmp_path / "features.safetensors",
        "iterator of uneven batches": batches(embeddings, 9_999),
    }
    for name, form in forms.items():
        table = build_identifiers(keys, id_type, embeddings=form, seed=3, **options)
        assert_same_table(table, expected)  # fails naming `name` in the traceback


def test_other_dtypes_read_block_by_block_match_their_in_memory_build(tmp_path):
    rng = np.random.default_rng(0)
    keys = [str(i) for i in range(300)]

    def build(embeddings, id_type="coarse_fine"):
        options = dict(num_coarse=4, codebook_size=4, fine_quantizer="residual_kmeans")
        if id_type == "structured":
            options = dict(branching=3, leaf_size=20)
        return build_identifiers(keys, id_type, embeddings=embeddings, **options)

    half = rng.normal(size=(300, 6)).astype(np.float16)
    np.save(tmp_path / "half.npy", half)
    assert_same_table(build(tmp_path / "half.npy"), build(half))
    assert_same_table(build(half.astype(np.float32)), build(half))
    # bfloat16 safetensors (common for stored CLIP features) read as the float32 values they stand for
    brain = torch.from_numpy(rng.normal(size=(300, 6)).astype(np.float32)).to(torch.bfloat16)
    save_torch_file({"embeddings": brain}, str(tmp_path / "bf16.safetensors"))
    assert_same_table(build(tmp_path / "bf16.safetensors"), build(brain.float().numpy()))
    assert_same_table(build(brain), build(brain.float().numpy()))  # a bfloat16 tensor in memory too
    integers = rng.integers(-50, 50, size=(300, 6), dtype=np.int32)
    np.save(tmp_path / "int.npy", integers)
    assert_same_table(build(tmp_path / "int.npy", "structured"), build(integers, "structured"))


def test_an_iterator_is_spooled_to_a_temporary_file_that_is_removed(monkeypatch, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    embeddings = np.random.default_rng(1).normal(size=(50, 4)).astype(np.float32)
    keys = [str(i) for i in range(50)]
    options = dict(num_coarse=3, codebook_size=4, fine_quantizer="residual_kmeans")
    streamed = iter([torch.from_numpy(embeddings[:20]), embeddings[20:]])
    table = build_identifiers(keys, "coarse_fine", embeddings=streamed, **options)
    assert_same_table(table, build_identifiers(keys, "coarse_fine", embeddings=embeddings, **options))
    assert list(spool.iterdir()) == []
    with pytest.raises(ValueError, match="row 7 holds NaN"):
        bad = embeddings.copy()
        bad[7, 1] = np.nan
        build_identifiers(keys, "atomic", embeddings=batches(bad, 5))
    assert list(spool.iterdir()) == []


def test_bad_memory_mapped_files_are_named(tmp_path):
    keys = ["a", "b", "c"]
    cases = {
        "flat.npy": (np.zeros(3, np.float32), r"flat.npy\) must have shape \(num_keys, dim\) = \(3, D\), got \(3,\)"),
        "cube.npy": (np.zeros((3, 2, 2), np.float32), r"cube.npy\) must have shape .* got \(3, 2, 2\)"),
        "rows.npy": (np.zeros((4, 2), np.float32), r"rows.npy\) has 4 rows for 3 keys"),
        "bool.npy": (np.zeros((3, 2), bool), r"bool.npy\) must be numbers, got dtype bool"),
        "complex.npy": (np.zeros((3, 2), np.complex64), "must be numbers, got dtype complex64"),
    }
    for name, (array, message) in cases.items():
        np.save(tmp_path / name, array)
        for form in (tmp_path / name, np.load(tmp_path / name, mmap_mode="r")):
            with pytest.raises(ValueError, match=message):
                build_identifiers(keys, "coarse_fine", embeddings=form)
    np.save(tmp_path / "objects.npy", np.array([[1, "x"]] * 3, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="objects.npy is not a numeric .npy array"):
        build_identifiers(keys, "structured", embeddings=tmp_path / "objects.npy")
    with pytest.raises(ValueError, match="missing.npy does not exist"):
        build_identifiers(keys, "structured", embeddings=tmp_path / "missing.npy")
    (tmp_path / "features.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"features.csv must be a .npy or a .safetensors file"):
        build_identifiers(keys, "structured", embeddings=str(tmp_path / "features.csv"))


def test_a_nan_row_deep_in_a_memory_mapped_file_is_named_with_the_file(tmp_path):
    embeddings = np.random.default_rng(2).normal(size=(ASSIGN_BATCH + 10, 2)).astype(np.float32)
    embeddings[ASSIGN_BATCH + 3, 1] = np.inf
    embeddings[ASSIGN_BATCH + 8, 0] = np.nan
    np.save(tmp_path / "features.npy", embeddings)
    keys = [str(i) for i in range(len(embeddings))]
    with pytest.raises(ValueError, match=rf"row {ASSIGN_BATCH + 3} \(file .*features.npy\) holds NaN or inf \(the"):
        build_identifiers(keys, "coarse_fine", embeddings=np.load(tmp_path / "features.npy", mmap_mode="r"))
    embeddings[ASSIGN_BATCH + 3] = embeddings[ASSIGN_BATCH + 8] = 0
    embeddings[ASSIGN_BATCH + 5, 0] = 1e20
    np.save(tmp_path / "features.npy", embeddings)
    with pytest.raises(ValueError, match=rf"row {ASSIGN_BATCH + 5} \(file .*features.npy\) holds a value beyond"):
        build_identifiers(keys, "atomic", embeddings=tmp_path / "features.npy")


def test_bad_safetensors_files_are_named(tmp_path):
    keys = ["a", "b", "c"]
    save_file({"x": np.zeros((3, 2), np.float32), "y": np.zeros((3, 2), np.float32)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ValueError, match=r"two.safetensors holds tensors \['x', 'y'\]; expected one, or one"):
        build_identifiers(keys, "structured", embeddings=tmp_path / "two.safetensors")
    save_file({"only": np.zeros((3, 2), np.float32)}, str(tmp_path / "one.safetensors"))
    assert build_identifiers(keys, "structured", embeddings=tmp_path / "one.safetensors").keys == tuple(keys)
    save_image_embeddings(tmp_path / "order.safetensors", ["a", "c", "b"], np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError, match=r"order.safetensors lists other image keys than `keys` \(first difference at"):
        build_identifiers(keys, "structured", embeddings=tmp_path / "order.safetensors")
    data = (tmp_path / "one.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-4])
    with pytest.raises(ValueError, match=r"cut.safetensors: tensor 'only' does not fit its shape \(3, 2\)"):
        build_identifiers(keys, "structured", embeddings=tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.safetensors is not a safetensors file"):
        build_identifiers(keys, "structured", embeddings=tmp_path / "junk.safetensors")
    for header in (b"[1, 2]", b'{"x": {"dtype": "F32"}}'):
        (tmp_path / "odd.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
        with pytest.raises(ValueError, match="odd.safetensors"):
            build_identifiers(keys, "structured", embeddings=tmp_path / "odd.safetensors")


@pytest.mark.parametrize(
    "batch_list, message",
    [
        ([np.zeros((2, 4)), np.zeros((2, 4)), np.zeros((1, 3))], r"\(batch 2, from row 4\) has width 3; batch 0 had"),
        ([np.zeros((2, 4)), np.zeros(4)], r"\(batch 1, from row 2\) must be a 2-D batch \(rows, dim\), got shape \(4,"),
        ([np.zeros((2, 4)), np.array([["a"] * 4])], r"\(batch 1, from row 2\) must be numbers"),
        ([np.zeros((3, 4))], "embeddings batches hold 3 rows for 5 keys"),
        ([np.zeros((4, 4)), np.zeros((4, 4))], "embeddings batches hold more than 5 rows"),
    ],
)
def test_bad_batches_are_named(batch_list, message):
    with pytest.raises(ValueError, match=message):
        build_identifiers(list("abcde"), "coarse_fine", embeddings=iter(batch_list))
