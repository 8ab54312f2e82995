"""PrefixTrie: CSR structure, exact acceptance (against a dict trie), lookups and bad input."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenization_gcmr.prefix_trie import PrefixTrie, PrefixTrieError

EOS, VOCAB = 1, 12
TOKENS = st.integers(min_value=2, max_value=VOCAB - 1)
IDENTIFIER_SETS = st.lists(st.lists(TOKENS, min_size=1, max_size=5).map(tuple), min_size=1, max_size=40, unique=True)


def pad(sequences, width=None):
    width = width or max(len(seq) for seq in sequences)
    rows = np.full((len(sequences), width), -1, dtype=np.int64)
    for row, seq in enumerate(sequences):
        rows[row, : len(seq)] = seq
    return rows


def dict_trie(sequences):
    """The reference: nested dicts, with EOS -> key index."""
    root = {}
    for index, seq in enumerate(sequences):
        node = root
        for token in seq:
            node = node.setdefault(token, {})
        node[EOS] = index
    return root


def accepted_paths(trie: PrefixTrie):
    """Every root-to-EOS path of the CSR trie, with the key index its EOS edge names."""
    paths, stack = {}, [(0, ())]
    while stack:
        node, prefix = stack.pop()
        for edge in range(trie.offsets[node], trie.offsets[node + 1]):
            token, child = int(trie.child_tokens[edge]), int(trie.child_nodes[edge])
            if child < 0:
                assert token == trie.eos_token_id
                paths[prefix] = -child - 1
            else:
                stack.append((child, prefix + (token,)))
    return paths


@settings(max_examples=60, deadline=None)
@given(IDENTIFIER_SETS, st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6).map(tuple), max_size=20))
def test_trie_accepts_exactly_the_identifiers(sequences, probes):
    trie = PrefixTrie.from_sequences(pad(sequences), EOS, VOCAB)
    # Exactly the identifiers are complete paths, each naming its own row.
    assert accepted_paths(trie) == {seq: index for index, seq in enumerate(sequences)}
    assert trie.num_identifiers == len(sequences)
    # Structure: edges globally sorted by (node, token), one node per distinct proper prefix.
    parents = np.repeat(np.arange(trie.num_nodes), np.diff(trie.offsets))
    search_key = parents.astype(np.int64) * VOCAB + trie.child_tokens
    assert (np.diff(search_key) > 0).all()
    prefixes = {seq[:i] for seq in sequences for i in range(len(seq) + 1)}
    assert trie.num_nodes == len(prefixes)
    assert trie.depth == max(len(seq) for seq in sequences) + 1
    # allowed() agrees with the dict trie for every prefix, and is empty off the trie.
    reference = dict_trie(sequences)
    for prefix in prefixes:
        node = reference
        for token in prefix:
            node = node[token]
        assert trie.allowed(list(prefix)).tolist() == sorted(node)
    # lookup(): every identifier finds its row; a probe finds a row only if it is an identifier.
    assert trie.lookup(pad(sequences)).tolist() == list(range(len(sequences)))
    if probes:
        index = {seq: i for i, seq in enumerate(sequences)}
        expected = [index.get(probe[: probe.index(EOS)] if EOS in probe else probe, -1) for probe in probes]
        assert trie.lookup(pad(probes)).tolist() == expected


def test_identifiers_that_prefix_each_other_are_told_apart_by_eos():
    trie = PrefixTrie.from_sequences(pad([(5, 6), (5,), (5, 6, 7)]), EOS, VOCAB)
    assert trie.allowed([5]).tolist() == [EOS, 6]
    assert trie.allowed([5, 6]).tolist() == [EOS, 7]
    assert trie.allowed([5, 6, 7]).tolist() == [EOS]
    assert trie.allowed([5, 6, 7, EOS]).tolist() == []
    assert trie.allowed([4]).tolist() == []
    # Rows may carry their EOS and anything after it; a missing token or a wrong one is no identifier.
    rows = np.array([[5, EOS, 9], [5, 6, EOS], [5, 6, 7], [6, -1, -1], [5, 7, -1]])
    assert trie.lookup(rows).tolist() == [1, 0, 2, -1, -1]


def test_children_of_many_prefixes_at_once_with_and_without_removed_identifiers():
    rows = pad([(5, 6), (5, 7), (5, 7, 8), (9,)])
    trie = PrefixTrie.from_sequences(rows, EOS, VOCAB)
    trie.remove_identifiers(trie.paths(rows[[1, 2]]))  # (5, 7) and all below it: dead, not gone
    prefixes = np.array([[5, -1, 9], [5, 7, -1], [-1, -1, -1], [4, -1, -1], [9, EOS, -1]])  # a row ends at its -1
    assert [pairs.tolist() for pairs in trie.children(prefixes)] == [[0, 2, 2], [6, 5, 9]]
    assert [pairs.tolist() for pairs in trie.children(prefixes, live_only=False)] == [
        [0, 0, 1, 1, 2, 2], [6, 7, EOS, 8, 5, 9]]
    assert trie.allowed([5]).tolist() == [6]


@settings(max_examples=60, deadline=None)
@given(IDENTIFIER_SETS, IDENTIFIER_SETS, st.randoms(use_true_random=False))
def test_edge_map_finds_every_edge_in_a_rebuilt_trie(old, added, random):
    rows = list(dict.fromkeys(old + added))
    random.shuffle(rows)  # the rebuilt trie numbers its nodes and edges its own way
    before, after = PrefixTrie.from_sequences(pad(old), EOS, VOCAB), PrefixTrie.from_sequences(pad(rows), EOS, VOCAB)
    mapped = before.edge_map(after)
    old_paths = before.paths(pad(old))
    assert (mapped[old_paths[old_paths >= 0]] == after.paths(pad(old))[old_paths >= 0]).all()
    assert (mapped >= 0).all()
    assert (before.edge_map(PrefixTrie.from_sequences(np.zeros((0, 2), dtype=np.int64), EOS, VOCAB)) == -1).all()
    # Edges the other trie lacks map to -1: the new trie against the old one.
    kept = {tuple(path) for row in old for path in (row[:i] for i in range(1, len(row) + 1))}
    new_paths = after.paths(pad(rows))
    backward = after.edge_map(before)
    for row, path in zip(rows, new_paths):
        for depth, edge in enumerate(path[: len(row)]):
            assert (backward[edge] >= 0) == (tuple(row[: depth + 1]) in kept)


def test_arrays_are_compact_int32_and_round_trip():
    trie = PrefixTrie.from_sequences(pad([(3, 4), (3, 5), (6,)]), EOS, VOCAB)
    arrays = trie.arrays()
    assert set(arrays) == {"offsets", "child_tokens", "child_nodes", "eos_token_id", "vocab_size"}
    for name in ("offsets", "child_tokens", "child_nodes"):
        assert arrays[name].dtype == np.int32
    assert arrays["eos_token_id"].ndim == 0 and int(arrays["eos_token_id"]) == EOS
    assert int(arrays["vocab_size"]) == VOCAB
    assert trie.nbytes == sum(arrays[name].nbytes for name in ("offsets", "child_tokens", "child_nodes"))
    again = PrefixTrie.from_arrays(arrays)
    assert again.lookup(pad([(3, 4), (3, 5), (6,), (3,)])).tolist() == [0, 1, 2, -1]
    assert trie.max_fanout == 2


def test_large_random_trie_is_small_and_exact():
    rng = np.random.default_rng(0)
    count, vocab = 20_000, 1_000
    rows = np.unique(rng.integers(2, vocab, size=(count, 4)), axis=0)
    rows = rows[rng.permutation(len(rows))]
    lengths = rng.integers(3, 5, size=len(rows))
    rows[lengths == 3, 3] = -1
    rows = np.unique(rows, axis=0)  # shortening may have created duplicates
    trie = PrefixTrie.from_sequences(rows, EOS, vocab)
    assert (trie.lookup(rows) == np.arange(len(rows))).all()
    assert trie.nbytes / len(rows) < 64
    changed = rows.copy()
    changed[:, 0] = (changed[:, 0] + 1) % vocab
    known = {tuple(row) for row in rows.tolist()}
    expected = [-1 if tuple(row) not in known else 0 for row in changed.tolist()]
    assert ((trie.lookup(changed) >= 0) == (np.array(expected) >= 0)).all()


def test_empty_trie_accepts_nothing():
    trie = PrefixTrie.from_sequences(np.zeros((0, 3), dtype=np.int64), EOS, VOCAB)
    assert trie.num_nodes == 1 and trie.num_edges == 0
    assert trie.lookup(pad([(3,)])).tolist() == [-1]
    assert trie.allowed([]).tolist() == []


@pytest.mark.parametrize(
    "rows, message",
    [
        ([(3, 4), (5,), (3, 4)], r"rows 0 and 2 are the same identifier"),
        ([(3, EOS)], r"row 0 contains the EOS token"),
        ([(3, 4), (3, VOCAB)], r"row 1 has a token outside \[0, 12\)"),
    ],
)
def test_bad_rows_are_named(rows, message):
    with pytest.raises(PrefixTrieError, match=message):
        PrefixTrie.from_sequences(pad(rows), EOS, VOCAB)


def test_bad_padding_and_shapes_are_named():
    with pytest.raises(PrefixTrieError, match=r"row 1 is empty or not right-padded"):
        PrefixTrie.from_sequences(np.array([[3, 4], [-1, 4]]), EOS, VOCAB)
    with pytest.raises(PrefixTrieError, match=r"row 0 is empty"):
        PrefixTrie.from_sequences(np.array([[-1, -1]]), EOS, VOCAB)
    with pytest.raises(PrefixTrieError, match=r"must be 2-D"):
        PrefixTrie.from_sequences(np.array([3, 4]), EOS, VOCAB)
    with pytest.raises(PrefixTrieError, match=r"eos_token_id 12 is outside"):
        PrefixTrie.from_sequences(np.array([[3]]), VOCAB, VOCAB)
