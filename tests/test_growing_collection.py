"""Collections that grow and shrink (issue 10): `model.add_images` / `model.remove_images` on tiny real models.

Every id type gets new identifiers by its own rules; an added image is found by its own feature at once; removed
images never come back (plain search, rerank, hybrid); edits survive save/load and remote code; every bad input
raises a clear error and changes nothing (state dict, table hash, signature, trie).
"""
from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch
from conftest import synthetic_captions
from subprocess_utils import run_without_package

from modeling_gcmr import GcmrConfig, GcmrForRetrieval
from tokenization_gcmr import ImageIdTokenizer, build_identifiers

DIM = 8
NUM_OLD, NUM_NEW = 24, 8
HEAD_TYPES = {
    "coarse_fine": dict(num_coarse=4, num_levels=2, codebook_size=4, fine_quantizer="residual_kmeans"),
    "coarse_fine_rqvae": dict(num_coarse=4, num_levels=2, codebook_size=4, rqvae_epochs=2, rqvae_hidden_dim=8,
                              rqvae_latent_dim=4),
    "structured": dict(branching=3, leaf_size=4),
    "atomic": {},
    "numeric": {},
    "string": {},  # text pieces, through the identifier head like the others
    "semantic": {},
}
TEXT_TYPES = ("string", "semantic")


def _features(count: int, seed: int) -> np.ndarray:
    features = np.random.default_rng(seed).normal(size=(count, DIM)).astype(np.float32)
    return features / np.linalg.norm(features, axis=1, keepdims=True)


OLD, NEW = _features(NUM_OLD, 0), _features(NUM_NEW, 1)
OLD_KEYS = [f"old{i}" for i in range(NUM_OLD)]
NEW_KEYS = [f"new{i}" for i in range(NUM_NEW)]
CAPTIONS = synthetic_captions(NUM_OLD + NUM_NEW, seed=7)


def _pair(id_type: str, text_tokenizer, store_features: bool = False,
          head: str | None = None) -> tuple[GcmrForRetrieval, ImageIdTokenizer]:
    options = dict(HEAD_TYPES.get(id_type, {}))
    if id_type in TEXT_TYPES:
        options["text_tokenizer"] = text_tokenizer
    table = build_identifiers(OLD_KEYS, id_type.removesuffix("_rqvae"), embeddings=OLD, captions=CAPTIONS[:NUM_OLD],
                              seed=0, **options)
    tokenizer = ImageIdTokenizer(text_tokenizer, table)
    torch.manual_seed(0)
    config = GcmrConfig(text_config=dict(model_type="t5", vocab_size=tokenizer.num_text_tokens, d_model=16, d_ff=32,
                                         d_kv=4, num_heads=4, num_layers=1), image_embed_dim=DIM,
                        identifier_head=head)
    model = GcmrForRetrieval(config)
    if head == "text":
        model.set_identifier_vocabulary(tokenizer, init="random")
    else:
        model.set_identifier_vocabulary(tokenizer, init="dense", image_embeds=OLD)
        if store_features:
            model.store_image_features(OLD)
    return model.eval(), tokenizer


def _image_hits(model, tokenizer, features, top_k=1, num_beams=5, **kwargs) -> list[list[str]]:
    hits = model.retrieve(tokenizer=tokenizer, image_embeds=features, top_k=top_k, num_beams=max(top_k, num_beams),
                          **kwargs)
    return [[key for key, _ in row] for row in hits]


def _snapshot(model, tokenizer) -> dict:
    return {
        "state": {name: value.clone() for name, value in model.state_dict().items()},
        "config": model.config.to_json_string(),
        "hash": tokenizer.identifier_table.content_hash,
        "signature": tokenizer.identifier_signature,
        "vocab": len(tokenizer),
        "live": tokenizer.prefix_trie.num_identifiers,
        "rows": tokenizer.identifier_token_rows.copy(),
    }


