#!/usr/bin/env python
"""Query speed of saved real-caption retrievers against dense search with the same encoder, re-timed in one process.

`real_captions.py` times each system once, when its run ends. This script re-times the retrievers those runs saved
(`<run>/run/retriever`) with the code of this checkout, so a change of the decoder can be measured on the trained
models of every id type without training them again: per run, dense MiniLM search over the run's own image features
(`<run>/corpus.jsonl`) and `model.retrieve` on the run's test queries, both including the query encoder, interleaved
and repeated (the fastest pass counts). It also scores both rankings, so a speed change that altered a ranking shows
as an R@1 that differs from the one the run reported.

    python benchmarks/retrieval_speed.py benchmarks/results/real_captions/f30k-test-structured-feat0 \\
        benchmarks/results/real_captions/coco-testall-semantic

Prints a table, writes `benchmarks/results/retrieval_speed/results.json` and a bar chart beside it.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads its OpenMP runtime (shared cores)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from transformers import AutoTokenizer, BertModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_captions import KS, QUERY_CAPTIONS, embed_sentences, minilm_folder, read_captions, timed  # noqa: E402
from report import REPO, git_revision, machine, markdown_table  # noqa: E402

from modeling_gcmr import GcmrForRetrieval  # noqa: E402
from modeling_gcmr.dense.dual_encoder import DenseIndex  # noqa: E402
from modeling_gcmr.evaluation.metrics import retrieval_metrics, save_results  # noqa: E402
from tokenization_gcmr import ImageIdTokenizer  # noqa: E402

DENSE = "dense MiniLM (faiss IP)"


def run_queries(run: Path, setup: dict) -> tuple[list[str], list[str], list[str], np.ndarray]:
    """The run's image keys and features (its corpus file), and its test queries with their gold keys."""
    rows = [json.loads(line) for line in (run / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    keys = [row["image_key"] for row in rows]
    features = np.asarray([row["image_embeds"] for row in rows], dtype=np.float32)
    captions = read_captions(Path(setup["data_dir"]) / f"{setup['dataset']}.txt")[: setup["max_images"]]
    if len(captions) != len(keys):
        raise ValueError(f"{run}: corpus.jsonl has {len(keys)} images, the caption file {len(captions)}")
    queries = [caps[j] for caps in captions for j in QUERY_CAPTIONS][: setup["max_queries"]]
    gold = [key for key in keys for _ in QUERY_CAPTIONS][: setup["max_queries"]]
    return keys, queries, gold, features


def time_run(run: Path, repeats: int, encoder: BertModel, text_tokenizer) -> dict:
    """Dense and generative search of one saved run, timed as `real_captions.py` times them."""
    saved = json.loads((run / "results.json").read_text(encoding="utf-8"))
    setup = saved["setup"]
    keys, queries, gold, features = run_queries(run, setup)
    index = DenseIndex(keys, features)
    retriever = run / "run" / "retriever"
    model, tokenizer = GcmrForRetrieval.from_pretrained(retriever).eval(), ImageIdTokenizer.from_pretrained(retriever)
    generative = f"generative ({setup['id_type']})"
    searches = {
        DENSE: lambda: index.search(embed_sentences(encoder, text_tokenizer, queries, setup["batch_size"], "dense"),
                                    top_k=max(KS)),
        generative: lambda: model.retrieve(queries, tokenizer, top_k=max(KS), num_beams=setup["num_beams"],
                                           batch_size=setup["batch_size"]),
    }
    best: dict[str, tuple[list, float]] = {}
    for _ in range(repeats):
        for name, search in searches.items():
            hits, seconds = timed(search)
            best[name] = (hits, min(seconds, best.get(name, (None, float("inf")))[1]))
    systems = {name: {**retrieval_metrics([[key for key, _ in h] for h in hits], gold, ks=KS),
                      "queries_per_second": len(queries) / seconds} for name, (hits, seconds) in best.items()}
    at_run = saved["systems"]
    return {
        "run_id": saved["run_id"], "num_queries": len(queries), "systems": systems,
        "ratio": systems[generative]["queries_per_second"] / systems[DENSE]["queries_per_second"],
        "ratio_at_run": at_run[generative]["queries_per_second"] / at_run[DENSE]["queries_per_second"],
        "recall@1_at_run": at_run[generative]["recall@1"], "revision_at_run": saved["revision"],
        "generative": generative,
    }


def plot(results: list[dict], path: Path, revision: str) -> None:
    """Horizontal bars: q/s / dense per run, when the run was made and now, with the 0.5x target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["run_id"] for r in results]
    y = np.arange(len(names))
    figure, axis = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5), dpi=100)
    axis.barh(y + 0.2, [r["ratio_at_run"] for r in results], height=0.4, label="at the run")
    axis.barh(y - 0.2, [r["ratio"] for r in results], height=0.4, label=f"now ({revision})")
    axis.axvline(0.5, linestyle="--", color="grey", label="target 0.5x")
    axis.set_yticks(y, names, fontsize=8)
    axis.set_xlabel("generative q/s / dense q/s (query encoder included)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="Run folders of real_captions.py (with run/retriever).")
    parser.add_argument("--repeats", type=int, default=2, help="Timed passes per system, interleaved (fastest counts).")
    parser.add_argument("--output_dir", type=Path, default=REPO / "benchmarks" / "results" / "retrieval_speed")
    args = parser.parse_args(argv)
    if not 1 <= args.repeats <= 10:
        parser.error(f"--repeats must be between 1 and 10, got {args.repeats}")
    for run in args.runs:
        if not (run / "run" / "retriever").is_dir() or not (run / "results.json").is_file():
            parser.error(f"{run} is not a real_captions.py run folder (needs results.json and run/retriever)")
    revision = git_revision()
    folder = minilm_folder()
    encoder, text_tokenizer = BertModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    results = [time_run(run, args.repeats, encoder, text_tokenizer) for run in args.runs]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    save_results(args.output_dir / "results.json", {"revision": revision, "machine": machine(),
                                                    "command": " ".join(["python", "benchmarks/retrieval_speed.py",
                                                                         *(sys.argv[1:] if argv is None else argv)]),
                                                    "runs": results})
    plot(results, args.output_dir / "retrieval_speed.png", revision)
    rows = []
    for r in results:
        generative = r["systems"][r["generative"]]
        rows.append([r["run_id"], f"{r['num_queries']:,}", f"{r['systems'][DENSE]['queries_per_second']:.0f}",
                     f"{generative['queries_per_second']:.0f}", f"{r['ratio']:.2f}", f"{r['ratio_at_run']:.2f}",
                     f"{100 * generative['recall@1']:.1f} / {100 * r['recall@1_at_run']:.1f}"])
    print(markdown_table(["run", "queries", "dense q/s", "generative q/s", "q/s / dense now", "at the run",
                          "generative R@1 now / at the run"], rows))
    print(f"machine: {machine()}")
    return results


if __name__ == "__main__":
    main()
