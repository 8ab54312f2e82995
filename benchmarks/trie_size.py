"""Build time and size of the identifier prefix trie.

Identifiers are shaped like ACE's coarse_fine ids: one coarse token out of `--coarse` plus `--levels`
fine tokens out of `--codebook` each, and a uniqueness token where codes collide, so lengths vary.

    python benchmarks/trie_size.py --sizes 10000 1000000
"""
import argparse
import time

import numpy as np

from tokenization_gcmr.prefix_trie import PrefixTrie


def synthetic_identifiers(count: int, coarse: int, levels: int, codebook: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """(count, levels + 2) token rows right-padded with -1, and the vocabulary size they need."""
    rng = np.random.default_rng(seed)
    base = 3  # <pad>, </s>, <unk>
    codes = np.empty((count, levels + 1), dtype=np.int64)
    codes[:, 0] = rng.integers(0, coarse, count)
    # Skewed fine codes, so collisions (and uniqueness tokens) occur as they do with real embeddings.
    codes[:, 1:] = np.minimum(rng.geometric(8.0 / codebook, size=(count, levels)) - 1, codebook - 1)
    order = np.lexsort(codes.T[::-1])
    sorted_codes = codes[order]
    new_group = np.r_[True, (sorted_codes[1:] != sorted_codes[:-1]).any(axis=1)]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(count), 0))
    rank = np.empty(count, dtype=np.int64)
    rank[order] = np.arange(count) - group_start
    rows = np.full((count, levels + 2), -1, dtype=np.int64)
    rows[:, 0] = base + codes[:, 0]
    for level in range(1, levels + 1):
        rows[:, level] = base + coarse + (level - 1) * codebook + codes[:, level]
    unique_base = base + coarse + levels * codebook
    collided = np.zeros(count, dtype=bool)
    collided[order] = ~new_group | np.r_[~new_group[1:], False]
    rows[collided, levels + 1] = unique_base + rank[collided]
    vocab_size = unique_base + int(rank.max()) + 1
    return rows, vocab_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--coarse", type=int, default=256)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--codebook", type=int, default=256)
    args = parser.parse_args()
    print(f"{'identifiers':>12} {'mean len':>8} {'build s':>8} {'nodes':>10} {'edges':>10} {'MB':>8} {'B/id':>6} {'lookup s':>8}")
    for count in args.sizes:
        rows, vocab_size = synthetic_identifiers(count, args.coarse, args.levels, args.codebook)
        start = time.perf_counter()
        trie = PrefixTrie.from_sequences(rows, eos_token_id=1, vocab_size=vocab_size)
        build = time.perf_counter() - start
        start = time.perf_counter()
        found = trie.lookup(rows)
        lookup = time.perf_counter() - start
        assert (found == np.arange(count)).all(), "lookup must find every identifier"
        mean_len = float((rows >= 0).sum(axis=1).mean())
        print(
            f"{count:>12,} {mean_len:>8.2f} {build:>8.2f} {trie.num_nodes:>10,} {trie.num_edges:>10,} "
            f"{trie.nbytes / 2**20:>8.1f} {trie.nbytes / count:>6.1f} {lookup:>8.2f}"
        )


if __name__ == "__main__":
    main()