def _assert_unchanged(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    for name, value in before["state"].items():
        assert torch.equal(value, after["state"][name]), name
    for name in ("config", "hash", "signature", "vocab", "live"):
        assert before[name] == after[name], name
    np.testing.assert_array_equal(before["rows"], after["rows"])


# ------------------------------------------------------------------------------------------------- adding
@pytest.mark.parametrize("id_type", list(HEAD_TYPES))
def test_an_added_image_is_found_by_its_own_feature_at_once(id_type, text_tokenizer):
    model, tokenizer = _pair(id_type, text_tokenizer)
    signature, table_hash = tokenizer.identifier_signature, tokenizer.identifier_table.content_hash
    model.add_images(NEW_KEYS, tokenizer, image_embeds=NEW, captions=CAPTIONS[NUM_OLD:])
    # Text-piece paths group images by their spelling, not their features: only a beam over every identifier
    # makes the search exact (it is, with it: every path sums to its image's feature).
    beams = NUM_OLD + NUM_NEW if id_type in TEXT_TYPES else 5
    assert _image_hits(model, tokenizer, NEW, num_beams=beams) == [[key] for key in NEW_KEYS]
    # the old images keep their identifiers and are still found first by their own features
    assert _image_hits(model, tokenizer, OLD, num_beams=beams) == [[key] for key in OLD_KEYS]
    assert tokenizer.keys == tuple(OLD_KEYS + NEW_KEYS)
    assert [tokenizer.key_for(tokenizer.identifier_ids(key)) for key in NEW_KEYS] == NEW_KEYS
    assert model.config.num_identifiers == len(tokenizer.keys)
    assert model.config.num_identifier_edges == tokenizer.prefix_trie.num_edges
    assert tokenizer.identifier_signature != signature and tokenizer.identifier_table.content_hash != table_hash
    assert model.config.identifier_signature == tokenizer.identifier_signature


@pytest.mark.parametrize("id_type", ["coarse_fine", "structured", "numeric", "semantic"])
def test_an_add_appends_edge_vectors_and_search_still_scores_each_identifier_by_its_path(id_type, text_tokenizer):
    model, tokenizer = _pair(id_type, text_tokenizer)
    head = model.identifier_head
    with torch.no_grad():  # a trained model's vectors no longer sum to the features
        head.edge_vectors.add_(0.3 * torch.randn(head.edge_vectors.shape, generator=torch.Generator().manual_seed(3)))
    old_vectors = head.edge_vectors.detach().clone()
    model.add_images(NEW_KEYS, tokenizer, image_embeds=NEW, captions=CAPTIONS[NUM_OLD:], placement="centroids")
    # the old rows stay where they were; the rebuilt trie numbers its edges otherwise, and the head maps them
    assert torch.equal(head.edge_vectors[: len(old_vectors)], old_vectors)
    rows = head.edge_rows(tokenizer.prefix_trie)
    assert rows is not None and sorted(rows.tolist()) == list(range(tokenizer.prefix_trie.num_edges))
    # an exhaustive beam returns every identifier scored by the sum of its own path's vectors (`paths`, which
    # training uses), whatever numbering the trie walks in
    everything = NUM_OLD + NUM_NEW
    queries = torch.as_tensor(np.concatenate([OLD[:3], NEW[:3]]))
    hits = model.retrieve(tokenizer=tokenizer, image_embeds=queries, top_k=everything, num_beams=everything)
    with torch.no_grad():
        base = model.encode(image_embeds=queries).query_vectors
        paths = head.paths.long()
        sums = (head.edge_vectors[paths.clamp(min=0)] * (paths >= 0)[..., None]).sum(dim=1)
        want = head.scale * base @ sums.T
    for row, query_hits in enumerate(hits):
        assert len(query_hits) == everything
        got = {tokenizer.keys.index(key): score for key, score in query_hits}
        np.testing.assert_allclose([got[i] for i in range(everything)], want[row].numpy(), rtol=1e-4, atol=1e-4)


def test_later_adds_grow_the_tables_in_place_as_a_copy_would(text_tokenizer, tmp_path):
    """The first add copies the edge vectors and stored features into buffers with room to spare; later adds write
    into that room: same values as copying every time, and nothing a caller holds from before changes."""
    grown, tokenizer = _pair("coarse_fine", text_tokenizer, store_features=True)
    copied, twin_tokenizer = _pair("coarse_fine", text_tokenizer, store_features=True)

    def tables(model) -> list[torch.Tensor]:
        return [model.identifier_head.edge_vectors, model.image_features]

    for first, batch in ((0, 3), (3, 2), (5, 3)):
        keys, features = NEW_KEYS[first : first + batch], NEW[first : first + batch]
        held = [table.detach() for table in tables(grown)]
        held_values = [table.clone() for table in held]
        pointers = [table.data_ptr() for table in held]
        grown.add_images(keys, tokenizer, image_embeds=features)
        for table in tables(copied):  # a table without its mark is copied, as before this change
            table.__dict__.clear()
        copied_pointers = [table.data_ptr() for table in tables(copied)]
        copied.add_images(keys, twin_tokenizer, image_embeds=features)
        in_place = [table.data_ptr() for table in tables(grown)] == pointers
        assert in_place == (first > 0)
        assert all(table.data_ptr() != pointer for table, pointer in zip(tables(copied), copied_pointers))
        for mine, twin in zip(tables(grown), tables(copied)):
            assert torch.equal(mine, twin)
        for table, values in zip(held, held_values):
            assert torch.equal(table, values)
    assert _image_hits(grown, tokenizer, NEW) == [[key] for key in NEW_KEYS]
    # The checkpoint holds the rows the model sees, not the room after them.
    grown.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = GcmrForRetrieval.from_pretrained(tmp_path)
    for mine, saved in zip(tables(grown), tables(loaded)):
        assert saved.shape == mine.shape and torch.equal(saved, mine.detach())
    # A loaded checkpoint's tensors may share one memory-mapped file: its first add copies, writing nothing past them.
    before = {name: value.clone() for name, value in loaded.state_dict().items()}
    loaded.add_images(["later"], ImageIdTokenizer.from_pretrained(tmp_path), image_embeds=_features(1, 9))
    for name, value in loaded.state_dict().items():
        assert torch.equal(value[: len(before[name])] if value.ndim else value, before[name]), name


def test_identifiers_follow_their_id_types_rules(text_tokenizer):
    model, tokenizer = _pair("atomic", text_tokenizer)
    model.add_images(["a", "b"], tokenizer, image_embeds=NEW[:2])
    assert tokenizer.convert_ids_to_tokens(tokenizer.identifier_ids("b")) == [f"<a_{NUM_OLD + 1}>"]
    model, tokenizer = _pair("numeric", text_tokenizer)
    model.add_images(["a"], tokenizer, image_embeds=NEW[:1])
    assert tokenizer.convert_ids_to_tokens(tokenizer.identifier_ids("a")) == ["<n_2>", "<n_4>"]  # row 24
    model, tokenizer = _pair("coarse_fine", text_tokenizer)
    twin = OLD[:1] + 1e-4  # the codes of an existing image: a uniqueness token sets it apart
    model.add_images(["twin"], tokenizer, image_embeds=twin)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.identifier_ids("twin"))
    assert tokens[-1].startswith("<u_") and tokens[:-1] == tokenizer.convert_ids_to_tokens(
        tokenizer.identifier_ids(OLD_KEYS[0]))[: len(tokens) - 1]
    assert _image_hits(model, tokenizer, twin, top_k=2)[0][0] in ("twin", OLD_KEYS[0])


