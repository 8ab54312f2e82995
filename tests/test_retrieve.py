"""Search: valid, duplicate-free, best-first hits whose scores are the model's own identifier scores.

The identifier head (trie beam search over summed dot products) and the text head (generate() under the trie,
log-probabilities) are both checked against teacher-forced scores of the same model, and against exhaustive search.
"""
import numpy as np
import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration
from transformers.testing_utils import CaptureLogger

from modeling_gcmr import GcmrConfig, GcmrForRetrieval, query_inputs_gcmr, trie_beam_search_gcmr
from modeling_gcmr.prefix_trie_logits_processor import constrained_generate
from modeling_gcmr.retrieval_gcmr import search
from modeling_gcmr.trie_beam_search_gcmr import trie_beam_search
from tokenization_gcmr import build_identifiers
from tokenization_gcmr.tokenization_gcmr import ImageIdTokenizer

NUM_IMAGES = 60
EMBED_DIM = 8
ID_TYPE_OPTIONS = {
    "atomic": {},
    "structured": {"branching": 3, "leaf_size": 5},
    "semantic": {"text_tokenizer": True, "max_length": 3},  # text pieces, variable length
    "coarse_fine": {"num_coarse": 3, "num_levels": 2, "codebook_size": 4},
    "numeric": {},
    "string": {"text_tokenizer": True},  # the running index in text pieces
}
# Every id type goes through the identifier head (string and semantic: trie paths of text pieces).
HEAD_TYPES = ["atomic", "structured", "coarse_fine", "numeric", "string", "semantic"]


def embeddings(count=NUM_IMAGES):
    values = np.random.default_rng(0).normal(size=(count, EMBED_DIM)).astype(np.float32)
    return values / np.linalg.norm(values, axis=1, keepdims=True)


def make_tokenizer(text_tokenizer, captions, id_type, count=NUM_IMAGES):
    keys = [f"img_{index:03d}" for index in range(count)]
    options = dict(ID_TYPE_OPTIONS[id_type])
    if options.pop("text_tokenizer", False):
        options["text_tokenizer"] = text_tokenizer
    table = build_identifiers(keys, id_type=id_type, embeddings=embeddings(count), captions=captions[:count], seed=0,
                              **options)
    return ImageIdTokenizer(text_tokenizer, table)


def make_model(tokenizer, seed=0, trained_decoder=True):
    """A tiny GCMR model fitted to `tokenizer`; with `trained_decoder`, the step correction is non-zero (as after
    training), so the decoder matters to every score."""
    torch.manual_seed(seed)
    text_config = T5Config(vocab_size=tokenizer.num_text_tokens, d_model=16, d_ff=32, d_kv=8, num_layers=2,
                           num_heads=2, decoder_start_token_id=0)
    model = GcmrForRetrieval(GcmrConfig(text_config=text_config, image_embed_dim=EMBED_DIM, num_beams=5))
    model.set_identifier_vocabulary(tokenizer, image_embeds=embeddings(len(tokenizer.keys)))
    if trained_decoder and model.identifier_head is not None:
        torch.nn.init.normal_(model.identifier_head.step_query.weight, std=0.3)
    return model.eval()


def random_queries(tokenizer, count, seed):
    """Random text-token ids (no identifier tokens) as encoder input, with random lengths."""
    rng = np.random.default_rng(seed)
    input_ids = torch.from_numpy(rng.integers(3, tokenizer.num_text_tokens, size=(count, 8)))
    lengths = torch.from_numpy(rng.integers(1, 9, size=count))
    attention_mask = (torch.arange(8)[None, :] < lengths[:, None]).long()
    return {"input_ids": input_ids * attention_mask, "attention_mask": attention_mask}


@pytest.fixture(scope="module")
def setups(text_tokenizer, caption_corpus):
    return {id_type: (lambda tok: (tok, make_model(tok)))(make_tokenizer(text_tokenizer, caption_corpus, id_type))
            for id_type in HEAD_TYPES}


def teacher_forced_score(model, tokenizer, inputs, row, key):
    """The identifier head's score of `key` for query `row`: forward with that identifier as the label."""
    labels = torch.tensor([tokenizer.identifier_ids(key) + [tokenizer.eos_token_id]])
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"][row : row + 1],
                       attention_mask=inputs["attention_mask"][row : row + 1], labels=labels).logits
    return logits[0, tokenizer.keys.index(key)].item()


