"""constrained_retrieve: valid, duplicate-free, best-first hits whose scores are real log-probabilities."""
import numpy as np
import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration
from transformers.testing_utils import CaptureLogger

from modeling_gcmr import prefix_trie_logits_processor
from modeling_gcmr.prefix_trie_logits_processor import constrained_retrieve
from tokenization_gcmr import build_identifiers
from tokenization_gcmr.tokenization_gcmr import ImageIdTokenizer

NUM_IMAGES = 60
ID_TYPE_OPTIONS = {
    "atomic": {},
    "structured": {"branching": 3, "leaf_size": 5},
    "semantic": {"text_tokenizer": True, "max_length": 3},  # text pieces, variable length
    "coarse_fine": {"num_coarse": 3, "num_levels": 2, "codebook_size": 4},
}


def make_tokenizer(text_tokenizer, captions, id_type, count=NUM_IMAGES):
    keys = [f"img_{index:03d}" for index in range(count)]
    embeddings = np.random.default_rng(0).normal(size=(count, 8)).astype(np.float32)
    options = dict(ID_TYPE_OPTIONS[id_type])
    if options.pop("text_tokenizer", False):
        options["text_tokenizer"] = text_tokenizer
    table = build_identifiers(keys, id_type=id_type, embeddings=embeddings, captions=captions[:count], seed=0,
                              **options)
    return ImageIdTokenizer(text_tokenizer, table)


def make_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=16, d_ff=32, d_kv=8, num_layers=2, num_heads=2,
                      decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    return T5ForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def setups(text_tokenizer, caption_corpus):
    built = {}
    for id_type in ID_TYPE_OPTIONS:
        tokenizer = make_tokenizer(text_tokenizer, caption_corpus, id_type)
        built[id_type] = (tokenizer, make_model(tokenizer))
    return built


def random_queries(tokenizer, count, seed):
    """Random text-token ids (no identifier tokens) as encoder input, with random lengths."""
    rng = np.random.default_rng(seed)
    input_ids = torch.from_numpy(rng.integers(3, tokenizer.num_text_tokens, size=(count, 8)))
    lengths = torch.from_numpy(rng.integers(1, 9, size=count))
    attention_mask = (torch.arange(8)[None, :] < lengths[:, None]).long()
    return {"input_ids": input_ids * attention_mask, "attention_mask": attention_mask}


def teacher_forced_log_prob(model, tokenizer, inputs, row, key):
    labels = torch.tensor([tokenizer.identifier_ids(key) + [tokenizer.eos_token_id]])
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"][row : row + 1],
                       attention_mask=inputs["attention_mask"][row : row + 1], labels=labels).logits
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[..., None]).sum().item()


@pytest.mark.parametrize("id_type", list(ID_TYPE_OPTIONS))
def test_random_queries_give_valid_unique_sorted_hits(setups, id_type):
    # 500 random queries per id type, 2000 in all.
    tokenizer, model = setups[id_type]
    real_keys = set(tokenizer.keys)
    for batch in range(2):
        inputs = random_queries(tokenizer, 250, seed=batch)
        hits = constrained_retrieve(model, tokenizer, inputs, top_k=5, num_beams=5)
        assert len(hits) == 250
        for row in hits:
            keys = [key for key, _ in row]
            scores = [score for _, score in row]
            assert len(keys) == 5
            assert set(keys) <= real_keys
            assert len(set(keys)) == len(keys)
            assert scores == sorted(scores, reverse=True)
            assert all(np.isfinite(scores)) and max(scores) <= 0.0


@pytest.mark.parametrize("id_type", ["structured", "semantic"])
@pytest.mark.parametrize("num_beams", [1, 4])
def test_score_is_the_teacher_forced_log_probability_of_identifier_and_eos(setups, id_type, num_beams):
    tokenizer, model = setups[id_type]
    inputs = random_queries(tokenizer, 6, seed=7)
    hits = constrained_retrieve(model, tokenizer, inputs, top_k=num_beams, num_beams=num_beams)
    for row, row_hits in enumerate(hits):
        assert len(row_hits) == num_beams
        for key, score in row_hits:
            assert score == pytest.approx(teacher_forced_log_prob(model, tokenizer, inputs, row, key), abs=1e-4)


