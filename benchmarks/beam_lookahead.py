#!/usr/bin/env python
"""What the trie beam search loses against exact search: R@1/R@10 of a saved retriever per lookahead setting.

Loads a retriever written by `real_captions.py` (its `<run>/run/retriever` folder), encodes the held-out queries of
the same caption file once, and decodes them with `trie_beam_search` at each `--lookahead` (0: prefixes ranked by
partial sum alone) and each `--frontier` (`LOOKAHEAD_FRONTIER`; 0: exactly `LOOKAHEAD_DEPTH` levels). The exact baseline in the same run is inner-product search of the model's own query vectors
against the stored image features: at step 0 (`real_captions.py --untrained`) that is dense MiniLM search, so the
gap is what the beam prunes. Tune on the dev files only.

    python benchmarks/real_captions.py --dataset f30k-dev --id_type coarse_fine --untrained
    python benchmarks/beam_lookahead.py --dataset f30k-dev --lookahead 0,4,16 --frontier 0,64 \\
        --retriever benchmarks/results/real_captions/f30k-dev-coarse_fine-untrained/run/retriever
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads its OpenMP runtime (shared cores)

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_captions import DEFAULT_DATA_DIR, QUERY_CAPTIONS, read_captions  # noqa: E402

from modeling_gcmr import GcmrForRetrieval  # noqa: E402
from modeling_gcmr.query_inputs_gcmr import tokenize_queries  # noqa: E402
from modeling_gcmr import trie_beam_search_gcmr  # noqa: E402
from tokenization_gcmr import ImageIdTokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retriever", required=True, help="A retriever folder saved by real_captions.py.")
    parser.add_argument("--dataset", default="f30k-dev", help="Caption file whose queries (captions 2-4) to decode.")
    parser.add_argument("--data_dir", default=os.environ.get("GCMR_CAPTIONS_DIR", str(DEFAULT_DATA_DIR)))
    parser.add_argument("--lookahead", default="0,4", help="Comma-separated lookahead pools (0: none).")
    parser.add_argument("--frontier", default=str(trie_beam_search_gcmr.LOOKAHEAD_FRONTIER),
                        help="Comma-separated LOOKAHEAD_FRONTIER values (0: the lookahead stops at LOOKAHEAD_DEPTH).")
    parser.add_argument("--num_beams", type=int, default=10)
    parser.add_argument("--max_queries", type=int, default=3000)
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args(argv)

    captions = read_captions(Path(args.data_dir) / f"{args.dataset}.txt")
    queries = [caps[j] for caps in captions for j in QUERY_CAPTIONS][: args.max_queries]
    model = GcmrForRetrieval.from_pretrained(args.retriever).eval()
    tokenizer = ImageIdTokenizer.from_pretrained(args.retriever)
    if model.stored_image_features is None:
        raise SystemExit(f"{args.retriever} has no stored image features (run_gcmr.py --store_image_features)")
    row_of = {key: row for row, key in enumerate(tokenizer.keys)}
    gold = np.array([row_of[f"img_{image:05d}"] for image in range(len(captions)) for _ in QUERY_CAPTIONS])
    gold = gold[: len(queries)]
    order = np.argsort([len(query) for query in queries])
    with torch.no_grad():
        start = time.perf_counter()
        batches = []
        for first in range(0, len(queries), args.batch_size):
            rows = order[first : first + args.batch_size]
            inputs, _ = tokenize_queries(tokenizer, [queries[i] for i in rows], model.config.query_token_limit)
            batches.append((rows, model.encode(**inputs)))
        encode_seconds = time.perf_counter() - start
        features = model.stored_image_features.float()
        exact = np.zeros((len(queries), 10), dtype=np.int64)
        for rows, encoded in batches:
            exact[rows] = (encoded.query_vectors.float() @ features.T).topk(10, dim=1).indices.numpy()
        lines = [_line("exact inner product (stored features)", exact, gold, 0.0)]
        settings = [(int(pool), int(frontier)) for pool in args.lookahead.split(",")
                    for frontier in args.frontier.split(",")]
        for lookahead, frontier in settings:
            # A module constant, read at each search: the benchmark sets it, the library never changes it.
            trie_beam_search_gcmr.LOOKAHEAD_FRONTIER = frontier
            found = np.full((len(queries), 10), -1)
            start = time.perf_counter()
            for rows, encoded in batches:
                hits = trie_beam_search_gcmr.trie_beam_search(model, tokenizer.prefix_trie, encoded, args.num_beams,
                                                              10, lookahead=lookahead)
                for row, row_hits in zip(rows, hits):
                    found[row, : len(row_hits)] = [index for index, _ in row_hits]
            lines.append(_line(f"beam {args.num_beams}, lookahead pool {lookahead}, frontier {frontier}", found, gold,
                               time.perf_counter() - start))
    print(f"{len(queries)} queries of {args.dataset}; query encoding {encode_seconds:.1f} s (not in the search times)")
    print("\n".join(lines))


def _line(name: str, hits: np.ndarray, gold: np.ndarray, seconds: float) -> str:
    recall_1 = 100 * (hits[:, 0] == gold).mean()
    recall_10 = 100 * (hits == gold[:, None]).any(axis=1).mean()
    return f"| {name} | {recall_1:.1f} | {recall_10:.1f} | {seconds:.1f} |"


if __name__ == "__main__":
    main()