@pytest.mark.parametrize("id_type", HEAD_TYPES)
def test_random_queries_give_valid_unique_sorted_hits(setups, id_type):
    tokenizer, model = setups[id_type]
    real_keys = set(tokenizer.keys)
    encoded = model.encode(**random_queries(tokenizer, 500, seed=1))
    hits = trie_beam_search(model, tokenizer.prefix_trie, encoded, num_beams=5, top_k=5)
    assert len(hits) == 500
    for row in hits:
        keys = [tokenizer.keys[index] for index, _ in row]
        scores = [score for _, score in row]
        assert len(keys) == 5 and set(keys) <= real_keys and len(set(keys)) == 5
        assert scores == sorted(scores, reverse=True) and all(np.isfinite(scores))


@pytest.mark.parametrize("id_type", HEAD_TYPES)
def test_score_is_the_teacher_forced_sum_of_step_scores(setups, id_type):
    tokenizer, model = setups[id_type]
    inputs = random_queries(tokenizer, 4, seed=7)
    for row, row_hits in enumerate(search(model, tokenizer, inputs, top_k=3, num_beams=5)):
        for index, score in row_hits:
            expected = teacher_forced_score(model, tokenizer, inputs, row, tokenizer.keys[index])
            assert score == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("id_type", ["structured", "coarse_fine", "numeric"])
def test_enough_beams_make_the_search_exhaustive(text_tokenizer, caption_corpus, id_type):
    # With as many beams as identifiers nothing is pruned: the hits are every key, ranked by its exact score.
    tokenizer = make_tokenizer(text_tokenizer, caption_corpus, id_type, count=12)
    model = make_model(tokenizer, seed=3)
    inputs = random_queries(tokenizer, 3, seed=1)
    hits = trie_beam_search(model, tokenizer.prefix_trie, model.encode(**inputs), num_beams=12, top_k=12)
    for row, row_hits in enumerate(hits):
        exact = sorted(((teacher_forced_score(model, tokenizer, inputs, row, key), key) for key in tokenizer.keys),
                       reverse=True)
        assert [tokenizer.keys[index] for index, _ in row_hits] == [key for _, key in exact]
        np.testing.assert_allclose([score for _, score in row_hits], [score for score, _ in exact], atol=1e-3)


def test_step_zero_of_atomic_identifiers_is_exact_inner_product_search(text_tokenizer, caption_corpus):
    # Dense-aware initialisation: before training, an image query's hits are brute-force inner-product search.
    tokenizer = make_tokenizer(text_tokenizer, caption_corpus, "atomic", count=40)
    model = make_model(tokenizer, trained_decoder=False)
    features = torch.as_tensor(embeddings(40))
    queries = torch.nn.functional.normalize(torch.randn(25, EMBED_DIM, generator=torch.Generator().manual_seed(2)), dim=-1)
    hits = model.retrieve(tokenizer=tokenizer, image_embeds=queries, top_k=10, num_beams=10)
    brute = torch.topk(queries @ features.T, 10)
    for row, row_hits in enumerate(hits):
        assert [tokenizer.keys.index(key) for key, _ in row_hits] == brute.indices[row].tolist()
        scale = model.identifier_head.scale.item()
        np.testing.assert_allclose([score for _, score in row_hits], scale * brute.values[row].numpy(), rtol=1e-4)


@pytest.mark.parametrize("id_type", ["structured", "coarse_fine"])
def test_memorized_images_are_found_by_their_own_feature_before_training(text_tokenizer, caption_corpus, id_type):
    tokenizer = make_tokenizer(text_tokenizer, caption_corpus, id_type)
    model = make_model(tokenizer, trained_decoder=False)
    hits = model.retrieve(tokenizer=tokenizer, image_embeds=torch.as_tensor(embeddings()), top_k=1)
    assert [row[0][0] for row in hits] == list(tokenizer.keys)


def text_head_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=16, d_ff=32, d_kv=8, num_layers=2, num_heads=2,
                      decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    return T5ForConditionalGeneration(config).eval()


def teacher_forced_log_prob(model, tokenizer, inputs, row, key):
    labels = torch.tensor([tokenizer.identifier_ids(key) + [tokenizer.eos_token_id]])
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"][row : row + 1],
                       attention_mask=inputs["attention_mask"][row : row + 1], labels=labels).logits
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[..., None]).sum().item()


