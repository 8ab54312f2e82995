#!/usr/bin/env python
"""GCMR end to end on the built-in synthetic corpus, offline, in a few minutes on a laptop CPU.

    python examples/demo.py --output_dir demo_output            # what `make demo` runs
    python examples/demo.py --output_dir /tmp/demo --quick      # a tiny run (what tests/test_demo.py runs)

The tour:
  1. draw the synthetic corpus (two coloured shapes per image, paraphrased captions) and write it to disk as an
     imagefolder, the layout your own data would have;
  2. `examples/run_gcmr.py` does the work: coarse-to-fine (ACE) identifiers from the image features, a text
     vocabulary trained on the captions, memorize + retrieve training with `Trainer`, Recall@1/5/10 and MRR@10 on
     held-out captions next to the dense dual-encoder baseline (with per-query result files), the model card and
     the checkpoint folder `<output_dir>/run/retriever`;
  3. reload the checkpoint the way a Hub user would (`AutoModel` / `AutoTokenizer` with `trust_remote_code=True`)
     and search through the "generative-image-retrieval" pipeline;
  4. draw what is better seen than read: retrieved images per query, Recall@k curves (generative vs dense),
     decoding latency against the beam width, and `gallery.html`, a self-contained page with each query's top-5
     images of both retrievers side by side (the correct image framed);
  5. print the command that opens the search page (`examples/app.py`) on the trained retriever and the corpus.

Everything lands in `--output_dir`: `corpus/`, `run/` (run_gcmr's output), `figures/`, `gallery.html` and
`demo_results.json`.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoModel, AutoTokenizer, HfArgumentParser, pipeline, set_seed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_gcmr  # noqa: E402  (the sibling example script; the demo drives its main())

from modeling_gcmr.evaluation.gallery import write_gallery  # noqa: E402
from modeling_gcmr.evaluation.metrics import retrieval_metrics, save_results  # noqa: E402
from modeling_gcmr.evaluation.plotting import (  # noqa: E402
    plot_latency,
    plot_recall_curve,
    plot_retrieved_images,
)
from modeling_gcmr.pipeline_gcmr import PIPELINE_TASK  # noqa: E402  (importing modeling_gcmr registers the task)
from modeling_gcmr.training.data import load_corpus, split_captions  # noqa: E402
from modeling_gcmr.training.synthetic import make_synthetic_corpus, write_imagefolder  # noqa: E402

# The full size trains in a few minutes on 2 CPU cores; "quick" in seconds, for the test.
# 16 heads, no dropout and no gradient clipping in "full": a training caption is missed when another image binds
# its two colours and shapes the other way round, and the 2-layer encoder learns to tell those apart in 60 epochs
# with more heads, no dropout and steps not clipped to norm 1 (its gradients' norms are 5-15), at about the same
# cost (benchmarks/binding_probe.py, docs/memorization.md).
SIZES = {
    "full": dict(num_images=300, captions_per_image=3, epochs=60, d_model=128, num_layers=2, num_heads=16, dropout=0.0,
                 max_grad_norm=0.0, num_beams=10, dense_epochs=20),
    "quick": dict(num_images=24, captions_per_image=2, epochs=60, d_model=64, num_layers=1, num_heads=4, dropout=0.1,
                  max_grad_norm=1.0, num_beams=4, dense_epochs=5),
}
LATENCY_BEAMS = (1, 2, 5, 10)
# Queries shown in gallery.html; every thumbnail is inlined, so the page stays a few hundred KB.
GALLERY_QUERIES = 20
APP = Path(__file__).resolve().with_name("app.py")


@dataclass
class DemoArguments:
    """Where the demo writes, and how big it is."""

    output_dir: str = field(default="demo_output", metadata={"help": "Folder for the corpus, checkpoint, figures and results."})
    quick: bool = field(default=False, metadata={"help": "A tiny corpus and model: seconds instead of minutes (for tests)."})
    id_type: str = field(default="coarse_fine", metadata={"help": "Identifier type (see build_identifiers)."})
    seed: int = field(default=0, metadata={"help": "Seed of the corpus, the identifiers and the training."})


def training_options(sizes: dict, seed: int) -> list[str]:
    """run_gcmr.py's model and optimizer options for a demo size (benchmarks/memorization.py trains with them too)."""
    return ["--num_train_epochs", str(sizes["epochs"]), "--d_model", str(sizes["d_model"]),
            "--d_ff", str(2 * sizes["d_model"]), "--num_layers", str(sizes["num_layers"]),
            "--num_heads", str(sizes["num_heads"]), "--dropout_rate", str(sizes["dropout"]),
            "--max_grad_norm", str(sizes["max_grad_norm"]),
            "--num_beams", str(sizes["num_beams"]), "--learning_rate", "3e-3", "--warmup_steps", "0.05",
            "--lr_scheduler_type", "cosine", "--per_device_train_batch_size", "32", "--seed", str(seed)]


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses(argv)
    sizes = SIZES["quick" if args.quick else "full"]
    out = Path(args.output_dir)
    figures = out / "figures"
    started = time.perf_counter()
    set_seed(args.seed)

    # 1. The corpus, on disk.
    corpus = make_synthetic_corpus(sizes["num_images"], captions_per_image=sizes["captions_per_image"], seed=args.seed)
    corpus_dir = write_imagefolder(corpus, out / "corpus")
    print(f"[1/4] wrote {len(corpus)} images with {sizes['captions_per_image']} captions each to {corpus_dir}")

    # 2. Identifiers, vocabulary, training, evaluation, model card and checkpoint: the example script.
    run_dir = out / "run"
    trained = run_gcmr.main([
        "--corpus", str(corpus_dir), "--output_dir", str(run_dir), "--id_type", args.id_type,
        "--do_train", "--do_eval", "--baseline", "--baseline_epochs", str(sizes["dense_epochs"]),
        *training_options(sizes, args.seed), "--per_device_eval_batch_size", "64",
        "--save_strategy", "no", "--eval_strategy", "no", "--logging_steps", "50", "--report_to", "none",
        "--log_level", "warning",
    ])
    checkpoint = run_dir / "retriever"
    print(f"[2/4] trained and saved the retriever to {checkpoint}")

    # 3. Reload like a Hub user (only the folder's own code runs) and search through the pipeline.
    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
    retriever = pipeline(PIPELINE_TASK, model=model, tokenizer=tokenizer, device="cpu")
    held_out = split_captions(load_corpus(corpus_dir), num_query_captions=1)
    hits = retriever(held_out.queries, top_k=10, num_beams=sizes["num_beams"], batch_size=32)
    generative_rankings = [[hit["image_key"] for hit in query_hits] for query_hits in hits]
    generative = retrieval_metrics(generative_rankings, held_out.gold)
    print(f"[3/4] the reloaded checkpoint, through the pipeline: Recall@1 {generative['recall@1']:.3f}")

    dense_hits = _hits(run_dir / "per_query_results_dense.jsonl", held_out.queries)
    dense_rankings = [[key for key, _ in query_hits] for query_hits in dense_hits]

    # 4. Figures.
    shown = list(range(min(4, len(held_out.queries))))
    images_by_key = dict(zip(corpus["image_key"], corpus["image"]))
    retrieved_png = plot_retrieved_images(
        [held_out.queries[i] for i in shown], [hits[i] for i in shown], images_by_key,
        figures / "retrieved_images.png", gold=[held_out.gold[i] for i in shown], top_k=5,
    )
    recall_png = plot_recall_curve(
        {"generative (GCMR)": generative_rankings, "dense baseline": dense_rankings}, held_out.gold,
        figures / "recall_curve.png",
    )
    latency = _latency(retriever, held_out.queries[:32])
    latency_png = plot_latency(
        latency, figures / "latency.png",
        title=f"Trie-constrained decoding over {len(corpus)} images (CPU)",
    )
    in_gallery = slice(0, GALLERY_QUERIES)
    gallery = write_gallery(
        out / "gallery.html", held_out.queries[in_gallery],
        {"generative (GCMR), identifier score": hits[in_gallery],
         "dense baseline, cosine": dense_hits[in_gallery]},
        images_by_key, gold=held_out.gold[in_gallery], top_k=5, title=f"GCMR demo: {len(corpus)} synthetic images",
    )
    print(f"[4/4] figures in {figures}, gallery in {gallery}")
    search_page = shlex.join([_short(sys.executable), _short(APP), "--retriever", _short(checkpoint),
                              "--images", _short(corpus_dir)])

    results = {
        "runtime_s": round(time.perf_counter() - started, 1),
        "num_images": len(corpus),
        "num_queries": len(held_out.queries),
        "id_type": args.id_type,
        "run_gcmr": {name: value for name, value in trained.items() if name.startswith("eval_")},
        "generative_via_pipeline": generative,
        "dense_baseline": retrieval_metrics(dense_rankings, held_out.gold),
        "latency_ms_per_query": latency,
        "example": {"query": held_out.queries[0], "gold": held_out.gold[0], "hits": hits[0][:5]},
        "paths": {"checkpoint": str(checkpoint), "retrieved_images": str(retrieved_png),
                  "recall_curve": str(recall_png), "latency": str(latency_png), "gallery": str(gallery)},
        "search_page_command": search_page,
    }
    save_results(out / "demo_results.json", results)
    _print_summary(results)
    return results


