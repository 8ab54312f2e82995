"""`GcmrConfig(shared_eos_vector=True)`: every forced EOS edge scores with one shared vector row.

An identifier that no other identifier extends ends with an EOS edge forced by the edge before it, which leads to that
identifier alone; storing a vector for both holds about one vector per image more than search needs (at a million
coarse_fine images, 1M of 2.13M rows). With the option, every id type keeps the scores of the unshared head before
training (the shared row starts at zero), through retrieve(), generate(), save/reload and add_images.
"""
import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_generate import generated_hits, on_trie
from test_retrieve import EMBED_DIM, HEAD_TYPES, embeddings, make_tokenizer, random_queries
from transformers import T5Config

from modeling_gcmr import GcmrConfig, GcmrForRetrieval, PrefixTrieLogitsProcessor
from modeling_gcmr.identifier_head_gcmr import SHARED_EOS_ROW
from modeling_gcmr.publishing.checkpoint import save_retriever
from modeling_gcmr.retrieval_gcmr import search
from tokenization_gcmr import ImageIdTokenizer
from tokenization_gcmr.prefix_trie import PrefixTrie


def make_model(tokenizer, shared: bool) -> GcmrForRetrieval:
    torch.manual_seed(0)
    text_config = T5Config(vocab_size=tokenizer.num_text_tokens, d_model=16, d_ff=32, d_kv=8, num_layers=1,
                           num_heads=2, decoder_start_token_id=0)
    model = GcmrForRetrieval(GcmrConfig(text_config=text_config, image_embed_dim=EMBED_DIM, num_beams=5,
                                        shared_eos_vector=shared))
    model.set_identifier_vocabulary(tokenizer, init="dense", image_embeds=embeddings(len(tokenizer.keys)))
    return model.eval()


@pytest.fixture(scope="module")
def pairs(text_tokenizer, caption_corpus):
    """Per id type: (tokenizer, unshared model, shared model), the same seed and dense-aware start."""
    out = {}
    for id_type in HEAD_TYPES:
        tokenizer = make_tokenizer(text_tokenizer, caption_corpus, id_type)
        out[id_type] = (tokenizer, make_model(tokenizer, False), make_model(tokenizer, True))
    return out


def forced_identifiers(tokenizer) -> list[bool]:
    """Per identifier: no other identifier's tokens start with all of its tokens (counted on the token rows)."""
    rows = [tuple(t for t in row if t >= 0) for row in np.asarray(tokenizer.identifier_token_rows).tolist()]
    prefixes = {row[:cut] for row in rows for cut in range(1, len(row))}
    return [row not in prefixes for row in rows]


@pytest.mark.parametrize("id_type", HEAD_TYPES)
def test_forced_eos_edges_score_with_one_row_and_the_rest_keep_their_own(pairs, id_type):
    tokenizer, plain, shared = pairs[id_type]
    forced = forced_identifiers(tokenizer)
    trie = tokenizer.prefix_trie
    assert plain.config.num_identifier_edges == trie.num_edges
    assert shared.config.num_identifier_edges == trie.num_edges - sum(forced) + 1
    assert shared.identifier_head.edge_vectors.shape[0] == shared.config.num_identifier_edges
    paths = shared.identifier_head.paths.long()
    ends = paths.gather(1, ((paths >= 0).sum(1) - 1)[:, None]).squeeze(1)
    assert ((ends == SHARED_EOS_ROW).tolist()) == forced
    # Every other edge has a row of its own; no other step uses the shared row.
    others = paths[(paths >= 0) & (paths != SHARED_EOS_ROW)]
    assert len(torch.unique(others)) == shared.config.num_identifier_edges - 1
    assert torch.equal(shared.identifier_head.edge_vectors[SHARED_EOS_ROW],
                       torch.zeros(shared.identifier_head.edge_vectors.shape[1]))