def test_beam_search_finds_the_best_identifier_of_a_small_corpus(text_tokenizer, caption_corpus):
    # With as many beams as identifiers the search is exhaustive: hits are every key, ranked by log-prob.
    tokenizer = make_tokenizer(text_tokenizer, caption_corpus, "semantic", count=6)
    model = make_model(tokenizer, seed=3)
    inputs = random_queries(tokenizer, 3, seed=1)
    hits = constrained_retrieve(model, tokenizer, inputs, top_k=6, num_beams=12)
    for row, row_hits in enumerate(hits):
        exact = sorted(((teacher_forced_log_prob(model, tokenizer, inputs, row, key), key) for key in tokenizer.keys),
                       reverse=True)
        assert [key for key, _ in row_hits] == [key for _, key in exact]


def test_fewer_identifiers_than_beams_returns_each_once(text_tokenizer, caption_corpus):
    tokenizer = make_tokenizer(text_tokenizer, caption_corpus, "atomic", count=4)
    model = make_model(tokenizer)
    hits = constrained_retrieve(model, tokenizer, random_queries(tokenizer, 5, seed=2), top_k=8, num_beams=8)
    for row in hits:
        assert sorted(key for key, _ in row) == sorted(tokenizer.keys)


def test_top_k_above_num_beams_raises_the_beams_and_warns_once(setups):
    tokenizer, model = setups["coarse_fine"]
    inputs = random_queries(tokenizer, 3, seed=4)
    logger = prefix_trie_logits_processor.logger
    with CaptureLogger(logger) as captured:
        hits = constrained_retrieve(model, tokenizer, inputs, top_k=7, num_beams=3)
        constrained_retrieve(model, tokenizer, inputs, top_k=7, num_beams=3)
    assert captured.out.count("raising num_beams to 7") == 1
    assert all(len(row) == 7 for row in hits)


def test_default_num_beams_comes_from_the_model_config(setups):
    tokenizer, model = setups["structured"]
    model.generation_config.num_beams = 3
    hits = constrained_retrieve(model, tokenizer, random_queries(tokenizer, 2, seed=5), top_k=1)
    assert all(len(row) == 1 for row in hits)
    with pytest.raises(ValueError, match="num_beams must be >= 1"):
        constrained_retrieve(model, tokenizer, random_queries(tokenizer, 1, seed=5), top_k=1, num_beams=0)


@pytest.mark.parametrize("top_k", [0, -1, 2.5, True])
def test_bad_top_k_is_rejected(setups, top_k):
    tokenizer, model = setups["atomic"]
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        constrained_retrieve(model, tokenizer, random_queries(tokenizer, 1, seed=0), top_k=top_k, num_beams=2)


def test_image_queries_through_gcmr_retrieve(text_tokenizer, caption_corpus):
    from modeling_gcmr import GcmrConfig, GcmrForRetrieval

    tokenizer = make_tokenizer(text_tokenizer, caption_corpus, "coarse_fine", count=20)
    text_config = T5Config(vocab_size=tokenizer.num_text_tokens, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                           num_heads=4, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = GcmrForRetrieval(GcmrConfig(text_config=text_config, image_embed_dim=8, num_visual_tokens=2))
    model.set_identifier_vocabulary(tokenizer)
    image_embeds = torch.randn(5, 8)
    hits = model.retrieve(tokenizer=tokenizer, image_embeds=image_embeds, top_k=4, num_beams=4)
    assert len(hits) == 5
    for row in hits:
        assert len(row) == 4 and len({key for key, _ in row}) == 4
        assert {key for key, _ in row} <= set(tokenizer.keys)