def _hits(per_query_file: Path, queries: list[str]) -> list[list[tuple[str, float]]]:
    """The ranked (key, score) hits of each query from an `evaluate_retriever` per-query JSONL file, checked against
    `queries`."""
    records = [json.loads(line) for line in per_query_file.read_text(encoding="utf-8").splitlines()]
    if [record["query"] for record in records] != list(queries):
        raise ValueError(f"{per_query_file} holds other queries than the held-out captions of this corpus")
    return [[(hit["key"], hit["score"]) for hit in record["hits"]] for record in records]


def _short(path: str | os.PathLike) -> str:
    """`path` relative to the working directory when it lies below it (a shorter command to copy), else absolute."""
    relative = os.path.relpath(os.path.abspath(path))
    return relative if not relative.startswith("..") else os.path.abspath(path)


def _latency(retriever, queries: list[str]) -> dict[str, dict[int, float]]:
    """Milliseconds per query of the pipeline at several beam widths, one query at a time and in one batch."""
    latency: dict[str, dict[int, float]] = {}
    for mode, batch_size in (("one query at a time", 1), (f"batches of {len(queries)}", len(queries))):
        latency[mode] = {}
        for beams in LATENCY_BEAMS:
            started = time.perf_counter()
            retriever(queries, top_k=min(beams, 10), num_beams=beams, batch_size=batch_size)
            latency[mode][beams] = 1000 * (time.perf_counter() - started) / len(queries)
    return latency


