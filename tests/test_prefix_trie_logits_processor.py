"""PrefixTrieLogitsProcessor: allowed sets, dead rows, fp16/bf16 escapes, and generate() on a tiny T5."""
import numpy as np
import pytest
import torch
from transformers import (
    LogitsProcessorList,
    PrefixConstrainedLogitsProcessor,
    T5Config,
    T5ForConditionalGeneration,
)

from modeling_gcmr.prefix_trie_logits_processor import PrefixTrieLogitsProcessor
from tokenization_gcmr.prefix_trie import PrefixTrie

PAD, EOS, TEXT = 0, 1, 40


def rows_array(rows):
    array = np.full((len(rows), max(map(len, rows))), -1, dtype=np.int64)
    for index, row in enumerate(rows):
        array[index, : len(row)] = row
    return array


def atomic_ids():
    return [[TEXT + index] for index in range(30)]


def structured_ids():
    # Fixed length 3, level-specific tokens, fan-out 3 (GRACE structured-like); 20 of the 27 paths.
    paths = [(a, b, c) for a in range(3) for b in range(3) for c in range(3)][:20]
    return [[TEXT + a, TEXT + 3 + b, TEXT + 6 + c] for a, b, c in paths]


def semantic_ids():
    # Variable length, text-like tokens shared across levels, identifiers that prefix others (EOS separates).
    return [[5], [5, 6], [5, 6, 7], [5, 7], [6, 5, 5], [6, 5], [7], [8, 9, 10, 11], [8, 9], [9, 5, 6]]


ID_SHAPES = {"atomic": atomic_ids, "structured": structured_ids, "semantic": semantic_ids}
VOCAB = TEXT + 30


def make_trie(rows):
    return PrefixTrie.from_sequences(rows_array(rows), EOS, VOCAB)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_ff=64, d_kv=16, num_layers=2, num_decoder_layers=2,
                      num_heads=2, decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS)
    return T5ForConditionalGeneration(config).eval()


def queries(count, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(2, TEXT, size=(count, 6)))


def dict_trie(rows):
    root = {}
    for row in rows:
        node = root
        for token in row:
            node = node.setdefault(token, {})
        node[EOS] = {}
    return root


def dict_prefix_fn(root):
    def allowed(batch_id, sent):
        node = root
        for token in sent.tolist()[1:]:
            node = node.get(token)
            if node is None:
                return [EOS, PAD]
        return list(node) or [EOS, PAD]

    return allowed


def generate(model, inputs, num_beams, processor=None, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=inputs, do_sample=False, num_beams=num_beams, num_return_sequences=num_beams,
                              max_new_tokens=5, length_penalty=0.0,
                              logits_processor=LogitsProcessorList([processor]) if processor else None, **kwargs)


def finite_columns(row):
    return set(torch.isfinite(row).nonzero().flatten().tolist())


@pytest.mark.parametrize("shape", list(ID_SHAPES))
def test_allowed_tokens_are_exactly_the_trie_children(shape):
    rows = ID_SHAPES[shape]()
    trie = make_trie(rows)
    processor = PrefixTrieLogitsProcessor(trie, num_skip_tokens=1, pad_token_id=PAD)
    # Every proper prefix of every identifier, plus each complete identifier (EOS must be allowed there).
    prefixes = sorted({tuple(row[:cut]) for row in rows for cut in range(len(row) + 1)})
    width = max(map(len, prefixes))
    for threshold in (1.0, 0.0):  # the (row, token) gather and the per-node dense mask
        processor.dense_threshold = threshold
        for length in range(width + 1):
            group = [p for p in prefixes if len(p) == length]
            input_ids = torch.tensor([[PAD, *p] for p in group]).view(len(group), length + 1)
            out = processor(input_ids, torch.randn(len(group), VOCAB))
            for prefix, row in zip(group, out):
                assert finite_columns(row) == set(trie.allowed(list(prefix)).tolist()), prefix
                assert (EOS in finite_columns(row)) == (list(prefix) in rows)


def test_dead_rows_allow_only_eos_and_pad_and_stay_finite():
    rows = semantic_ids()
    processor = PrefixTrieLogitsProcessor(make_trie(rows), num_skip_tokens=1, pad_token_id=PAD)
    input_ids = torch.tensor([
        [PAD, 5, 6, EOS, PAD],    # finished (greedy pads it)
        [PAD, 12, 13, 14, 15],    # off the trie from the first token
        [PAD, 5, 6, 7, 8],        # off the trie after a real prefix
        [PAD, 5, 6, 7, VOCAB + 3],  # a token beyond the trie's vocabulary must not alias another node
    ])
    scores = torch.randn(4, VOCAB + 8)
    out = processor(input_ids, scores)
    for row in out:
        assert finite_columns(row) == {EOS, PAD}
    assert not torch.isnan(torch.log_softmax(out, dim=-1)).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("threshold", [1.0, 0.0])