@pytest.mark.parametrize("id_type", ["structured", "semantic"])
@pytest.mark.parametrize("num_beams", [1, 4])
def test_text_head_score_is_the_log_probability_of_identifier_and_eos(text_tokenizer, caption_corpus, id_type,
                                                                     num_beams):
    tokenizer = make_tokenizer(text_tokenizer, caption_corpus, id_type)
    model = text_head_model(tokenizer)
    inputs = random_queries(tokenizer, 6, seed=7)
    hits = constrained_generate(model, tokenizer, inputs, top_k=num_beams, num_beams=num_beams)
    for row, row_hits in enumerate(hits):
        assert len(row_hits) == num_beams and len({key for key, _ in row_hits}) == num_beams
        for key_index, score in row_hits:
            expected = teacher_forced_log_prob(model, tokenizer, inputs, row, tokenizer.keys[key_index])
            assert score == pytest.approx(expected, abs=1e-4) and score <= 0.0


def test_text_head_beam_search_finds_the_best_identifier_of_a_small_corpus(text_tokenizer, caption_corpus):
    tokenizer = make_tokenizer(text_tokenizer, caption_corpus, "semantic", count=6)
    model = text_head_model(tokenizer, seed=3)
    inputs = random_queries(tokenizer, 3, seed=1)
    hits = constrained_generate(model, tokenizer, inputs, top_k=6, num_beams=12)
    for row, row_hits in enumerate(hits):
        exact = sorted(((teacher_forced_log_prob(model, tokenizer, inputs, row, key), key) for key in tokenizer.keys),
                       reverse=True)
        assert [tokenizer.keys[index] for index, _ in row_hits] == [key for _, key in exact]


def test_top_k_and_beams_are_capped_at_the_identifiers(text_tokenizer, caption_corpus):
    tokenizer = make_tokenizer(text_tokenizer, caption_corpus, "atomic", count=4)
    model = make_model(tokenizer)
    for row in model.retrieve(["a red circle", "a blue square"], tokenizer, top_k=10**9, num_beams=10**6):
        assert sorted(key for key, _ in row) == sorted(tokenizer.keys)


def test_top_k_above_num_beams_raises_the_beams_and_warns_once(setups):
    tokenizer, model = setups["coarse_fine"]
    with CaptureLogger(query_inputs_gcmr.logger) as captured:
        hits = model.retrieve(["a red circle", "a big star"], tokenizer, top_k=7, num_beams=3)
        model.retrieve(["a red circle"], tokenizer, top_k=7, num_beams=3)
    assert captured.out.count("raising num_beams to 7") == 1
    assert all(len(row) == 7 for row in hits)


@pytest.mark.parametrize("name, value", [("top_k", 0), ("top_k", -1), ("top_k", 2.5), ("top_k", True),
                                         ("top_k", "3"), ("num_beams", 0), ("num_beams", 1.5), ("num_beams", "4"),
                                         ("batch_size", 0), ("batch_size", 2.0)])
def test_bad_search_arguments_are_rejected(setups, name, value):
    tokenizer, model = setups["atomic"]
    with pytest.raises(ValueError, match=f"{name} must be a positive int"):
        model.retrieve(["a red circle"], tokenizer, **{name: value})


def test_image_queries_through_gcmr_retrieve(setups):
    tokenizer, model = setups["coarse_fine"]
    hits = model.retrieve(tokenizer=tokenizer, image_embeds=torch.randn(5, EMBED_DIM), top_k=4, num_beams=4)
    assert len(hits) == 5
    for row in hits:
        assert len(row) == 4 and len({key for key, _ in row}) == 4
        assert {key for key, _ in row} <= set(tokenizer.keys)


@pytest.fixture(scope="module")
def with_features(text_tokenizer, caption_corpus):
    tokenizer = make_tokenizer(text_tokenizer, caption_corpus, "coarse_fine")
    model = make_model(tokenizer, seed=4)
    model.store_image_features(torch.as_tensor(embeddings()))
    return model, tokenizer


@pytest.mark.parametrize("mode", ["features", "hybrid"])
def test_rerank_equals_a_brute_force_rescore_of_the_beam(with_features, mode):
    model, tokenizer = with_features
    queries = ["a red circle left of a blue square", "a big green star", "3 tiny pink rings above a cross"]
    beam = model.retrieve(queries, tokenizer, top_k=6, num_beams=6)
    reranked = model.retrieve(queries, tokenizer, top_k=4, num_beams=6, rerank=mode, rerank_weight=0.5)
    inputs, _ = query_inputs_gcmr.tokenize_queries(tokenizer, queries, model.config.query_token_limit)
    with torch.no_grad():
        query_vectors = model.encode(**inputs).query_vectors
    features, scale = model.stored_image_features, model.identifier_head.scale.item()
    for query, candidates, got in zip(query_vectors, beam, reranked):
        brute = []
        for key, generative in candidates:
            dense = scale * float(features[tokenizer.keys.index(key)] @ query)
            brute.append((key, dense if mode == "features" else generative + 0.5 * dense))
        brute.sort(key=lambda pair: -pair[1])
        assert [key for key, _ in got] == [key for key, _ in brute[:4]]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in brute[:4]], rtol=1e-4, atol=1e-4)


