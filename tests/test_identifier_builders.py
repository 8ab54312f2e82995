"""build_identifiers: every id_type on real data, property tests on random and degenerate data, bad input."""
from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tokenization_gcmr.builders.identifiers import (
    ID_TYPES,
    OPTIONS_CLASSES,
    build_identifiers,
)
from tokenization_gcmr.identifier_table import IdentifierTable

WORDS = "a an the red blue green big small circle square triangle left right of above below".split()
DIGITS = [str(d) for d in range(10)]
TINY_RQVAE = dict(
    fine_quantizer="rqvae", num_coarse=3, codebook_size=4, num_levels=2, rqvae_hidden_dim=16, rqvae_latent_dim=4,
    rqvae_epochs=2, rqvae_batch_size=16,
)
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def word_tokenizer() -> Tokenizer:
    """A WordPiece tokenizer over a few words and the ten digits (numbers split into digit pieces)."""
    vocab = {piece: i for i, piece in enumerate(["[UNK]", *WORDS, *DIGITS, *(f"##{d}" for d in DIGITS)])}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def spelled(table: IdentifierTable) -> list[list[str]]:
    return [[table.units[code] for code in row if code >= 0] for row in table.codes]


def assert_valid_unique(table: IdentifierTable, num_keys: int) -> None:
    rows = spelled(table)
    assert len(rows) == num_keys and all(rows)
    assert len({tuple(row) for row in rows}) == num_keys
    used = np.unique(table.codes[table.codes >= 0])
    assert len(used) == len(table.units) or table.id_type == "numeric"
    json.dumps(table.options)


def clustered(num_items: int, dim: int, num_clusters: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=10.0, size=(num_clusters, dim))
    labels = rng.integers(0, num_clusters, num_items)
    return (centers[labels] + rng.normal(size=(num_items, dim))).astype(np.float32), labels


def build_each(id_type: str, keys, embeddings, captions, tokenizer, seed: int = 0) -> IdentifierTable:
    options = {"text_tokenizer": tokenizer} if id_type in ("string", "semantic") else {}
    if id_type == "coarse_fine":
        options = dict(num_coarse=4, codebook_size=8, rqvae_epochs=3, rqvae_hidden_dim=16, rqvae_latent_dim=8)
    return build_identifiers(keys, id_type, embeddings=embeddings, captions=captions, seed=seed, **options)


# ----------------------------------------------------------------------------- every id_type


@pytest.mark.parametrize("id_type", ID_TYPES)
def test_every_type_unique_deterministic_and_round_trips(id_type, word_tokenizer, tmp_path):
    keys = [f"img-{i}" for i in range(120)]
    embeddings, _ = clustered(120, 8, 5)
    captions = [["a red circle left of a blue square", "unused"] if i % 4 else "the big green triangle" for i in range(120)]
    table = build_each(id_type, keys, embeddings, captions, word_tokenizer)
    again = build_each(id_type, keys, embeddings, captions, word_tokenizer)
    assert_valid_unique(table, 120)
    assert table.keys == tuple(keys) and table.id_type == id_type and table.options["seed"] == 0
    assert np.array_equal(table.codes, again.codes) and table.units == again.units
    assert table.content_hash == again.content_hash
    table.save(str(tmp_path))
    assert IdentifierTable.load(str(tmp_path)).content_hash == table.content_hash


def test_numeric_fixed_width_shared_digits_and_seeded_shuffle():
    keys = [f"k{i}" for i in range(250)]
    table = build_identifiers(keys, "numeric", seed=3)
    assert table.units == tuple(f"<n_{d}>" for d in range(10)) and not table.unit_is_text.any()
    assert table.codes.shape == (250, 3) and (table.codes >= 0).all()
    numbers = sorted(int("".join(str(c) for c in row)) for row in table.codes)
    assert numbers == list(range(250))
    assert not np.array_equal(table.codes, build_identifiers(keys, "numeric", seed=4).codes)
    in_order = build_identifiers(keys, "numeric", shuffle=False)
    assert "".join(map(str, in_order.codes[249])) == "249"