def test_row_whose_allowed_tokens_are_all_minus_inf_does_not_escape(dtype, threshold):
    rows = structured_ids()
    trie = make_trie(rows)
    processor = PrefixTrieLogitsProcessor(trie, num_skip_tokens=1, pad_token_id=PAD)
    processor.dense_threshold = threshold
    input_ids = torch.tensor([[PAD], [PAD], [PAD]])
    allowed = trie.allowed([]).tolist()
    scores = torch.full((3, VOCAB), 1000.0, dtype=dtype)  # every out-of-trie token looks great...
    scores[:, allowed] = float("-inf")                    # ...and every allowed one underflowed
    scores[2, allowed[0]] = -5.0                           # a row with one finite allowed token keeps it
    out = processor(input_ids, scores.clone())
    assert out.dtype == dtype
    assert not torch.isnan(out).any()
    assert set(out.argmax(dim=-1).tolist()) <= set(allowed)
    assert out[2].argmax().item() == allowed[0]
    top = out.topk(len(allowed), dim=-1).indices
    assert set(top[:2].flatten().tolist()) == set(allowed)


def test_beam_search_stays_in_trie_when_another_processor_bans_every_allowed_first_token(model):
    rows = structured_ids()
    trie = make_trie(rows)
    processor = PrefixTrieLogitsProcessor(trie, num_skip_tokens=1, pad_token_id=PAD)
    # suppress_tokens runs before our processor and sets every allowed first token to -inf.
    out = generate(model, queries(3), 4, processor, suppress_tokens=trie.allowed([]).tolist())
    assert (processor.trie.lookup(out[:, 1:]) >= 0).all()


@pytest.mark.parametrize("shape", list(ID_SHAPES))
@pytest.mark.parametrize("num_beams", [1, 4])
@pytest.mark.parametrize("batch_size", [1, 5])
def test_generate_returns_only_identifiers_and_matches_the_dict_trie_baseline(model, shape, num_beams, batch_size):
    rows = ID_SHAPES[shape]()
    processor = PrefixTrieLogitsProcessor(make_trie(rows), num_skip_tokens=1, pad_token_id=PAD,
                                          inplace=num_beams > 1)
    inputs = queries(batch_size, seed=batch_size)
    ours = generate(model, inputs, num_beams, processor)
    keys = processor.trie.lookup(ours[:, 1:])
    assert (keys >= 0).all(), ours
    for sequence, key in zip(ours.tolist(), keys.tolist()):
        assert sequence[1 : 1 + len(rows[key]) + 1] == rows[key] + [EOS]
    theirs = generate(model, inputs, num_beams, PrefixConstrainedLogitsProcessor(dict_prefix_fn(dict_trie(rows)), num_beams))
    assert torch.equal(ours, theirs)


def test_dense_sparse_and_inplace_variants_agree():
    rows = structured_ids() + [[TEXT + 20 + index] for index in range(8)]
    trie = make_trie(rows)
    generator = torch.Generator().manual_seed(1)
    # Live rows on many different nodes, finished rows (atomic ids after their EOS) and one off-trie row.
    input_ids = torch.tensor([[PAD, *row[:2]] if len(row) >= 2 else [PAD, row[0], EOS] for row in rows]
                             + [[PAD, 3, 4]])
    scores = torch.randn(len(input_ids), VOCAB + 2, generator=generator)
    outputs = []
    for threshold in (1.0, 0.0):
        for inplace in (False, True):
            processor = PrefixTrieLogitsProcessor(trie, 1, PAD, inplace=inplace)
            processor.dense_threshold = threshold
            given = scores.clone()
            outputs.append(processor(input_ids, given))
            assert (given.data_ptr() == outputs[-1].data_ptr()) == inplace
    for other in outputs[1:]:
        assert torch.equal(outputs[0], other)


def test_bad_tries_and_scores_raise_clear_errors():
    with pytest.raises(TypeError, match="tokenizer.prefix_trie"):
        PrefixTrieLogitsProcessor(make_trie(semantic_ids()).arrays())
    with pytest.raises(ValueError, match="pad_token_id=99 is outside"):
        PrefixTrieLogitsProcessor(make_trie(semantic_ids()), pad_token_id=99)
    processor = PrefixTrieLogitsProcessor(make_trie(semantic_ids()))
    with pytest.raises(ValueError, match="vocab_size=70"):
        processor(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, VOCAB - 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    rows = structured_ids() + semantic_ids()
    processor = PrefixTrieLogitsProcessor(make_trie(rows), 1, PAD)
    input_ids = torch.tensor([[PAD, *row[:2]] + [PAD] * (2 - len(row[:2])) for row in rows])
    scores = torch.randn(len(rows), VOCAB)
    for dtype in (torch.float32, torch.float16):
        on_cuda = processor(input_ids.cuda(), scores.to("cuda", dtype)).cpu()
        assert torch.equal(torch.isfinite(on_cuda), torch.isfinite(processor(input_ids, scores.to(dtype))))
