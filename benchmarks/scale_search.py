#!/usr/bin/env python
"""Search at collection scale against exact search: ms per query and recall per lookahead budget (issue 16).

`benchmarks/scale.py` times search with random captions through a tiny untrained T5, whose query vectors all look
alike; a real query lies near the images it is about. Here the queries are images of the collection with noise
added (`--noise` x a random unit vector / sqrt(D), re-normalised), searched through `model.retrieve(image_embeds=...)`
decoder-free (no training step: the model is the dense-aware start, constrained inner-product search over path
sums), against exact inner-product search of the same features (`faiss.IndexFlatIP`, the same 2 cores) in the same
run. For each size and each `LOOKAHEAD_EDGE_BUDGET` (the beam's lookahead, `trie_beam_search_gcmr`): ms per query at
batch 64 and beam 10, R@1 / R@10 of the noisy image's source, and the overlap of the top 10 with exact search.
Synthetic features and coarse_fine identifiers as in scale.py.

    python benchmarks/scale_search.py                                     # 10k and 1M, budgets 256..16384
    python benchmarks/scale_search.py --sizes 10000 --budgets 1024,4096   # a quick look

Writes `benchmarks/results/scale_search/results.json`, `docs/scale_search.png` and the `scale_search` section of
`docs/benchmarks.md`. Not in `make test`; run it alone on the machine.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as scale.py: huge pages for the 1M tables

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402
from report import REPO, git_revision, machine, markdown_table, write_section  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "scale_search"
PLOT_PATH = REPO / "docs" / "scale_search.png"
WARM_UP = 64


def noisy_queries(features: np.ndarray, count: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` rows of `features` with noise of norm about `noise`, re-normalised, and the rows they came from."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(features), count, replace=False)
    queries = features[rows] + noise * rng.standard_normal((count, features.shape[1]), dtype=np.float32) / np.sqrt(
        features.shape[1])
    return queries / np.linalg.norm(queries, axis=1, keepdims=True), rows


def run_size(size: int, budgets: list[int], num_queries: int, noise: float) -> list[dict]:
    import faiss
    import torch

    from modeling_gcmr import trie_beam_search_gcmr
    from tokenization_gcmr import ImageIdTokenizer, build_identifiers, train_text_tokenizer

    torch.manual_seed(0)
    features = scale.features(size, seed=0)
    keys = [f"img{i}" for i in range(size)]
    table = build_identifiers(keys, id_type="coarse_fine", embeddings=features, seed=0)
    tokenizer = ImageIdTokenizer(train_text_tokenizer(scale.captions(2000, seed=1), vocab_size=200), table)
    del table
    model = scale.tiny_model(tokenizer)
    model.set_identifier_vocabulary(tokenizer, image_embeds=features)
    model.eval()
    queries, gold = noisy_queries(features, WARM_UP + num_queries, noise, seed=5)
    index = faiss.IndexFlatIP(features.shape[1])
    index.add(features)
    index.search(queries[:WARM_UP], 10)
    start = time.perf_counter()
    _, exact = index.search(queries[WARM_UP:], 10)
    flat_ms = 1000 * (time.perf_counter() - start) / num_queries
    gold, row_of = gold[WARM_UP:], {key: row for row, key in enumerate(keys)}
    default = trie_beam_search_gcmr.LOOKAHEAD_EDGE_BUDGET
    results = []

    def search(part: np.ndarray) -> list:
        with torch.inference_mode():
            return model.retrieve(tokenizer=tokenizer, image_embeds=torch.from_numpy(part), top_k=10, num_beams=10,
                                  batch_size=64, show_progress=False)

    try:
        for budget in budgets:
            trie_beam_search_gcmr.LOOKAHEAD_EDGE_BUDGET = budget
            search(queries[:WARM_UP])
            start = time.perf_counter()
            hits = search(queries[WARM_UP:])
            generative_ms = 1000 * (time.perf_counter() - start) / num_queries
            found = [[row_of[key] for key, _ in row] for row in hits]
            results.append({
                "size": size, "budget": budget, "default": budget == default, "generative_ms_per_query": generative_ms,
                "flat_ms_per_query": flat_ms,
                "recall@1": float(np.mean([row[:1] == [g] for row, g in zip(found, gold)])),
                "recall@10": float(np.mean([g in row for row, g in zip(found, gold)])),
                "flat_recall@1": float(np.mean(exact[:, 0] == gold)),
                "flat_recall@10": float(np.mean([g in row for row, g in zip(exact, gold)])),
                "overlap@10": float(np.mean([len(set(row) & set(best)) / 10 for row, best in zip(found, exact)])),
            })
            print(results[-1], flush=True)
    finally:
        trie_beam_search_gcmr.LOOKAHEAD_EDGE_BUDGET = default
    return results


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for size, color in zip(sorted({r["size"] for r in results}), ("tab:blue", "tab:orange", "tab:green")):
        rows = sorted((r for r in results if r["size"] == size), key=lambda r: r["budget"])
        axis.plot([r["generative_ms_per_query"] for r in rows], [100 * r["overlap@10"] for r in rows], "o-",
                  color=color, label=f"{size:,} images: trie beam search (lookahead budget)")
        for r in rows:
            axis.annotate(str(r["budget"]), (r["generative_ms_per_query"], 100 * r["overlap@10"]), fontsize=7)
        axis.axvline(rows[0]["flat_ms_per_query"], color=color, linestyle=":", label=f"{size:,}: exact flat search")
    axis.set_xscale("log")
    axis.set_xlabel("ms per query (batch 64, 2 CPU cores)")
    axis.set_ylabel("top-10 overlap with exact search (%)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--budgets", default="256,1024,4096,16384")
    parser.add_argument("--queries", type=int, default=512)
    parser.add_argument("--noise", type=float, default=2.0)
    args = parser.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",")]
    results = [r for size in args.sizes.split(",") for r in run_size(int(size), budgets, args.queries, args.noise)]
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/scale_search.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    (RESULTS / "results.json").write_text(json.dumps({"command": command, "results": results}, indent=1))
    plot(results, PLOT_PATH)
    rows = [[f"{r['size']:,}", f"{r['budget']:,}" + (" (default)" if r["default"] else ""),
             f"{r['generative_ms_per_query']:.2f}", f"{r['flat_ms_per_query']:.2f}",
             f"{r['generative_ms_per_query'] / r['flat_ms_per_query']:.1f}x", f"{100 * r['recall@1']:.1f}",
             f"{100 * r['recall@10']:.1f}", f"{100 * r['flat_recall@10']:.1f}", f"{100 * r['overlap@10']:.1f}"]
            for r in results]
    table = markdown_table(["images", "lookahead budget", "beam search ms/q", "exact flat ms/q", "beam / flat",
                            "R@1", "R@10", "exact R@10", "top-10 overlap with exact"], rows)
    print(table)
    section = "\n".join([
        "### Search at scale against exact search", "",
        f"Written by `{command}` (revision {git_revision()}); {machine()}. Queries: {args.queries} collection images "
        f"with noise {args.noise} (see the script), decoder-free coarse_fine search at beam 10 against "
        "`faiss.IndexFlatIP` over the same features, in the same process.", "", table, "",
        "![ms per query against top-10 overlap with exact search](scale_search.png)"])
    write_section(scale.DOC_PATH, "scale_search", section, "")


if __name__ == "__main__":
    main()