def test_numeric_cluster_order_follows_the_features_and_arbitrary_order_stays_available():
    embeddings, labels = clustered(250, 16, 3, seed=1)
    keys = [f"k{i}" for i in range(250)]
    table = build_identifiers(keys, "numeric", embeddings=embeddings, seed=2)
    assert table.options["order"] == "auto" and table.codes.shape == (250, 3)
    numbers = sorted(int("".join(map(str, row))) for row in table.codes)
    assert len(set(numbers)) == 250 and numbers[-1] < 1000
    assert table.content_hash == build_identifiers(keys, "numeric", embeddings=embeddings, seed=2).content_hash
    assert np.array_equal(table.codes, build_identifiers(keys, "numeric", embeddings=embeddings, seed=2,
                                                         order="clusters").codes)

    def pure_first_digits(codes: np.ndarray) -> int:
        """How many first-digit prefixes hold images of a single cluster."""
        return sum(len(set(labels[codes[:, 0] == digit])) == 1 for digit in np.unique(codes[:, 0]))

    # Every first-digit prefix is a cluster of similar images (the digit trie is a cluster tree) ...
    assert pure_first_digits(table.codes) == len(np.unique(table.codes[:, 0])) >= 3
    # ... where GRACE's arbitrary order, still an option (and the default without embeddings), mixes them.
    arbitrary = build_identifiers(keys, "numeric", embeddings=embeddings, seed=2, order="arbitrary")
    assert np.array_equal(arbitrary.codes, build_identifiers(keys, "numeric", seed=2).codes)
    assert pure_first_digits(arbitrary.codes) == 0


def test_numeric_cluster_order_respects_each_digit_capacity():
    # One tight cluster of 1000 images must still fill 000..999: no first digit may take more than 100.
    embeddings = np.random.default_rng(0).normal(scale=1e-3, size=(1000, 4)).astype(np.float32)
    embeddings[:5] += 100.0
    table = build_identifiers([f"k{i}" for i in range(1000)], "numeric", embeddings=embeddings, order="clusters")
    assert_valid_unique(table, 1000)
    assert table.codes.shape == (1000, 3) and (np.bincount(table.codes[:, 0], minlength=10) == 100).all()
    assert len(set(table.codes[:5, 0])) == 1  # the five outliers share a prefix
    with pytest.raises(ValueError, match=r"numeric order 'clusters' needs embeddings: a float array of shape \(3, D\)"):
        build_identifiers(["a", "b", "c"], "numeric", order="clusters")


def test_string_uses_text_pieces_of_the_shuffled_index(word_tokenizer):
    keys = [f"k{i}" for i in range(30)]
    numeric = build_identifiers(keys, "numeric", seed=1, shuffle=True)
    table = build_identifiers(keys, "string", seed=1, text_tokenizer=word_tokenizer)
    assert table.unit_is_text.all()
    for row, digits in zip(spelled(table), numeric.codes):
        assert "".join(piece.removeprefix("##") for piece in row) == str(int("".join(map(str, digits))))


def test_string_follows_the_numeric_cluster_order_zero_padded(word_tokenizer):
    """With embeddings, string identifiers spell numeric's cluster-order index at a fixed width, so every piece
    boundary is a digit prefix (a cluster); GRACE's arbitrary order stays available and unpadded."""
    embeddings, _ = clustered(120, 16, 3, seed=1)
    keys = [f"k{i}" for i in range(120)]
    numeric = build_identifiers(keys, "numeric", embeddings=embeddings, seed=2)
    table = build_identifiers(keys, "string", embeddings=embeddings, seed=2, text_tokenizer=word_tokenizer)
    assert table.options["order"] == "auto"
    for row, digits in zip(spelled(table), numeric.codes):
        assert "".join(piece.removeprefix("##") for piece in row) == "".join(map(str, digits))
    arbitrary = build_identifiers(keys, "string", embeddings=embeddings, seed=2, text_tokenizer=word_tokenizer,
                                  order="arbitrary")
    assert spelled(arbitrary) == spelled(build_identifiers(keys, "string", seed=2, text_tokenizer=word_tokenizer))
    with pytest.raises(ValueError, match=r"string order 'clusters' needs embeddings"):
        build_identifiers(keys, "string", seed=2, text_tokenizer=word_tokenizer, order="clusters")