@pytest.mark.parametrize("id_type", HEAD_TYPES)
def test_before_training_every_id_type_ranks_as_the_unshared_head(pairs, id_type):
    tokenizer, plain, shared = pairs[id_type]
    inputs = random_queries(tokenizer, 16, seed=4)
    images = embeddings()[:16] + 0.3 * np.random.default_rng(5).normal(size=(16, EMBED_DIM)).astype(np.float32)
    for query in (dict(inputs=inputs), dict(image_embeds=images)):
        with torch.no_grad():
            want, got = (search(model, tokenizer, top_k=5, num_beams=5, **query) if "inputs" in query else
                         model.retrieve(tokenizer=tokenizer, top_k=5, num_beams=5, show_progress=False, **query)
                         for model in (plain, shared))
        assert [[k for k, _ in row] for row in got] == [[k for k, _ in row] for row in want]
        np.testing.assert_allclose([[s for _, s in row] for row in got], [[s for _, s in row] for row in want],
                                   rtol=1e-5, atol=1e-5)
    # Training starts from the same loss: the same identifier scores, the same gold paths.
    rows = [tokenizer.identifier_ids(key) + [tokenizer.eos_token_id] for key in tokenizer.keys[:4]]
    width = max(len(row) for row in rows)
    labels = torch.tensor([row + [-100] * (width - len(row)) for row in rows])
    inputs = {name: value[:4] for name, value in inputs.items()}
    losses = [model(**inputs, labels=labels).loss.item() for model in (plain, shared)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_generate_returns_the_hits_of_retrieve_with_a_shared_row(pairs):
    tokenizer, _, shared = pairs["semantic"]  # text pieces of several lengths: forced and unforced EOS edges
    torch.nn.init.normal_(shared.identifier_head.step_query.weight, std=0.3)  # the decoder reads every step
    try:
        inputs = random_queries(tokenizer, 4, seed=3)
        out = shared.generate(**inputs, logits_processor=on_trie(tokenizer), num_beams=5, num_return_sequences=3,
                              return_dict_in_generate=True, output_scores=True)
        want = [[(tokenizer.keys[k], s) for k, s in row]
                for row in search(shared, tokenizer, inputs, top_k=3, num_beams=5)]
        got = generated_hits(tokenizer, out, 3)
        assert [[k for k, _ in row] for row in got] == [[k for k, _ in row] for row in want]
        np.testing.assert_allclose([[s for _, s in row] for row in got], [[s for _, s in row] for row in want],
                                   rtol=1e-5)
    finally:
        torch.nn.init.zeros_(shared.identifier_head.step_query.weight)


def test_a_trie_of_other_identifiers_is_refused(pairs, text_tokenizer, caption_corpus):
    _, _, shared = pairs["coarse_fine"]
    other = make_tokenizer(text_tokenizer, caption_corpus, "coarse_fine", count=40)
    # Built by hand, without the tokenizer's signature: only its paths can tell (fewer rows than edges).
    hand_made = PrefixTrie.from_sequences(other.identifier_token_rows, other.eos_token_id, len(other) + 50)
    with pytest.raises(ValueError, match="PrefixTrieLogitsProcessor's trie has"):
        shared.generate(**random_queries(other, 2, seed=1),
                        logits_processor=[PrefixTrieLogitsProcessor(hand_made)], num_beams=2)


def test_the_checkpoint_holds_fewer_rows_and_reloads_the_same_ranking(pairs, tmp_path):
    tokenizer, plain, shared = pairs["coarse_fine"]
    for name, model in (("plain", plain), ("shared", shared)):
        save_retriever(model, tokenizer, tmp_path / name)
    rows = {}
    for name in ("plain", "shared"):
        with safe_open(str(tmp_path / name / "model.safetensors"), "pt") as handle:
            rows[name] = handle.get_slice("identifier_head.edge_vectors").get_shape()[0]
    assert rows["shared"] == shared.config.num_identifier_edges < rows["plain"]
    loaded = GcmrForRetrieval.from_pretrained(tmp_path / "shared").eval()
    reloaded_tokenizer = ImageIdTokenizer.from_pretrained(tmp_path / "shared")
    assert loaded.config.shared_eos_vector is True
    images = embeddings()[:12]
    want = shared.retrieve(tokenizer=tokenizer, image_embeds=images, top_k=5, show_progress=False)
    got = loaded.retrieve(tokenizer=reloaded_tokenizer, image_embeds=images, top_k=5, show_progress=False)
    assert [[k for k, _ in row] for row in got] == [[k for k, _ in row] for row in want]
    np.testing.assert_allclose([[s for _, s in row] for row in got], [[s for _, s in row] for row in want],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("id_type", ["coarse_fine", "structured", "atomic"])
def test_added_images_take_the_shared_row_and_rank_as_the_unshared_head(text_tokenizer, caption_corpus, id_type):
    base = make_tokenizer(text_tokenizer, caption_corpus, id_type)
    tokenizers = [ImageIdTokenizer(text_tokenizer, base.identifier_table) for _ in range(2)]
    models = [make_model(tokenizer, shared) for tokenizer, shared in zip(tokenizers, (False, True))]
    new = np.random.default_rng(6).normal(size=(10, EMBED_DIM)).astype(np.float32)
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    keys = [f"new_{i}" for i in range(10)]
    before = [model.config.num_identifier_edges for model in models]
    for model, tokenizer in zip(models, tokenizers):
        model.add_images(keys, tokenizer, image_embeds=new, placement="centroids")
    plain, shared = models
    tokenizer = tokenizers[1]
    forced = forced_identifiers(tokenizer)
    paths = shared.identifier_head.paths.long()[-10:]
    ends = paths.gather(1, ((paths >= 0).sum(1) - 1)[:, None]).squeeze(1)
    assert (ends == SHARED_EOS_ROW).tolist() == forced[-10:]
    # The unshared head appends a row per new trie edge; the shared one the same, less the new forced EOS edges.
    new_edges = plain.config.num_identifier_edges - before[0]
    assert shared.config.num_identifier_edges - before[1] == new_edges - sum(forced[-10:])
    want = plain.retrieve(tokenizer=tokenizers[0], image_embeds=new, top_k=3, show_progress=False)
    got = shared.retrieve(tokenizer=tokenizer, image_embeds=new, top_k=3, show_progress=False)
    assert [row[0][0] for row in got] == keys == [row[0][0] for row in want]
    np.testing.assert_allclose([[s for _, s in row] for row in got], [[s for _, s in row] for row in want],
                               rtol=1e-5, atol=1e-5)


def test_an_identifier_that_others_extend_keeps_its_own_eos_row(text_tokenizer, caption_corpus):
    """Semantic identifiers where one caption's pieces begin another's: that EOS edge is not forced (its node has
    another child), so it keeps a row of its own; the ranking still equals the unshared head's with a decoder that
    reads every step."""
    from tokenization_gcmr import build_identifiers

    captions = ["a red circle", "a red circle left of a blue square", "a big green star", "a big green star and"]
    captions += list(caption_corpus[:36])
    keys = [f"img_{index:03d}" for index in range(len(captions))]
    table = build_identifiers(keys, id_type="semantic", embeddings=embeddings(len(keys)), captions=captions, seed=0,
                              text_tokenizer=text_tokenizer, max_length=16)
    tokenizer = ImageIdTokenizer(text_tokenizer, table)
    forced = forced_identifiers(tokenizer)
    assert forced[0] is False and forced[2] is False and forced[1] is True
    plain, shared = (make_model(tokenizer, flag) for flag in (False, True))
    paths = shared.identifier_head.paths.long()
    ends = paths.gather(1, ((paths >= 0).sum(1) - 1)[:, None]).squeeze(1)
    assert (ends == SHARED_EOS_ROW).tolist() == forced
    for model in (plain, shared):
        torch.nn.init.normal_(model.identifier_head.step_query.weight, generator=torch.Generator().manual_seed(1),
                              std=0.3)
    inputs = random_queries(tokenizer, 12, seed=2)
    with torch.no_grad():
        want, got = (search(model, tokenizer, inputs, top_k=5, num_beams=5) for model in (plain, shared))
    assert [[k for k, _ in row] for row in got] == [[k for k, _ in row] for row in want]
    np.testing.assert_allclose([[s for _, s in row] for row in got], [[s for _, s in row] for row in want],
                               rtol=1e-5, atol=1e-5)


def test_a_refresh_after_an_add_trains_new_edges_and_leaves_the_shared_row(text_tokenizer, tmp_path):
    """The shared row belongs to old identifiers too, so a refresh of the new edges (scope="new") keeps it."""
    from test_growing_collection import CAPTIONS, NEW, NEW_KEYS, NUM_OLD, OLD, OLD_KEYS, _corpus, _pair

    from modeling_gcmr.training.arguments import GcmrTrainingArguments
    from modeling_gcmr.training.refresh import refresh_after_add

    model, tokenizer = _pair("coarse_fine", text_tokenizer)
    model.config.shared_eos_vector = True
    model.set_identifier_vocabulary(tokenizer, image_embeds=OLD)
    old_rows = model.config.num_identifier_edges
    model.add_images(NEW_KEYS, tokenizer, image_embeds=NEW)
    before = model.identifier_head.edge_vectors.detach().clone()
    args = GcmrTrainingArguments(output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=8,
                                 save_strategy="no", disable_tqdm=True, learning_rate=1e-2, dataloader_pin_memory=False)
    refresh_after_add(model, tokenizer, _corpus(NEW_KEYS, CAPTIONS[NUM_OLD:], NEW),
                      _corpus(OLD_KEYS, CAPTIONS[:NUM_OLD], OLD), args)
    after = model.identifier_head.edge_vectors.detach()
    assert torch.equal(after[:old_rows], before[:old_rows])  # the shared row (0) and every old edge
    assert not torch.equal(after[old_rows:], before[old_rows:])


def test_remote_code_loads_a_shared_checkpoint_and_adds_to_it_as_in_process(pairs, tmp_path):
    from subprocess_utils import run_without_package

    tokenizer, _, shared = pairs["coarse_fine"]
    save_retriever(shared, tokenizer, tmp_path)
    images = embeddings()[:6]
    new = (images[:2] * 0.5 + 0.1).astype(np.float32)
    local = GcmrForRetrieval.from_pretrained(tmp_path).eval()
    local_tokenizer = ImageIdTokenizer.from_pretrained(tmp_path)
    local.add_images(["remote0", "remote1"], local_tokenizer, image_embeds=new, placement="centroids")
    want = local.retrieve(tokenizer=local_tokenizer, image_embeds=np.concatenate([images, new]), top_k=3,
                          show_progress=False)
    got = run_without_package(
        f"""
        import json, torch
        from transformers import AutoModel, AutoTokenizer
        model = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        new = torch.tensor({new.tolist()!r})
        model.add_images(["remote0", "remote1"], tokenizer, image_embeds=new, placement="centroids")
        queries = torch.cat([torch.tensor({images.tolist()!r}), new])
        hits = model.retrieve(tokenizer=tokenizer, image_embeds=queries, top_k=3, show_progress=False)
        print(json.dumps({{"hits": hits, "shared": model.config.shared_eos_vector,
                          "rows": model.config.num_identifier_edges}}))
        """,
        cwd=str(tmp_path),
    )
    assert got["shared"] is True and got["rows"] == local.config.num_identifier_edges
    assert [[k for k, _ in row] for row in got["hits"]] == [[k for k, _ in row] for row in want]
    np.testing.assert_allclose([[s for _, s in row] for row in got["hits"]], [[s for _, s in row] for row in want],
                               rtol=1e-4, atol=1e-4)