def test_a_repeated_identifier_takes_the_first_uniqueness_token_free_below_it(text_tokenizer):
    """A `<u_j>` is free below an identifier's codes unless an identifier, removed ones included, uses it there."""
    same, other = CAPTIONS[0], CAPTIONS[1]
    table = build_identifiers(list("abcd"), "semantic", captions=[same, other, same, same],
                              text_tokenizer=text_tokenizer)
    tokenizer = ImageIdTokenizer(text_tokenizer, table)

    def last_unit(key: str) -> str:
        return tokenizer.convert_ids_to_tokens(tokenizer.identifier_ids(key))[-1]

    assert [last_unit(key) for key in "acd"] == ["<u_0>", "<u_1>", "<u_2>"] and not last_unit("b").startswith("<u_")
    tokenizer.apply_edit(tokenizer.prepare_remove(["c"]))
    tokenizer.apply_edit(tokenizer.prepare_add(list("efg"), captions=[same, other, same]))
    # e's bare caption is no identifier yet (a, c and d carry suffixes); g repeats e within the call and finds
    # c's <u_1> still taken (its row stays in the table); below the other caption <u_0> is free.
    assert not last_unit("e").startswith("<u_") and [last_unit(key) for key in "fg"] == ["<u_0>", "<u_3>"]