def test_semantic_first_caption_truncated_and_transformers_tokenizer_agrees(word_tokenizer):
    captions = ["a red circle left of the blue square above a green triangle", ["the small square", "ignored"]]
    table = build_identifiers(["x", "y"], "semantic", captions=captions, text_tokenizer=word_tokenizer, max_length=4)
    assert spelled(table) == [["a", "red", "circle", "left"], ["the", "small", "square"]]
    assert table.unit_is_text.all() and table.unit_vectors is None
    fast = PreTrainedTokenizerFast(tokenizer_object=word_tokenizer, unk_token="[UNK]")
    via_transformers = build_identifiers(["x", "y"], "semantic", captions=captions, text_tokenizer=fast, max_length=4)
    assert spelled(via_transformers) == spelled(table)


def test_semantic_collisions_suffix_every_member_in_key_order(word_tokenizer):
    captions = ["a red circle", "the blue square", "a red circle", "a red circle"]
    table = build_identifiers(list("abcd"), "semantic", captions=captions, text_tokenizer=word_tokenizer)
    assert spelled(table) == [
        ["a", "red", "circle", "<u_0>"], ["the", "blue", "square"], ["a", "red", "circle", "<u_1>"], ["a", "red", "circle", "<u_2>"],
    ]
    assert table.unit_is_text.tolist() == [True] * 6 + [False] * 3


def test_atomic_one_new_token_per_image():
    table = build_identifiers(["p", "q", "r"], "atomic")
    assert spelled(table) == [["<a_0>"], ["<a_1>"], ["<a_2>"]] and table.options == {"seed": 0}


def test_structured_follows_clusters_and_respects_branching_and_leaf_size():
    embeddings, labels = clustered(300, 16, 3, seed=1)
    table = build_identifiers([str(i) for i in range(300)], "structured", embeddings=embeddings, branching=3, leaf_size=7)
    rows = spelled(table)
    assert all(unit.startswith(f"<s{level}_") for row in rows for level, unit in enumerate(row))
    first = np.array([row[0] for row in rows])
    # The top split recovers the three well-separated clusters exactly.
    assert all(len(set(first[labels == c])) == 1 for c in range(3)) and len(set(first)) == 3
    leaves: dict[tuple, int] = {}
    for row in rows:
        leaves[tuple(row[:-1])] = leaves.get(tuple(row[:-1]), 0) + 1
        assert all(int(unit.split("_")[1].rstrip(">")) < 7 for unit in row)
    assert max(leaves.values()) <= 7
    # A unit vector is the mean embedding of the images whose identifiers use it.
    unit = table.units.index(rows[0][0])
    members = [i for i, row in enumerate(rows) if row[0] == rows[0][0]]
    np.testing.assert_allclose(table.unit_vectors[unit], embeddings[members].mean(axis=0), rtol=1e-5, atol=1e-5)