def test_rerank_needs_stored_features_and_they_travel_with_the_checkpoint(with_features, setups, tmp_path):
    from modeling_gcmr import save_retriever

    tokenizer, model = setups["atomic"]
    with pytest.raises(ValueError, match="rerank needs image features stored with the checkpoint"):
        model.retrieve(["a red circle"], tokenizer, rerank="features")
    with pytest.raises(ValueError, match="rerank must be one of"):
        model.retrieve(["a red circle"], tokenizer, rerank="dense")
    model, tokenizer = with_features
    save_retriever(model, tokenizer, tmp_path / "checkpoint")
    loaded = GcmrForRetrieval.from_pretrained(tmp_path / "checkpoint")
    torch.testing.assert_close(loaded.stored_image_features, model.stored_image_features)
    queries = ["a red circle left of a blue square", "a big green star"]
    want = model.retrieve(queries, tokenizer, top_k=3, rerank="hybrid")
    got = loaded.retrieve(queries, tokenizer, top_k=3, rerank="hybrid")
    assert [[k for k, _ in row] for row in got] == [[k for k, _ in row] for row in want]
    with pytest.raises(ValueError, match=r"image features must have shape \(60, 8\)"):
        model.store_image_features(torch.zeros(3, 8))


@pytest.mark.parametrize("weight", [float("inf"), 1e39, float("nan"), -float("inf"), -0.5, 100.5, "0.5", True, None])
def test_a_hybrid_weight_outside_its_range_is_refused_by_retrieve_and_the_pipeline(with_features, weight):
    """inf or 1e39 (inf in float32) used to give fewer than top_k hits scored inf, nan hits in no order."""
    from transformers import pipeline

    from modeling_gcmr import PIPELINE_TASK

    model, tokenizer = with_features
    message = r"rerank_weight must be a finite number from 0 to 100 .*got"
    with pytest.raises(ValueError, match=message):
        model.retrieve(["a red circle"], tokenizer, top_k=3, rerank="hybrid", rerank_weight=weight)
    pipe = pipeline(PIPELINE_TASK, model=model, tokenizer=tokenizer, device="cpu")
    with pytest.raises(ValueError, match=message):
        pipe("a red circle", top_k=3, rerank="hybrid", rerank_weight=weight)


def test_the_ends_of_the_hybrid_weight_range_rank_by_each_score(with_features):
    model, tokenizer = with_features
    queries = ["a red circle left of a blue square", "a big green star"]
    generative = model.retrieve(queries, tokenizer, top_k=4, num_beams=6)
    at_zero = model.retrieve(queries, tokenizer, top_k=4, num_beams=6, rerank="hybrid", rerank_weight=0)
    assert [[k for k, _ in row] for row in at_zero] == [[k for k, _ in row] for row in generative]
    at_max = model.retrieve(queries, tokenizer, top_k=4, num_beams=6, rerank="hybrid", rerank_weight=np.float32(100))
    assert all(len(row) == 4 and all(np.isfinite(score) for _, score in row) for row in at_max)


def test_the_pipeline_passes_rerank_through(with_features):
    from transformers import pipeline

    from modeling_gcmr import PIPELINE_TASK

    model, tokenizer = with_features
    pipe = pipeline(PIPELINE_TASK, model=model, tokenizer=tokenizer, device="cpu")
    query = "a red circle left of a blue square"
    expected = model.retrieve([query], tokenizer, top_k=3, rerank="features")[0]
    assert [(r["image_key"], pytest.approx(r["score"], abs=1e-4)) for r in pipe(query, top_k=3, rerank="features")] \
        == [(k, pytest.approx(s, abs=1e-4)) for k, s in expected]