def test_coarse_fine_placement_by_the_model_or_by_the_centroids(text_tokenizer):
    model, tokenizer = _pair("coarse_fine", text_tokenizer)
    top = [row[0] for row in _image_hits(model, tokenizer, NEW)]
    model.add_images(NEW_KEYS, tokenizer, image_embeds=NEW)  # placement="model": under the model's first hit
    for key, neighbor in zip(NEW_KEYS, top):
        mine, theirs = tokenizer.identifier_ids(key), tokenizer.identifier_ids(neighbor)
        assert mine[: len(theirs) - 1] == theirs[: len(theirs) - 1]
    model, tokenizer = _pair("coarse_fine", text_tokenizer)
    model.add_images(NEW_KEYS, tokenizer, image_embeds=NEW, placement="centroids")
    table = tokenizer.identifier_table
    coarse = [unit for unit in table.units if unit.startswith("<c_")]
    centroids = table.unit_vectors[[table.units.index(unit) for unit in coarse]]
    nearest = np.argmin(((NEW[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert [tokenizer.convert_ids_to_tokens(tokenizer.identifier_ids(key))[0] for key in NEW_KEYS] == [
        coarse[index] for index in nearest]
    assert _image_hits(model, tokenizer, NEW) == [[key] for key in NEW_KEYS]


@pytest.mark.parametrize("id_type", TEXT_TYPES)
def test_text_head_types_grow_the_vocabulary_and_stay_on_the_trie(id_type, text_tokenizer):
    model, tokenizer = _pair(id_type, text_tokenizer, head="text")
    model.add_images(NEW_KEYS, tokenizer, captions=CAPTIONS[NUM_OLD:])
    assert model.vocab_size == len(tokenizer)
    assert [tokenizer.key_for(tokenizer.identifier_ids(key)) for key in NEW_KEYS] == NEW_KEYS
    hits = model.retrieve(CAPTIONS[:4], tokenizer, top_k=5, num_beams=5)
    assert all(key in tokenizer.current_keys for row in hits for key, _ in row)
    model.remove_images(NEW_KEYS[:2], tokenizer)
    hits = model.retrieve(CAPTIONS[NUM_OLD:], tokenizer, top_k=10, num_beams=10)
    assert not {key for row in hits for key, _ in row} & set(NEW_KEYS[:2])


@pytest.mark.parametrize("head", [None, "text"])
def test_semantic_identifiers_need_captions(text_tokenizer, head):
    model, tokenizer = _pair("semantic", text_tokenizer, head=head)
    before = _snapshot(model, tokenizer)
    with pytest.raises(ValueError, match="pass captions="):
        model.add_images(NEW_KEYS, tokenizer, image_embeds=NEW)
    _assert_unchanged(before, _snapshot(model, tokenizer))


# ------------------------------------------------------------------------------------------------- removing
@pytest.mark.parametrize("id_type", ["coarse_fine", "structured", "atomic"])
def test_removed_images_never_come_back(id_type, text_tokenizer):
    model, tokenizer = _pair(id_type, text_tokenizer, store_features=True)
    model.add_images(NEW_KEYS, tokenizer, image_embeds=NEW)
    torch.testing.assert_close(model.stored_image_features[NUM_OLD:], torch.as_tensor(NEW))
    gone = OLD_KEYS[::3] + NEW_KEYS[:3]
    model.remove_images(gone[:4], tokenizer)
    model.remove_images(gone[4:], tokenizer)
    assert set(tokenizer.removed_keys) == set(gone)
    assert set(tokenizer.current_keys) == set(OLD_KEYS + NEW_KEYS) - set(gone)
    live = len(tokenizer.current_keys)
    assert tokenizer.prefix_trie.num_identifiers == live
    queries = np.random.default_rng(3).normal(size=(2000, DIM)).astype(np.float32)
    for rerank in (None, "features", "hybrid"):
        hits = _image_hits(model, tokenizer, queries if rerank is None else queries[:300], top_k=5, rerank=rerank,
                           batch_size=500)
        assert {key for row in hits for key in row} <= set(tokenizer.current_keys), rerank
    # asking for every identifier returns exactly the live ones
    everything = _image_hits(model, tokenizer, queries[:3], top_k=100)
    assert all(sorted(row) == sorted(tokenizer.current_keys) for row in everything)
    # a removed image's own feature finds something else; its identifier is no longer one
    assert all(row[0] not in gone for row in _image_hits(model, tokenizer, OLD[::3]))
    assert tokenizer.key_for(tokenizer.identifier_token_rows[0][tokenizer.identifier_token_rows[0] >= 0]) is None
    with pytest.raises(KeyError, match="was removed"):
        tokenizer.encode_identifiers([gone[0]])


@pytest.mark.parametrize("id_type", [*HEAD_TYPES, *TEXT_TYPES])
def test_an_emptied_collection_is_refilled(id_type, text_tokenizer):
    """Issue 17: add_images after removing every image failed (torch.linalg.solve: singular) with stored features."""
    model, tokenizer = _pair(id_type, text_tokenizer, store_features=id_type not in TEXT_TYPES)
    model.remove_images(OLD_KEYS, tokenizer)
    assert list(tokenizer.current_keys) == [] and tokenizer.prefix_trie.num_identifiers == 0
    captions = dict(captions=CAPTIONS[NUM_OLD:NUM_OLD + 3]) if id_type in TEXT_TYPES else {}
    model.add_images(NEW_KEYS[:3], tokenizer, image_embeds=NEW[:3], **captions)
    assert list(tokenizer.current_keys) == NEW_KEYS[:3] and tokenizer.prefix_trie.num_identifiers == 3
    if id_type not in TEXT_TYPES:
        assert _image_hits(model, tokenizer, NEW[:3]) == [[key] for key in NEW_KEYS[:3]]
        torch.testing.assert_close(model.stored_image_features[NUM_OLD:], torch.as_tensor(NEW[:3]))
    hits = model.retrieve(CAPTIONS[:2], tokenizer, top_k=5)
    assert all(row and {key for key, _ in row} <= set(NEW_KEYS[:3]) for row in hits)


def test_a_rebuilt_trie_kills_the_same_edges_as_the_edited_one(text_tokenizer):
    model, tokenizer = _pair("coarse_fine", text_tokenizer)
    model.remove_images(OLD_KEYS[:5], tokenizer)
    model.add_images(NEW_KEYS, tokenizer, image_embeds=NEW)
    model.remove_images(NEW_KEYS[:2], tokenizer)
    edited = tokenizer.prefix_trie
    rebuilt = ImageIdTokenizer(text_tokenizer, tokenizer.identifier_table).prefix_trie
    np.testing.assert_array_equal(edited.live_below, rebuilt.live_below)
    assert edited.num_identifiers == rebuilt.num_identifiers == NUM_OLD + NUM_NEW - 7


# ------------------------------------------------------------------------------------------------- bad input
def _bad_calls(other_tokenizer):
    wide = np.ones((1, DIM + 1), np.float32)
    nan = NEW[:1].copy()
    nan[0, 2] = np.nan
    return [
        ("duplicate key in the call", lambda m, t: m.add_images(["x", "x"], t, image_embeds=NEW[:2]), "duplicate key"),
        ("key already present", lambda m, t: m.add_images([OLD_KEYS[1]], t, image_embeds=NEW[:1]), "already in"),
        ("removed key added again", lambda m, t: m.add_images([OLD_KEYS[0]], t, image_embeds=NEW[:1]),
         "was removed"),
        ("wrong width", lambda m, t: m.add_images(["x"], t, image_embeds=wide), r"shape \(1, 8\)"),
        ("NaN feature", lambda m, t: m.add_images(["x"], t, image_embeds=nan), "NaN or inf"),
        ("rows do not match keys", lambda m, t: m.add_images(["x", "y"], t, image_embeds=NEW[:1]), "one row per key"),
        ("no features", lambda m, t: m.add_images(["x"], t), "needs the new images"),
        ("a bare string", lambda m, t: m.add_images("x", t, image_embeds=NEW[:1]), "list of image keys"),
        ("empty key", lambda m, t: m.add_images([" "], t, image_embeds=NEW[:1]), "non-empty string"),
        ("unknown key", lambda m, t: m.remove_images(["nope"], t), "unknown key"),
        ("removed twice", lambda m, t: m.remove_images([OLD_KEYS[0]], t), "already removed"),
        ("removed twice in one call", lambda m, t: m.remove_images([OLD_KEYS[2], OLD_KEYS[2]], t), "duplicate key"),
        ("no keys", lambda m, t: m.remove_images([], t), "remove_images: keys is empty"),
        ("no images", lambda m, t: m.add_images([], t, image_embeds=NEW[:0]),
         "add_images: keys is empty, so no images were given"),
        ("unknown placement", lambda m, t: m.add_images(["x"], t, image_embeds=NEW[:1], placement="dice"),
         "placement must be one of"),
        ("tokenizer of another edit", lambda m, t: m.add_images(["x"], other_tokenizer, image_embeds=NEW[:1]),
         "identifier vocabulary mismatch"),
    ]


def test_every_bad_call_raises_a_clear_error_and_changes_nothing(text_tokenizer, tmp_path):
    model, tokenizer = _pair("coarse_fine", text_tokenizer)
    tokenizer.save_pretrained(tmp_path)
    model.remove_images([OLD_KEYS[0]], tokenizer)
    other = ImageIdTokenizer.from_pretrained(tmp_path)  # before the removal: another edit
    before = _snapshot(model, tokenizer)
    for name, call, message in _bad_calls(other):
        with pytest.raises(ValueError, match=message):
            call(model, tokenizer)
        _assert_unchanged(before, _snapshot(model, tokenizer))
    # and the pair still works
    model.add_images(["x"], tokenizer, image_embeds=NEW[:1])
    assert _image_hits(model, tokenizer, NEW[:1]) == [["x"]]


def test_a_model_and_a_tokenizer_from_different_edits_are_refused(text_tokenizer, tmp_path):
    model, tokenizer = _pair("atomic", text_tokenizer)
    tokenizer.save_pretrained(tmp_path)
    model.add_images(NEW_KEYS, tokenizer, image_embeds=NEW)
    stale = ImageIdTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="identifier vocabulary mismatch"):
        model.retrieve(tokenizer=stale, image_embeds=NEW[:1])
    # the same keys added to a copy give the same signature only with the same codes and order
    signatures, hashes = {tokenizer.identifier_signature}, {tokenizer.identifier_table.content_hash}
    model.remove_images(NEW_KEYS[:1], tokenizer)
    signatures.add(tokenizer.identifier_signature)
    hashes.add(tokenizer.identifier_table.content_hash)
    assert len(signatures) == len(hashes) == 2 and model.config.identifier_signature == tokenizer.identifier_signature


# ------------------------------------------------------------------------------------------------- save / load
def _edited_pair(text_tokenizer):
    model, tokenizer = _pair("coarse_fine", text_tokenizer, store_features=True)
    model.add_images(NEW_KEYS, tokenizer, image_embeds=NEW)
    model.remove_images([OLD_KEYS[0], NEW_KEYS[0]], tokenizer)
    return model, tokenizer


def _scores_match(got, want) -> None:
    assert [[key for key, _ in row] for row in got] == [[key for key, _ in row] for row in want]
    for got_row, want_row in zip(got, want):
        np.testing.assert_allclose([s for _, s in got_row], [s for _, s in want_row], rtol=1e-5, atol=1e-4)


def test_save_and_reload_keep_the_edits(text_tokenizer, tmp_path):
    model, tokenizer = _edited_pair(text_tokenizer)
    queries = np.concatenate([OLD[:4], NEW[:4]])
    before = model.retrieve(tokenizer=tokenizer, image_embeds=queries, top_k=3, num_beams=5, rerank="hybrid")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    header = json.loads((tmp_path / "identifier_table.json").read_text())
    assert header["format_version"] == 2 and header["edit_signature"] == tokenizer.identifier_signature
    loaded_model = GcmrForRetrieval.from_pretrained(tmp_path).eval()
    loaded = ImageIdTokenizer.from_pretrained(tmp_path)
    assert loaded.identifier_signature == tokenizer.identifier_signature
    assert loaded.removed_keys == tokenizer.removed_keys and loaded.keys == tokenizer.keys
    _scores_match(loaded_model.retrieve(tokenizer=loaded, image_embeds=queries, top_k=3, num_beams=5,
                                        rerank="hybrid"), before)
    # the reloaded pair can be edited further
    loaded_model.add_images(["later"], loaded, image_embeds=_features(1, 9))
    assert _image_hits(loaded_model, loaded, _features(1, 9)) == [["later"]]


def test_remote_code_reload_keeps_the_edits(text_tokenizer, tmp_path):
    model, tokenizer = _edited_pair(text_tokenizer)
    queries = np.concatenate([OLD[:4], NEW[:4]])
    before = model.retrieve(tokenizer=tokenizer, image_embeds=queries, top_k=3, num_beams=5)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    after = run_without_package(
        f"""
        import json, torch
        from transformers import AutoModel, AutoTokenizer
        model = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        queries = torch.tensor({queries.tolist()!r})
        hits = model.retrieve(tokenizer=tokenizer, image_embeds=queries, top_k=3, num_beams=5)
        model.add_images(["remote"], tokenizer, image_embeds=queries[:1] * 0.5 + 0.1)
        print(json.dumps({{"hits": hits, "removed": list(tokenizer.removed_keys), "module": type(model).__module__,
                          "remote": tokenizer.key_for(tokenizer.identifier_ids("remote"))}}))
        """,
        cwd=str(tmp_path),
    )
    assert after["module"].startswith("transformers_modules")
    assert sorted(after["removed"]) == sorted(tokenizer.removed_keys) and after["remote"] == "remote"
    _scores_match(after["hits"], json.loads(json.dumps(before)))


# ------------------------------------------------------------------------------------------------- refresh
def _corpus(keys, captions, features, with_pixels=False):
    """A corpus as load_corpus returns it; `with_pixels` adds an `image` column too (a folder whose metadata holds
    features loads with both)."""
    import datasets
    from PIL import Image

    columns = {"image_key": list(keys), "captions": [[c] for c in captions],
               "image_embeds": [row.tolist() for row in features]}
    if with_pixels:
        columns["image"] = [Image.new("RGB", (8, 8), (i % 256, 0, 0)) for i in range(len(columns["image_key"]))]
    return datasets.Dataset.from_dict(columns)


def test_refresh_trains_on_the_new_images_with_replay_of_current_old_ones(text_tokenizer, tmp_path):
    from modeling_gcmr.training.arguments import GcmrTrainingArguments
    from modeling_gcmr.training.refresh import refresh_after_add, replay_sample

    model, tokenizer = _pair("coarse_fine", text_tokenizer)
    old = _corpus(OLD_KEYS, CAPTIONS[:NUM_OLD], OLD)
    new = _corpus(NEW_KEYS, CAPTIONS[NUM_OLD:], NEW)
    args = GcmrTrainingArguments(output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=8,
                                 save_strategy="no", disable_tqdm=True, learning_rate=1e-2, dataloader_pin_memory=False)
    with pytest.raises(ValueError, match="call model.add_images"):
        refresh_after_add(model, tokenizer, new, old, args)
    model.add_images(NEW_KEYS, tokenizer, image_embeds=NEW)
    model.remove_images(OLD_KEYS[:20], tokenizer)
    assert set(replay_sample(old, tokenizer, 100)["image_key"]) == set(OLD_KEYS[20:])
    before = model.identifier_head.edge_vectors.detach().clone()
    metrics = refresh_after_add(model, tokenizer, new, old, args, replay_ratio=0.5, scope="all")
    assert metrics["train_loss"] > 0 and not model.training
    assert not torch.equal(before, model.identifier_head.edge_vectors.detach())
    hits = model.retrieve(CAPTIONS[NUM_OLD:], tokenizer, top_k=3, num_beams=5)
    assert {key for row in hits for key, _ in row} <= set(tokenizer.current_keys)


def test_a_refresh_of_new_edges_only_leaves_every_old_identifier_as_it_was(text_tokenizer, tmp_path):
    from modeling_gcmr.training.arguments import GcmrTrainingArguments
    from modeling_gcmr.training.refresh import refresh_after_add

    model, tokenizer = _pair("coarse_fine", text_tokenizer)
    model.add_images(NEW_KEYS, tokenizer, image_embeds=NEW)
    head = model.identifier_head
    before = {name: value.detach().clone() for name, value in model.named_parameters()}
    args = GcmrTrainingArguments(output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=8,
                                 save_strategy="no", disable_tqdm=True, learning_rate=1e-2, dataloader_pin_memory=False)
    # What the cyclic collector skips while the model trains: the objects alive before the refresh.
    frozen_in_steps = []
    hook = model.register_forward_pre_hook(lambda *_: frozen_in_steps.append(gc.get_freeze_count()))
    # Corpora with pixels as well as features (as load_corpus gives them): the features model reads its features.
    refresh_after_add(model, tokenizer, _corpus(NEW_KEYS, CAPTIONS[NUM_OLD:], NEW, with_pixels=True),
                      _corpus(OLD_KEYS, CAPTIONS[:NUM_OLD], OLD, with_pixels=True), args)  # scope="new" is the default
    hook.remove()
    assert frozen_in_steps and min(frozen_in_steps) > 0
    old_edges = torch.unique(head.paths[:NUM_OLD][head.paths[:NUM_OLD] >= 0].long())
    changed = [name for name, value in model.named_parameters() if not torch.equal(value, before[name])]
    assert changed == ["identifier_head.edge_vectors"]
    assert torch.equal(head.edge_vectors[old_edges], before["identifier_head.edge_vectors"][old_edges])
    # the freeze is undone (the text encoder stays frozen, as the refresh asked)
    assert model.query_projection.weight.requires_grad and head.step_query.weight.requires_grad
    assert model.text_encoder_is_frozen()
    # ... and only during the refresh; a caller's own freeze is left as it was
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        refresh_after_add(model, tokenizer, _corpus(NEW_KEYS[:4], CAPTIONS[NUM_OLD:NUM_OLD + 4], NEW[:4]), None, args)
        assert frozen > 0 and gc.get_freeze_count() > 0  # not unfrozen (some frozen objects may have died)
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("state", ["full", "row_wise"])
def test_a_refresh_of_a_large_collection_trains_new_edges_sparsely_and_leaves_old_ones_exactly(
        text_tokenizer, tmp_path, monkeypatch, state):
    """Past FULL_SOFTMAX_LIMIT a refresh trains as run_gcmr.py does (sparse edge gradients, LazyAdamW) and steps only
    the new identifiers' own rows, which the sampled softmax reads beside old ones: old rows stay exactly as they
    were, even under weight decay."""
    from modeling_gcmr import identifier_head_gcmr
    from modeling_gcmr.training.arguments import GcmrTrainingArguments
    from modeling_gcmr.training.refresh import refresh_after_add

    model, tokenizer = _pair("coarse_fine", text_tokenizer)
    model.add_images(NEW_KEYS, tokenizer, image_embeds=NEW)
    monkeypatch.setattr(identifier_head_gcmr, "FULL_SOFTMAX_LIMIT", 8)  # as if the collection were large
    head = model.identifier_head
    assert head.samples_softmax and not head.sparse_gradients
    before = {name: value.detach().clone() for name, value in model.named_parameters()}
    args = GcmrTrainingArguments(output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=8,
                                 save_strategy="no", disable_tqdm=True, learning_rate=1e-2, weight_decay=0.1,
                                 max_grad_norm=1.0, edge_optimizer_state=state, dataloader_pin_memory=False)
    sparse_in_steps = []
    hook = model.register_forward_pre_hook(lambda *_: sparse_in_steps.append(head.sparse_gradients))
    new, old = _corpus(NEW_KEYS, CAPTIONS[NUM_OLD:], NEW), _corpus(OLD_KEYS, CAPTIONS[:NUM_OLD], OLD)
    refresh_after_add(model, tokenizer, new, old, args)
    hook.remove()
    assert sparse_in_steps and all(sparse_in_steps) and not head.sparse_gradients  # restored after
    assert args.max_grad_norm == 1.0  # the caller's arguments: the clipping moved into a copy's optimizer
    old_edges = torch.unique(head.paths[:NUM_OLD][head.paths[:NUM_OLD] >= 0].long())
    new_edges = torch.unique(head.paths[NUM_OLD:][head.paths[NUM_OLD:] >= 0].long())
    own = new_edges[~torch.isin(new_edges, old_edges)]
    edges = head.edge_vectors.detach()
    assert torch.equal(edges[old_edges], before["identifier_head.edge_vectors"][old_edges])
    assert not torch.equal(edges[own], before["identifier_head.edge_vectors"][own])
    assert [name for name, value in model.named_parameters() if not torch.equal(value, before[name])] == [
        "identifier_head.edge_vectors"]
    # an optimizer that cannot step some rows only is refused before anything trains
    with pytest.raises(ValueError, match="training only some edge vectors .* needs LazyAdamW"):
        refresh_after_add(model, tokenizer, new, old, GcmrTrainingArguments(
            output_dir=str(tmp_path), optim="sgd", save_strategy="no", disable_tqdm=True))
    assert torch.equal(head.edge_vectors.detach(), edges)


def test_a_frozen_encoders_cached_states_outlive_an_add_and_a_second_freeze(text_tokenizer):
    """A refresh after every add freezes the text encoder again: its cached states stay (the weights cannot have
    moved), give the loss a fresh encoding gives, and go once the encoder may train."""
    from modeling_gcmr.training.collator import GcmrDataCollator
    from modeling_gcmr.training.examples import TrainingExamplesConfig, build_training_examples

    model, tokenizer = _pair("coarse_fine", text_tokenizer)
    model.freeze_text_encoder(True)
    model.add_images(NEW_KEYS, tokenizer, image_embeds=NEW)
    rows = build_training_examples(_corpus(NEW_KEYS, CAPTIONS[NUM_OLD:], NEW), tokenizer,
                                   TrainingExamplesConfig(seed=0), query_token_limit=model.config.query_token_limit)
    batch = GcmrDataCollator.from_config(model.config, tokenizer)([rows[i] for i in range(len(rows))])
    model.train()
    model(**batch)
    cached = len(model.encoder_cache)
    assert cached >= len(set(CAPTIONS[NUM_OLD:]))  # an entry per distinct text query (the captions, and prompts)

    model.add_images(["later"], tokenizer, image_embeds=OLD[:1] + 0.01)
    model.freeze_text_encoder(True)
    assert len(model.encoder_cache) == cached
    with torch.no_grad():
        torch.manual_seed(0)
        from_cache = model(**batch).loss
        model.encoder_cache.clear()
        torch.manual_seed(0)
        fresh = model(**batch).loss
    torch.testing.assert_close(from_cache, fresh, rtol=1e-5, atol=1e-6)
    model.freeze_text_encoder(False)
    assert len(model.encoder_cache) == 0