def test_coarse_fine_residual_kmeans_layout_vectors_and_reconstruction():
    embeddings, _ = clustered(400, 12, 6, seed=2)
    table = build_identifiers(
        [str(i) for i in range(400)], "coarse_fine", embeddings=embeddings, num_coarse=6, codebook_size=16, num_levels=3,
        fine_quantizer="residual_kmeans",
    )
    for row in spelled(table):
        assert row[0].startswith("<c_") and [unit[:3] for unit in row[1:4]] == ["<f1", "<f2", "<f3"]
        assert len(row) == 4 or (len(row) == 5 and row[4].startswith("<u_"))
    vectors = table.unit_vectors
    suffix = np.array([unit.startswith("<u_") for unit in table.units])
    assert np.isnan(vectors[suffix]).all() and np.isfinite(vectors[~suffix]).all()
    coarse_only = vectors[table.codes[:, 0]]
    reconstruction = vectors[table.codes[:, :4]].sum(axis=1)
    error_coarse = ((embeddings - coarse_only) ** 2).sum(axis=1).mean()
    error_fine = ((embeddings - reconstruction) ** 2).sum(axis=1).mean()
    assert error_fine < 0.6 * error_coarse
    # Every image sits with its nearest coarse centroid.
    coarse_units = np.flatnonzero([unit.startswith("<c_") for unit in table.units])
    nearest = ((embeddings[:, None, :] - vectors[coarse_units][None]) ** 2).sum(-1).argmin(axis=1)
    assert np.array_equal(coarse_units[nearest], table.codes[:, 0])


def test_coarse_fine_rqvae_deterministic_and_leaves_global_state_alone():
    embeddings, _ = clustered(64, 6, 3, seed=3)
    keys = [str(i) for i in range(64)]
    threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    table = build_identifiers(keys, "coarse_fine", embeddings=embeddings, seed=5, **TINY_RQVAE)
    assert torch.equal(torch.rand(3), expected_next) and torch.get_num_threads() == threads
    assert faiss.omp_get_max_threads() == faiss_threads
    assert not torch.are_deterministic_algorithms_enabled()
    again = build_identifiers(keys, "coarse_fine", embeddings=embeddings, seed=5, **TINY_RQVAE)
    assert_valid_unique(table, 64)
    assert table.content_hash == again.content_hash and table.options["fine_quantizer"] == "rqvae"
    fine_units = [i for i, unit in enumerate(table.units) if unit.startswith("<f")]
    assert np.isfinite(table.unit_vectors[fine_units]).all()


# ----------------------------------------------------------------------------- degenerate data


@pytest.mark.parametrize("id_type", ID_TYPES)
def test_single_image(id_type, word_tokenizer):
    table = build_each(id_type, ["only"], np.zeros((1, 3), np.float32), ["a circle"], word_tokenizer)
    assert_valid_unique(table, 1)


@pytest.mark.parametrize("id_type", ["structured", "coarse_fine"])
def test_identical_embeddings_and_more_branches_than_images(id_type):
    keys = [str(i) for i in range(70)]
    identical = np.ones((70, 4), np.float32)
    options = dict(branching=100, leaf_size=3) if id_type == "structured" else dict(num_coarse=100, codebook_size=100, rqvae_epochs=2)
    assert_valid_unique(build_identifiers(keys, id_type, embeddings=identical, **options), 70)
    assert_valid_unique(build_identifiers(keys[:5], id_type, embeddings=identical[:5], **options), 5)


# Few distinct values make duplicate rows (degenerate data) common; the float range covers random data.
small_floats = st.one_of(st.sampled_from([-1.0, 0.0, 0.5, 1.0, 3.0]), st.floats(-100, 100, width=32))


@st.composite
def embedding_sets(draw):
    num_items = draw(st.integers(1, 40))
    dim = draw(st.integers(1, 4))
    values = draw(st.lists(small_floats, min_size=num_items * dim, max_size=num_items * dim))
    return np.array(values, np.float32).reshape(num_items, dim)


@PROPERTY_SETTINGS
@given(embeddings=embedding_sets(), branching=st.integers(2, 6), leaf_size=st.integers(1, 5), seed=st.integers(0, 3))
def test_structured_always_unique(embeddings, branching, leaf_size, seed):
    keys = [f"k{i}" for i in range(len(embeddings))]
    table = build_identifiers(keys, "structured", embeddings=embeddings, seed=seed, branching=branching, leaf_size=leaf_size)
    assert_valid_unique(table, len(keys))


