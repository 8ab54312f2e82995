"""generate() under PrefixTrieLogitsProcessor and retrieve() rank alike, for both heads.

Identifier head (every id type): generate() runs retrieve()'s trie beam search and returns its hits as token
sequences with their summed scores. Text head: retrieve() is generate() under the processor with length_penalty=0.
A processor built from another tokenizer is refused by both.
"""
import numpy as np
import pytest
import torch
from test_retrieve import (
    HEAD_TYPES,
    EMBED_DIM,
    embeddings,
    make_model,
    make_tokenizer,
    random_queries,
    setups,  # noqa: F401  (module fixture)
)
from transformers import LogitsProcessorList, T5Config

from modeling_gcmr import GcmrConfig, GcmrForRetrieval, PrefixTrieLogitsProcessor
from modeling_gcmr.retrieval_gcmr import search


def on_trie(tokenizer) -> LogitsProcessorList:
    return LogitsProcessorList([PrefixTrieLogitsProcessor(tokenizer.prefix_trie)])


def generated_hits(tokenizer, out, num_return: int) -> list[list[tuple[str, float]]]:
    # the trie's lookup reads up to the first EOS (transformers pads finished beams with EOS or padding)
    keys = [tokenizer.keys[i] if i >= 0 else None for i in tokenizer.prefix_trie.lookup(out.sequences[:, 1:]).tolist()]
    scores = out.sequences_scores.tolist()
    return [list(zip(keys[i : i + num_return], scores[i : i + num_return])) for i in range(0, len(keys), num_return)]


@pytest.mark.parametrize("id_type", HEAD_TYPES)
def test_identifier_head_generate_returns_the_hits_of_retrieve(setups, id_type):  # noqa: F811
    tokenizer, model = setups[id_type]
    inputs = random_queries(tokenizer, 4, seed=3)
    out = model.generate(**inputs, logits_processor=on_trie(tokenizer), num_beams=5, num_return_sequences=3,
                         return_dict_in_generate=True, output_scores=True)
    got = generated_hits(tokenizer, out, 3)
    want = [[(tokenizer.keys[k], s) for k, s in row] for row in search(model, tokenizer, inputs, top_k=3, num_beams=5)]
    assert [[k for k, _ in row] for row in got] == [[k for k, _ in row] for row in want]
    np.testing.assert_allclose([[s for _, s in row] for row in got], [[s for _, s in row] for row in want], rtol=1e-5)
    # each sequence is the decoder start, the identifier, EOS, then padding
    for sequence, key in zip(out.sequences.tolist(), tokenizer.keys_for(out.sequences[:, 1:])):
        ids = tokenizer.identifier_ids(key)
        assert sequence[0] == model.config.decoder_start_token_id
        assert sequence[1 : len(ids) + 2] == ids + [tokenizer.eos_token_id]
        assert set(sequence[len(ids) + 2 :]) <= {model.config.pad_token_id}
    # greedy (num_beams=1): the plain tensor of transformers' default, retrieve()'s top hit with one beam
    greedy = model.generate(**inputs, logits_processor=on_trie(tokenizer))
    assert tokenizer.keys_for(greedy[:, 1:]) == [tokenizer.keys[row[0][0]]
                                                 for row in search(model, tokenizer, inputs, top_k=1, num_beams=1)]


def test_identifier_head_generate_agrees_with_retrieve_on_text_and_image_queries(setups):  # noqa: F811
    tokenizer, model = setups["semantic"]
    texts = ["a red circle left of a blue square", "a big green star"]
    out = model.generate(**tokenizer(texts, padding=True, return_tensors="pt"), logits_processor=on_trie(tokenizer),
                         num_beams=4, num_return_sequences=4, return_dict_in_generate=True, output_scores=True)
    want = model.retrieve(texts, tokenizer, top_k=4, num_beams=4)
    got = generated_hits(tokenizer, out, 4)
    assert [[k for k, _ in row] for row in got] == [[k for k, _ in row] for row in want]
    images = torch.as_tensor(embeddings()[:3])
    out = model.generate(image_embeds=images, logits_processor=on_trie(tokenizer), num_beams=3, num_return_sequences=3,
                         return_dict_in_generate=True, output_scores=True)
    want = model.retrieve(tokenizer=tokenizer, image_embeds=images, top_k=3, num_beams=3)
    assert [[k for k, _ in row] for row in generated_hits(tokenizer, out, 3)] == [[k for k, _ in row] for row in want]


def test_identifier_head_generate_refuses_what_it_cannot_do(setups):  # noqa: F811
    tokenizer, model = setups["coarse_fine"]
    inputs = random_queries(tokenizer, 2, seed=1)
    with pytest.raises(ValueError, match=r"decodes on the identifier trie only: pass logits_processor="):
        model.generate(**inputs)
    with pytest.raises(ValueError, match="do_sample=True is not supported"):
        model.generate(**inputs, logits_processor=on_trie(tokenizer), do_sample=True)
    with pytest.raises(ValueError, match=r"max_new_tokens=1 cannot hold an identifier"):
        model.generate(**inputs, logits_processor=on_trie(tokenizer), max_new_tokens=1)
    with pytest.raises(ValueError, match="unknown argument.*decoder_input_ids"):
        model.generate(**inputs, logits_processor=on_trie(tokenizer), decoder_input_ids=inputs["input_ids"])