@pytest.mark.parametrize("id_type", ["coarse_fine", "structured"])
def test_hard_negatives_are_scored_with_their_own_paths_as_beam_search_does(setups, id_type):
    """The training loss's negatives, scored through the gold pass's shared memory keys and values, get exactly
    the score beam search gives them (the teacher-forced score of each identifier)."""
    from modeling_gcmr.identifier_loss_gcmr import own_path_scores

    tokenizer, model = setups[id_type]
    inputs = random_queries(tokenizer, 3, seed=11)
    identifiers = torch.tensor([[5, 17, 42], [0, 1, 2], [59, 30, 8]])
    with torch.no_grad():
        encoded = model.encode(**inputs)
        gold = model.identifier_head.paths.long()[[1, 2, 3]]
        _, cache = model.decoder_states(model.identifier_head.decoder_inputs(gold), encoded, use_cache=True)
        scores = own_path_scores(model, encoded, encoded.query_vectors, identifiers, cache.cross_attention_cache)
    for row in range(3):
        for column, index in enumerate(identifiers[row].tolist()):
            expected = teacher_forced_score(model, tokenizer, inputs, row, tokenizer.keys[index])
            assert scores[row, column].item() == pytest.approx(expected, abs=1e-3)


def test_lookahead_keeps_the_gold_that_the_plain_beam_prunes(text_tokenizer, caption_corpus):
    # Two-level structured tree (3 clusters, then one leaf position per image), step 0, one beam: a prefix's partial
    # sum is its cluster mean's score, so the plain beam drops the best image whenever its cluster's mean is not the
    # best; partial sum + best child edge is that cluster's best image exactly, so the lookahead beam keeps it.
    keys = [f"img_{index:03d}" for index in range(NUM_IMAGES)]
    tokenizer = ImageIdTokenizer(text_tokenizer, build_identifiers(keys, "structured", embeddings=embeddings(),
                                                                   branching=3, leaf_size=30))
    assert tokenizer.max_identifier_length == 2
    model = make_model(tokenizer, trained_decoder=False)
    queries = torch.nn.functional.normalize(torch.randn(200, EMBED_DIM, generator=torch.Generator().manual_seed(4)),
                                            dim=-1)
    encoded = model.encode(image_embeds=queries)
    gold = (queries @ torch.as_tensor(embeddings()).T).argmax(dim=1).tolist()

    def top1(lookahead):
        hits = trie_beam_search(model, tokenizer.prefix_trie, encoded, num_beams=1, top_k=1, lookahead=lookahead)
        return [row[0][0] for row in hits]

    assert top1(lookahead=4) == gold
    assert sum(found != best for found, best in zip(top1(lookahead=0), gold)) >= 10