@PROPERTY_SETTINGS
@given(embeddings=embedding_sets(), seed=st.integers(0, 3))
def test_numeric_cluster_order_always_unique(embeddings, seed):
    keys = [f"k{i}" for i in range(len(embeddings))]
    table = build_identifiers(keys, "numeric", embeddings=embeddings, seed=seed)
    assert_valid_unique(table, len(keys))
    assert table.codes.shape == (len(keys), len(str(len(keys) - 1)))


@PROPERTY_SETTINGS
@given(
    embeddings=embedding_sets(), num_coarse=st.integers(1, 6), codebook_size=st.integers(1, 6), num_levels=st.integers(1, 3),
    fine_quantizer=st.sampled_from(["residual_kmeans", "rqvae"]),
)
def test_coarse_fine_always_unique(embeddings, num_coarse, codebook_size, num_levels, fine_quantizer):
    keys = [f"k{i}" for i in range(len(embeddings))]
    table = build_identifiers(
        keys, "coarse_fine", embeddings=embeddings, num_coarse=num_coarse, codebook_size=codebook_size, num_levels=num_levels,
        fine_quantizer=fine_quantizer, rqvae_epochs=2, rqvae_hidden_dim=8, rqvae_latent_dim=4,
    )
    assert_valid_unique(table, len(keys))
    assert table.codes.shape[1] in (1 + num_levels, 2 + num_levels)


@PROPERTY_SETTINGS
@given(captions=st.lists(st.lists(st.sampled_from(WORDS + ["zebra"]), min_size=1, max_size=6).map(" ".join), min_size=1, max_size=30), max_length=st.integers(1, 4))
def test_semantic_always_unique(captions, max_length, word_tokenizer):
    keys = [f"k{i}" for i in range(len(captions))]
    table = build_identifiers(keys, "semantic", captions=captions, text_tokenizer=word_tokenizer, max_length=max_length)
    assert_valid_unique(table, len(keys))
    assert table.codes.shape[1] <= max_length + 1


@PROPERTY_SETTINGS
@given(num_items=st.integers(1, 300), seed=st.integers(0, 2**31 - 1), id_type=st.sampled_from(["numeric", "string", "atomic"]))
def test_index_types_always_unique(num_items, seed, id_type, word_tokenizer):
    options = {"text_tokenizer": word_tokenizer} if id_type == "string" else {}
    table = build_identifiers([f"k{i}" for i in range(num_items)], id_type, seed=seed, **options)
    assert_valid_unique(table, num_items)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "keys, message",
    [
        (["a", "b", "a"], "duplicate key 'a' at rows 0 and 2"),
        (["a", ""], "key at row 1 is empty"),
        ([], "keys is empty"),
        (["a", 3], "key at row 1 must be a string"),
        ("abc", "keys must be a sequence of strings"),
    ],
)
def test_bad_keys(keys, message):
    with pytest.raises(ValueError, match=message):
        build_identifiers(keys, "atomic")


@pytest.mark.parametrize(
    "embeddings, message",
    [
        (np.array([[0.0, np.nan], [1.0, 1.0], [2.0, 2.0]]), "row 0 holds NaN or inf"),
        (np.array([[0.0, 1.0], [1.0, np.inf], [2.0, 2.0]]), "row 1 holds NaN or inf"),
        (np.zeros(3), r"shape \(num_keys, dim\) = \(3, D\), got \(3,\)"),
        (np.zeros((3, 2, 2)), r"got \(3, 2, 2\)"),
        (np.zeros((4, 2)), "embeddings has 4 rows for 3 keys"),
        (np.array([["a", "b"]] * 3), "embeddings must be numbers"),
        (np.array([[0.0, 1e20]] * 3), "beyond"),
    ],
)
@pytest.mark.parametrize("id_type", ["structured", "coarse_fine"])
def test_bad_embeddings(embeddings, message, id_type):
    with pytest.raises(ValueError, match=message):
        build_identifiers(["a", "b", "c"], id_type, embeddings=embeddings)