def _print_summary(results: dict) -> None:
    generative, dense = results["generative_via_pipeline"], results["dense_baseline"]
    print("\n" + "=" * 72)
    print(f"GCMR demo: {results['num_images']} images, {results['num_queries']} held-out queries, "
          f"{results['id_type']} identifiers, {results['runtime_s']:.0f} s")
    print(f"{'':24}{'Recall@1':>10}{'Recall@5':>10}{'Recall@10':>11}{'MRR@10':>9}")
    for name, metrics in (("generative (GCMR)", generative), ("dense baseline", dense)):
        print(f"{name:24}{metrics['recall@1']:>10.3f}{metrics['recall@5']:>10.3f}{metrics['recall@10']:>11.3f}"
              f"{metrics['mrr@10']:>9.3f}")
    example = results["example"]
    print(f"\nquery: {example['query']!r} (gold {example['gold']})")
    for hit in example["hits"]:
        print(f"  #{hit['rank']} {hit['image_key']}  score {hit['score']:.3f}")
    print()
    for name, path in results["paths"].items():
        print(f"{name:>17}: {path}")
    print(f"\nsearch page (open the printed http://127.0.0.1 address in a browser):\n  {results['search_page_command']}")
    print("=" * 72)


if __name__ == "__main__":
    main()