def _four_level_search(text_tokenizer, num_queries, seed, trained_decoder=True):
    """A four-level structured tree (branching 3, leaves of 3), its model, random queries and their encoding."""
    keys = [f"img_{index:03d}" for index in range(NUM_IMAGES)]
    tokenizer = ImageIdTokenizer(text_tokenizer, build_identifiers(keys, "structured", embeddings=embeddings(),
                                                                   branching=3, leaf_size=3))
    assert tokenizer.max_identifier_length >= 4
    model = make_model(tokenizer, trained_decoder=trained_decoder)
    queries = torch.nn.functional.normalize(
        torch.randn(num_queries, EMBED_DIM, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return tokenizer, model, queries, model.encode(image_embeds=queries)


def test_lookahead_reaches_the_identifiers_ends_in_a_small_collection(text_tokenizer, caption_corpus, monkeypatch):
    # Four-level structured tree (branching 3, leaves of 3), step 0, one beam. Two levels below a prefix do not reach
    # the edges that set its images apart; in a collection this small the frontier lets the lookahead go on to the
    # identifiers' ends, so every prefix is ranked by its best image and the beam finds the exact best every time.
    tokenizer, model, queries, encoded = _four_level_search(text_tokenizer, num_queries=200, seed=4,
                                                            trained_decoder=False)
    gold = (queries @ torch.as_tensor(embeddings()).T).argmax(dim=1).tolist()

    def top1():
        hits = trie_beam_search(model, tokenizer.prefix_trie, encoded, num_beams=1, top_k=1)
        return [row[0][0] for row in hits]

    assert top1() == gold
    monkeypatch.setattr(trie_beam_search_gcmr, "LOOKAHEAD_FRONTIER", 0)
    assert sum(found != best for found, best in zip(top1(), gold)) >= 10


def _assert_same_hits(hits, expected):
    assert [[key for key, _ in row] for row in hits] == [[key for key, _ in row] for row in expected]
    assert torch.tensor([score for row in hits for _, score in row]) == pytest.approx(
        torch.tensor([score for row in expected for _, score in row]), abs=1e-4)


def test_lookahead_scores_the_same_by_table_by_matrix_product_and_pair_by_pair(text_tokenizer, caption_corpus,
                                                                                  monkeypatch):
    # The lookahead reads its scores from one (queries x every edge) table in a small trie (SCORE_TABLE_LIMIT), else
    # per level from one (queries x distinct edges) product or per-pair gathers (SHARED_SCORE_RATIO): speed choices
    # only, so forcing each must give the same hits and the same scores.
    tokenizer, model, _, encoded = _four_level_search(text_tokenizer, num_queries=50, seed=5)

    def search(table_limit, ratio):
        monkeypatch.setattr(trie_beam_search_gcmr, "SCORE_TABLE_LIMIT", table_limit)
        monkeypatch.setattr(trie_beam_search_gcmr, "SHARED_SCORE_RATIO", ratio)
        return trie_beam_search(model, tokenizer.prefix_trie, encoded, num_beams=3, top_k=5)

    table, product, paired = search(1 << 30, 0), search(0, 10**9), search(0, 0)
    _assert_same_hits(product, table)
    _assert_same_hits(paired, table)


def test_lookahead_that_reached_the_ends_is_not_walked_again(text_tokenizer, caption_corpus, monkeypatch):
    # Four-level structured tree, decoder trained: in a collection this small the first step's lookahead walks every
    # path to its end, so its values are exact and later steps reuse them (their candidates lie below the prefixes it
    # walked). Reusing must change nothing against walking again at every step, and must walk only once.
    tokenizer, model, _, encoded = _four_level_search(text_tokenizer, num_queries=40, seed=7)
    walks = []
    best_below = trie_beam_search_gcmr._best_below

    def counting(*args):
        walks.append(len(args[4]))
        return best_below(*args)

    monkeypatch.setattr(trie_beam_search_gcmr, "_best_below", counting)

    def search():
        walks.clear()
        hits = trie_beam_search(model, tokenizer.prefix_trie, encoded, num_beams=2, top_k=5)
        return hits, len(walks)

    reused, reused_walks = search()
    monkeypatch.setattr(trie_beam_search_gcmr._KnownAhead, "add", lambda self, *args: None)
    walked, every_step = search()
    assert reused_walks == 1 < every_step
    _assert_same_hits(reused, walked)


def test_lookahead_pool_falls_back_where_its_first_level_is_too_wide(text_tokenizer, caption_corpus, monkeypatch):
    # The pool is 16 x beam where looking ahead is cheap, and LOOKAHEAD_POOL_FLOOR x beam where the pool's first
    # lookahead level would score more than LOOKAHEAD_EDGE_BUDGET edges per query (a million-image trie's root).
    keys = [f"img_{index:03d}" for index in range(NUM_IMAGES)]
    tokenizer = ImageIdTokenizer(text_tokenizer, build_identifiers(keys, "structured", embeddings=embeddings(),
                                                                   branching=20, leaf_size=3))
    model = make_model(tokenizer, trained_decoder=False)
    queries = torch.nn.functional.normalize(torch.randn(8, EMBED_DIM, generator=torch.Generator().manual_seed(6)),
                                            dim=-1)
    encoded = model.encode(image_embeds=queries)
    looked_ahead = []
    best_below = trie_beam_search_gcmr._best_below

    def counting(head, engine, base, query_ids, nodes, first_level, known):
        if len(nodes):
            looked_ahead.append(len(nodes) / len(torch.unique(query_ids)))
        return best_below(head, engine, base, query_ids, nodes, first_level, known)

    monkeypatch.setattr(trie_beam_search_gcmr, "_best_below", counting)

    def search(lookahead):
        looked_ahead.clear()
        hits = trie_beam_search(model, tokenizer.prefix_trie, encoded, num_beams=1, top_k=1, lookahead=lookahead)
        return hits, max(looked_ahead)

    wide, widest_pool = search(trie_beam_search_gcmr.LOOKAHEAD_POOL)
    assert widest_pool > trie_beam_search_gcmr.LOOKAHEAD_POOL_FLOOR
    monkeypatch.setattr(trie_beam_search_gcmr, "LOOKAHEAD_EDGE_BUDGET", 1)
    fallback, fallback_pool = search(trie_beam_search_gcmr.LOOKAHEAD_POOL)
    assert fallback_pool <= trie_beam_search_gcmr.LOOKAHEAD_POOL_FLOOR
    assert fallback == search(trie_beam_search_gcmr.LOOKAHEAD_POOL_FLOOR)[0]
