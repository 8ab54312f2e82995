"""Build time and size of the identifier prefix trie.

Identifiers are shaped like ACE's coarse_fine ids: one coarse token out of `--coarse` plus `--levels`
fine tokens out of `--codebook` each, and a uniqueness token where codes collide, so lengths vary.

    python benchmarks/trie_size.py --sizes 10000 1000000
"""
import argparse
import time

import numpy as np
from decoding import (
    coarse_fine_rows,  # the decoding benchmark's synthetic ids (this script's folder is on sys.path)
)

from tokenization_gcmr.prefix_trie import PrefixTrie


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--coarse", type=int, default=256)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--codebook", type=int, default=256)
    args = parser.parse_args()
    print(f"{'identifiers':>12} {'mean len':>8} {'build s':>8} {'nodes':>10} {'edges':>10} {'MB':>8} {'B/id':>6} {'lookup s':>8}")
    for count in args.sizes:
        rows = coarse_fine_rows(count, np.random.default_rng(0), args.levels, args.codebook, args.coarse)
        vocab_size = int(rows.max()) + 1
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