@pytest.mark.parametrize("id_type", ["structured", "coarse_fine"])
def test_embedding_types_need_embeddings(id_type):
    with pytest.raises(ValueError, match=f"id_type '{id_type}' needs embeddings"):
        build_identifiers(["a"], id_type)


def test_semantic_needs_captions_and_tokenizer(word_tokenizer):
    with pytest.raises(ValueError, match="'semantic' needs captions"):
        build_identifiers(["a"], "semantic", text_tokenizer=word_tokenizer)
    with pytest.raises(ValueError, match="needs the option text_tokenizer="):
        build_identifiers(["a"], "semantic", captions=["a circle"])
    with pytest.raises(ValueError, match="needs the option text_tokenizer="):
        build_identifiers(["a"], "string")
    with pytest.raises(ValueError, match="text_tokenizer must be a transformers tokenizer"):
        build_identifiers(["a"], "string", text_tokenizer="bert-base-uncased")


@pytest.mark.parametrize(
    "captions, message",
    [
        (["a circle"], r"one entry per key \(2\), got 1 entries"),
        ("a circle", "got a single string"),
        (["a circle", "   "], r"first caption of row 1 \(key 'b'\) is empty"),
        (["a circle", []], r"captions of row 1 \(key 'b'\) must be a string or a non-empty list"),
        (["a circle", [7]], r"first caption of row 1 \(key 'b'\) is empty or not a string"),
    ],
)
def test_bad_captions(captions, message, word_tokenizer):
    with pytest.raises(ValueError, match=message):
        build_identifiers(["a", "b"], "semantic", captions=captions, text_tokenizer=word_tokenizer)


def test_unknown_id_type_and_options():
    with pytest.raises(ValueError, match="unknown id_type 'hashed'; expected one of numeric, string, semantic"):
        build_identifiers(["a"], "hashed")
    with pytest.raises(ValueError, match="unknown option 'branches' for id_type 'structured'; valid options: branching, leaf_size"):
        build_identifiers(["a"], "structured", embeddings=np.zeros((1, 2)), branches=4)
    with pytest.raises(ValueError, match=r"unknown option 'shuffle' for id_type 'atomic'; valid options: \(none\)"):
        build_identifiers(["a"], "atomic", shuffle=True)


@pytest.mark.parametrize(
    "id_type, options, message",
    [
        ("structured", {"branching": 1}, "option 'branching' must be >= 2, got 1"),
        ("structured", {"leaf_size": "30"}, "option 'leaf_size' must be int"),
        ("structured", {"leaf_size": True}, "option 'leaf_size' must be int"),
        ("coarse_fine", {"fine_quantizer": "pq"}, "option 'fine_quantizer' must be one of"),
        ("coarse_fine", {"num_levels": 0}, "option 'num_levels' must be >= 1"),
        ("numeric", {"shuffle": 1}, "option 'shuffle' must be bool"),
        ("numeric", {"order": "sorted"}, "option 'order' must be one of"),
    ],
)
def test_bad_option_values(id_type, options, message):
    with pytest.raises(ValueError, match=message):
        build_identifiers(["a"], id_type, embeddings=np.zeros((1, 2)), **options)


@pytest.mark.parametrize("seed", [-1, 2**31, 1.5, True])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match="seed must be an integer"):
        build_identifiers(["a"], "numeric", seed=seed)


def test_options_classes_document_every_field():
    for options_class in OPTIONS_CLASSES.values():
        assert options_class.__doc__
        for spec in options_class.__dataclass_fields__.values():
            assert spec.metadata["help"]