@pytest.mark.parametrize("head", ["identifier", "text"])
def test_a_processor_from_another_tokenizer_is_refused(text_tokenizer, caption_corpus, head):
    tokenizer = make_tokenizer(text_tokenizer, caption_corpus, "semantic", count=20)
    other = make_tokenizer(text_tokenizer, caption_corpus[20:], "semantic", count=20)
    model = make_model(tokenizer) if head == "identifier" else text_head_model(tokenizer)
    inputs = random_queries(tokenizer, 2, seed=1)
    with pytest.raises(ValueError, match="walks the identifiers of another tokenizer"):
        model.generate(**inputs, logits_processor=on_trie(other), num_beams=2)
    # a trie without the tokenizer's signature (built by hand) is still checked against the model's sizes
    from tokenization_gcmr.prefix_trie import PrefixTrie

    hand_made = PrefixTrie.from_sequences(other.identifier_token_rows, other.eos_token_id, len(other) + 50)
    with pytest.raises(ValueError, match="build it from the tokenizer saved with this model"):
        model.generate(**inputs, logits_processor=LogitsProcessorList([PrefixTrieLogitsProcessor(hand_made)]),
                       num_beams=2)
    model.generate(**inputs, logits_processor=on_trie(tokenizer), num_beams=2, max_new_tokens=20)


def test_a_processor_stays_valid_across_collection_edits(text_tokenizer, caption_corpus):
    tokenizer = make_tokenizer(text_tokenizer, caption_corpus, "coarse_fine", count=20)
    model = make_model(tokenizer)
    processor = on_trie(tokenizer)  # holds the tokenizer's own trie object, edited in place by removals
    model.remove_images([tokenizer.keys[0]], tokenizer)
    out = model.generate(**random_queries(tokenizer, 3, seed=2), logits_processor=processor, num_beams=19,
                         num_return_sequences=19)
    assert tokenizer.keys[0] not in tokenizer.keys_for(out[:, 1:])


def text_head_model(tokenizer, seed=0):
    """A GCMR model whose config asks for the text head (the LM head over the vocabulary)."""
    torch.manual_seed(seed)
    text_config = T5Config(vocab_size=tokenizer.num_text_tokens, d_model=16, d_ff=32, d_kv=8, num_layers=2,
                           num_heads=2, decoder_start_token_id=0)
    model = GcmrForRetrieval(GcmrConfig(text_config=text_config, image_embed_dim=EMBED_DIM, num_beams=4,
                                        identifier_head="text"))
    model.set_identifier_vocabulary(tokenizer, init="random")
    return model.eval()


def test_text_head_retrieve_is_generate_with_length_penalty_zero(text_tokenizer, caption_corpus):
    tokenizer = make_tokenizer(text_tokenizer, caption_corpus, "semantic", count=20)
    model = text_head_model(tokenizer)
    assert model.identifier_head is None and model.config.identifier_head == "text"
    with pytest.raises(ValueError, match=r"store_image_features needs the identifier head; .* text head"):
        model.store_image_features(torch.zeros(20, EMBED_DIM))
    texts = ["a red circle left of a blue square", "a big green star"]
    out = model.generate(**tokenizer(texts, padding=True, return_tensors="pt"), logits_processor=on_trie(tokenizer),
                         num_beams=4, num_return_sequences=4, length_penalty=0.0, max_new_tokens=20,
                         return_dict_in_generate=True, output_scores=True)
    want = model.retrieve(texts, tokenizer, top_k=4, num_beams=4)
    got = generated_hits(tokenizer, out, 4)
    for got_row, want_row in zip(got, want):
        assert [k for k, _ in got_row] == [k for k, _ in want_row]
        np.testing.assert_allclose([s for _, s in got_row], [s for _, s in want_row], rtol=1e-4, atol=1e-4)


def test_a_text_head_checkpoint_keeps_its_head_and_refuses_rerank(text_tokenizer, caption_corpus, tmp_path):
    """Models fitted to string/semantic identifiers before they moved to the identifier head say "text" in their
    config: they load and search through the text head, and rerank (which needs the identifier head's query vectors
    and stored features) is refused with the reason, before anything runs."""
    from modeling_gcmr import save_retriever

    tokenizer = make_tokenizer(text_tokenizer, caption_corpus, "semantic", count=20)
    model = text_head_model(tokenizer)
    save_retriever(model, tokenizer, tmp_path / "checkpoint")
    loaded = GcmrForRetrieval.from_pretrained(tmp_path / "checkpoint").eval()
    assert loaded.config.identifier_head == "text" and loaded.identifier_head is None
    texts = ["a red circle left of a blue square", "a big green star"]
    want = model.retrieve(texts, tokenizer, top_k=3, num_beams=4)
    assert [[k for k, _ in row] for row in loaded.retrieve(texts, tokenizer, top_k=3, num_beams=4)] == \
        [[k for k, _ in row] for row in want]
    for mode in ("features", "hybrid"):
        with pytest.raises(ValueError, match=r"rerank re-scores .* text head \(config.identifier_head=text\)"):
            loaded.retrieve(texts, tokenizer, rerank=mode)
