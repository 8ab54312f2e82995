#!/usr/bin/env python
"""The whole user path at collection scale (issue 16): 10k, 100k and 1M images, through the public API only.

For each identifier type and collection size, with seeded 512-d image features of cluster structure and synthetic
captions, and a tiny model (so the figures are the collection-size-dependent costs, not the backbone's):

  build     `build_identifiers(keys, id_type, embeddings=features)`
  fit       `model.set_identifier_vocabulary(tokenizer, image_embeds=features)` + `model.store_image_features`
  train     memorize steps (image feature -> identifier) through `model(...)` and AdamW, batch 64: one epoch, or at
            most `--max_train_steps` steps (then examples/s of those steps; the table says which)
  save      `save_retriever(model, tokenizer, folder)`; checkpoint size on disk
  load      `AutoModel.from_pretrained` + `AutoTokenizer.from_pretrained` (trust_remote_code=True) in a fresh process
  retrieve  `model.retrieve(texts, tokenizer, top_k=10, num_beams=10, batch_size=64)`: ms per query
  add       `model.add_images` of 10,000 new images with placement="centroids" (the tokenizer's nearest codes), then
            1,000 with the default placement="model" (one beam search per image: ms per image); `remove` of 10,000

Each (id_type, size) runs in two subprocesses (build..save, then load..remove), so a step's peak RSS is its own:
before every step the process resets its peak (`/proc/self/clear_refs` 5) and reads `VmHWM` after it.

    python benchmarks/scale.py                                           # 10k, 100k, 1M x coarse_fine/structured/atomic
    python benchmarks/scale.py --sizes 10000 --id_types coarse_fine      # a quick look
    python benchmarks/scale.py --report_only                             # table + plot from the kept results

Writes `benchmarks/results/scale/<id_type>_<size>.json`, the `scale` section of `docs/benchmarks.md` and
`docs/scale.png`. Not in `make test`. Run it alone on the machine (`nice`): every figure is a wall-clock time.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# PyTorch's own switch: its CPU allocator asks for transparent huge pages (madvise) on large tensors. At 1M images
# the fit and add_images write gigabytes of fresh memory, and 4 KB page faults dominated them on this machine
# (1M coarse_fine add of 10k: 13.2 s without, 9.5 s with; fit 38 s against 25 s). Read once, before torch allocates,
# and inherited by the worker processes. THP_MEM_ALLOC_ENABLE=0 measures without.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Iterator  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import REPO, git_revision, machine, markdown_table, write_section  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "scale"
DOC_PATH = REPO / "docs" / "benchmarks.md"
PLOT_PATH = REPO / "docs" / "scale.png"
FINDINGS = Path(__file__).with_name("scale_findings.md")  # what the runs showed: prose, kept out of the code
DIM = 512
CLUSTERS = 1000
BATCH = 64
EDIT = 10_000
ROUTED = 1_000  # images added with placement='model' (one beam search each)
QUERIES = 256
WORDS = ("red", "blue", "green", "small", "large", "dog", "cat", "car", "tree", "house", "beach", "street", "man",
         "woman", "child", "ball", "boat", "sky", "field", "city")


# ------------------------------------------------------------------------------------------------ measuring
def _status(field: str) -> int:
    """A `/proc/self/status` value in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


class Steps:
    """Wall time and peak RSS of each step; the peak is reset before a step, so it is that step's own."""

    def __init__(self) -> None:
        self.results: dict[str, Any] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # resets VmHWM to the current RSS
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.results[f"{name}_seconds"] = seconds
        self.results[f"{name}_peak_rss_gb"] = _status("VmHWM") / 1e9
        print(f"  {name}: {seconds:.2f} s, peak RSS {_status('VmHWM') / 1e9:.2f} GB", flush=True)


# ------------------------------------------------------------------------------------------------ the data
def features(count: int, seed: int) -> np.ndarray:
    """(count, 512) float32 unit rows around 1000 seeded centres, written in chunks (no full-size temporaries)."""
    centres = np.random.default_rng(12345).normal(size=(CLUSTERS, DIM)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((count, DIM), dtype=np.float32)
    for start in range(0, count, 65_536):
        stop = min(count, start + 65_536)
        rows = centres[rng.integers(0, CLUSTERS, stop - start)]
        rows += 0.6 * rng.standard_normal((stop - start, DIM), dtype=np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        out[start:stop] = rows
    return out


def captions(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)[rng.integers(0, len(WORDS), (count, 5))]
    return ["a photo of a " + " ".join(row) for row in words]


def tiny_model(tokenizer: Any) -> Any:
    """A GcmrForRetrieval with a one-layer T5 of width 32 and an identifier space of the features' width: the
    figures are then the collection's costs, not the backbone's."""
    from modeling_gcmr import GcmrConfig, GcmrForRetrieval

    return GcmrForRetrieval(GcmrConfig(
        text_config=dict(model_type="t5", vocab_size=tokenizer.num_text_tokens, d_model=32, d_ff=64, d_kv=8,
                         num_heads=4, num_layers=1, decoder_start_token_id=tokenizer.pad_token_id,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id),
        image_embed_dim=DIM, identifier_dim=DIM))


# ------------------------------------------------------------------------------------------------ the two halves
def build_half(id_type: str, size: int, folder: Path, max_train_steps: int, rss_limit: float) -> dict:
    import torch

    from modeling_gcmr.publishing.checkpoint import save_retriever
    from modeling_gcmr.training.lazy_adamw import LazyAdamW
    from modeling_gcmr.training.optimization import sparse_edge_gradients
    from tokenization_gcmr import ImageIdTokenizer, build_identifiers, train_text_tokenizer

    torch.manual_seed(0)
    steps = Steps()
    matrix = features(size, seed=0)
    keys = [f"img{i}" for i in range(size)]
    steps.results["rss_with_features_gb"] = _status("VmRSS") / 1e9
    with steps.step("build"):
        table = build_identifiers(keys, id_type=id_type, embeddings=matrix, seed=0)
        text = train_text_tokenizer(captions(2000, seed=1), vocab_size=200)
        tokenizer = ImageIdTokenizer(text, table)
    del table
    model = tiny_model(tokenizer)
    with steps.step("fit"):
        model.set_identifier_vocabulary(tokenizer, image_embeds=matrix)
        model.store_image_features(matrix)
    steps.results["trie_edges"] = int(tokenizer.prefix_trie.num_edges)
    epoch_steps = -(-size // BATCH)
    train_steps = min(epoch_steps, max_train_steps)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(0))[: train_steps * BATCH]
    labels = tokenizer.encode_identifiers([keys[i] for i in order.tolist()])
    trained = [p for p in model.parameters() if p.requires_grad]
    # What run_gcmr.py's Trainer does (optimization.optimizer_cls_and_kwargs): past FULL_SOFTMAX_LIMIT identifiers
    # the edge vectors train with sparse gradients and LazyAdamW, so they hold two moments and no dense gradient.
    sparse = sparse_edge_gradients(model)
    model.identifier_head.sparse_gradients = sparse
    steps.results["train_sparse_edge_gradients"] = sparse
    edges = model.identifier_head.edge_vectors
    copies = sum((2 if sparse and p is edges else 3) * p.numel() * p.element_size() for p in trained)
    needed = _status("VmRSS") + copies + (1 << 30)
    if needed > rss_limit:
        steps.results["train_skipped"] = (f"AdamW over {sum(p.numel() for p in trained) / 1e6:.0f}M parameters "
                                          f"needs ~{needed / 1e9:.1f} GB (limit {rss_limit / 1e9:.1f} GB)")
        print(f"  train: skipped, {steps.results['train_skipped']}", flush=True)
        train_steps = 0
    optimizer = LazyAdamW(trained, lr=1e-3)
    model.train()
    with steps.step("train"):
        for step in range(train_steps):
            rows = order[step * BATCH: (step + 1) * BATCH]
            gold = labels[step * BATCH: (step + 1) * BATCH]
            width = max(len(row) for row in gold)
            batch_labels = torch.full((len(gold), width), -100, dtype=torch.long)
            for i, row in enumerate(gold):
                batch_labels[i, : len(row)] = torch.as_tensor(row)
            loss = model(image_embeds=torch.from_numpy(matrix[rows.numpy()]), labels=batch_labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    steps.results.update(train_steps=train_steps, train_full_epoch=train_steps == epoch_steps)
    if train_steps:
        steps.results["train_examples_per_second"] = train_steps * BATCH / steps.results["train_seconds"]
    del optimizer, labels
    model.eval()
    shutil.rmtree(folder, ignore_errors=True)
    with steps.step("save"):
        save_retriever(model, tokenizer, folder)
    steps.results["checkpoint_bytes"] = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    steps.results["checkpoint_files"] = {path.name: path.stat().st_size for path in folder.iterdir() if path.is_file()
                                         and path.stat().st_size > 1_000_000}
    steps.results["stored_feature_bytes"] = matrix.nbytes
    return steps.results


def serve_half(id_type: str, size: int, folder: Path) -> dict:
    import torch
    from transformers import AutoModel, AutoTokenizer

    steps = Steps()
    steps.results["rss_start_gb"] = _status("VmRSS") / 1e9
    with steps.step("load"):
        model = AutoModel.from_pretrained(folder, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model.eval()
    queries = captions(QUERIES + BATCH, seed=2)
    with torch.inference_mode():
        model.retrieve(queries[:BATCH], tokenizer, top_k=10, num_beams=10, batch_size=BATCH, show_progress=False)
        with steps.step("retrieve"):
            hits = model.retrieve(queries[BATCH:], tokenizer, top_k=10, num_beams=10, batch_size=BATCH,
                                  show_progress=False)
    steps.results["retrieve_ms_per_query"] = 1000 * steps.results["retrieve_seconds"] / QUERIES
    steps.results["retrieve_hits_per_query"] = float(np.mean([len(row) for row in hits]))
    new = features(EDIT + ROUTED, seed=3)
    new_keys = [f"new{i}" for i in range(EDIT + ROUTED)]
    with steps.step("add"):
        model.add_images(new_keys[:EDIT], tokenizer, image_embeds=new[:EDIT], placement="centroids")
    with steps.step("add_model_placement"):
        model.add_images(new_keys[EDIT:], tokenizer, image_embeds=new[EDIT:])
    steps.results["add_model_placement_ms_per_image"] = 1000 * steps.results["add_model_placement_seconds"] / ROUTED
    with steps.step("remove"):
        model.remove_images([f"img{i}" for i in range(0, size, max(1, size // EDIT))][:EDIT], tokenizer)
    own = model.retrieve(tokenizer=tokenizer, image_embeds=new[:100], top_k=1, num_beams=10, show_progress=False)
    steps.results["added_found_by_own_feature_r1"] = float(np.mean([bool(row) and row[0][0] == key
                                                                    for row, key in zip(own, new_keys)]))
    return steps.results


# ------------------------------------------------------------------------------------------------ orchestration
def _watch(command: list[str], rss_limit: float) -> tuple[int, str, str]:
    """Run a worker, echo its lines, and kill it (by its own pid) if its RSS passes `rss_limit` bytes."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    lines: list[str] = []
    killed = ""
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    errors: list[str] = []
    err_reader = threading.Thread(target=lambda: errors.extend(iter(process.stderr.readline, "")), daemon=True)
    err_reader.start()
    shown = 0
    while process.poll() is None:
        time.sleep(0.5)
        try:
            with open(f"/proc/{process.pid}/status", encoding="ascii") as handle:
                # Anonymous memory only: pages of a memory-mapped checkpoint are file-backed, the kernel can drop them
                rss = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("RssAnon:"))
        except (OSError, StopIteration):
            rss = 0
        if rss > rss_limit and not killed:
            killed = f"killed at {rss / 1e9:.1f} GB anonymous RSS (limit {rss_limit / 1e9:.1f} GB)"
            process.kill()
        for line in lines[shown:]:
            sys.stdout.write(line)
        shown = len(lines)
    reader.join()
    err_reader.join()
    sys.stdout.writelines(lines[shown:])
    sys.stdout.flush()
    return process.returncode, "".join(lines), killed or "".join(errors)


def run_one(id_type: str, size: int, work: Path, max_train_steps: int, rss_limit_gb: float) -> dict:
    folder = work / f"{id_type}_{size}"
    result: dict[str, Any] = {"id_type": id_type, "size": size, "dim": DIM,
                              "huge_pages": os.environ["THP_MEM_ALLOC_ENABLE"] == "1"}
    for half in ("build", "serve"):
        command = [sys.executable, __file__, "--worker", half, "--id_types", id_type, "--sizes", str(size),
                   "--work", str(work), "--max_train_steps", str(max_train_steps), "--rss_limit_gb", str(rss_limit_gb)]
        result[f"{half}_load_average_before"] = os.getloadavg()[0]
        print(f"{id_type} {size:,} {half} (load {os.getloadavg()[0]:.1f})", flush=True)
        code, out, error = _watch(command, rss_limit_gb * 1e9)
        if code:
            sys.stderr.write(error[-4000:])
            last_step = [line.split(":")[0].strip() for line in out.splitlines() if line.startswith("  ")]
            lines = error.strip().splitlines() or ["failed"]
            named = [line for line in lines if "Error" in line or line.startswith("killed")]
            result[f"{half}_error"] = (named or lines)[-1] + (
                f" (after step {last_step[-1]})" if last_step else "")
            break
        result.update(json.loads(out.strip().splitlines()[-1]))
    result["load_average"] = os.getloadavg()[0]
    shutil.rmtree(folder, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{id_type}_{size}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else (f"{value:.1f}" if value >= 1 else f"{value:.2f}")


def table(results: list[dict]) -> str:
    header = ["id_type", "images", "build s", "fit s", "train ex/s", "save s", "load s", "checkpoint GB",
              "retrieve ms/q", "add 10k s", "add ms/image (model)", "remove 10k s", "peak RSS GB (step)"]
    rows = []
    for r in results:
        peaks = {name: r.get(f"{name}_peak_rss_gb") for name in ("build", "fit", "train", "save", "load", "retrieve",
                                                                  "add", "remove")}
        worst = max(((v, k) for k, v in peaks.items() if v is not None), default=(None, "-"))
        train = "skipped (memory)" if r.get("train_skipped") else "-" if "train_examples_per_second" not in r else (
            f"{r['train_examples_per_second']:.0f}" + ("" if r["train_full_epoch"] else f" ({r['train_steps']} steps)"))
        rows.append([r["id_type"], f"{r['size']:,}", _seconds(r.get("build_seconds")), _seconds(r.get("fit_seconds")),
                     train, _seconds(r.get("save_seconds")), _seconds(r.get("load_seconds")),
                     _gb(r["checkpoint_bytes"] / 1e9 if "checkpoint_bytes" in r else None),
                     _seconds(r.get("retrieve_ms_per_query")), _seconds(r.get("add_seconds")),
                     _seconds(r.get("add_model_placement_ms_per_image")),
                     _seconds(r.get("remove_seconds")), f"{_gb(worst[0])} ({worst[1]})"])
        if r.get("note"):
            rows[-1][1] += f" ({r['note']})"
        if r.get("build_error") or r.get("serve_error"):
            rows[-1][-1] += f"; stopped: {r.get('build_error') or r.get('serve_error')}"
    return markdown_table(header, rows)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = [("build_seconds", "build s"), ("fit_seconds", "fit s"), ("save_seconds", "save s"),
                ("load_seconds", "load s"), ("retrieve_ms_per_query", "retrieve ms/query"),
                ("add_seconds", "add 10k s"), ("remove_seconds", "remove 10k s"), ("checkpoint_gb", "checkpoint GB")]
    id_types = sorted({r["id_type"] for r in results})
    figure, axes = plt.subplots(1, len(id_types), figsize=(5 * len(id_types), 4.2), squeeze=False)
    for axis, id_type in zip(axes[0], id_types):
        rows = sorted((r for r in results if r["id_type"] == id_type), key=lambda r: r["size"])
        for key, label in measures:
            points = [(r["size"], r["checkpoint_bytes"] / 1e9 if key == "checkpoint_gb" else r.get(key))
                      for r in rows if (key != "checkpoint_gb" or "checkpoint_bytes" in r)]
            points = [(x, y) for x, y in points if y]
            if points:
                axis.plot(*zip(*points), marker="o", label=label)
        sizes = [r["size"] for r in rows]
        if len(sizes) > 1:  # a linear-growth guide through the first build time
            first = next((r.get("build_seconds") for r in rows if r.get("build_seconds")), None)
            if first:
                axis.plot(sizes, [first * s / sizes[0] for s in sizes], "k:", label="linear")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("images in the collection")
        axis.set_title(id_type)
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("cost")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    from modeling_gcmr.atomic_write_gcmr import atomic_save_to

    atomic_save_to(path, lambda temporary: figure.savefig(temporary, dpi=110, format="png"))
    plt.close(figure)


def targets(results: list[dict]) -> str:
    by = {(r["id_type"], r["size"]): r for r in results}
    big, mid, small = by.get(("coarse_fine", 1_000_000)), by.get(("coarse_fine", 100_000)), by.get(("coarse_fine",
                                                                                                     10_000))
    rows = []

    def add(name: str, figure: str, met: bool | None) -> None:
        rows.append([name, figure, "-" if met is None else ("met" if met else "not met")])

    if big:
        def figure(key: str) -> float | None:
            return big.get(key)

        error = big.get("build_error") or big.get("serve_error")
        if error:
            add("1M coarse_fine run", error, False)
        parts = [figure(f"{k}_seconds") for k in ("build", "fit", "save", "load")]
        if None not in parts:
            add("1M coarse_fine build + fit + save + load <= 10 min", f"{sum(parts) / 60:.1f} min", sum(parts) <= 600)
        peaks = [v for k, v in big.items() if k.endswith("_peak_rss_gb")]
        raw = big["size"] * DIM * 4 / 1e9
        if peaks:
            add("peak RSS at 1M <= 3x raw features", f"{max(peaks):.2f} GB = {max(peaks) / raw:.2f}x of {raw:.2f} GB"
                + (" (before the run stopped)" if error else ""), max(peaks) <= 3 * raw and not error)
        if "checkpoint_bytes" in big:
            ratio = big["checkpoint_bytes"] / big["stored_feature_bytes"]
            add("checkpoint at 1M <= 1.5x stored features", f"{big['checkpoint_bytes'] / 1e9:.2f} GB = {ratio:.2f}x",
                ratio <= 1.5)
        if small and "retrieve_ms_per_query" in big:
            ratio = big["retrieve_ms_per_query"] / small["retrieve_ms_per_query"]
            add("retrieve latency 1M / 10k <= 1.2x", f"{big['retrieve_ms_per_query']:.1f} / "
                f"{small['retrieve_ms_per_query']:.1f} ms = {ratio:.2f}x", ratio <= 1.2)
        if "add_seconds" in big:
            add("add 10,000 to 1M <= 5 s", f"{big['add_seconds']:.1f} s", big["add_seconds"] <= 5)
            add("remove 10,000 from 1M <= 1 s", f"{big['remove_seconds']:.2f} s", big["remove_seconds"] <= 1)
        if mid:
            for step in ("build", "fit", "save", "load"):
                if f"{step}_seconds" in big and f"{step}_seconds" in mid:
                    growth = big[f"{step}_seconds"] / mid[f"{step}_seconds"]
                    add(f"{step} growth 100k -> 1M <= 12x", f"{growth:.1f}x", growth <= 12)
    return markdown_table(["target (coarse_fine)", "measured", ""], rows) if rows else ""


def report(command: str) -> None:
    results = [json.loads(path.read_text(encoding="utf-8")) for path in sorted(RESULTS.glob("*.json"))]
    results.sort(key=lambda r: (r["id_type"], r["size"]))
    if not results:
        raise SystemExit(f"no results under {RESULTS}")
    plot(results, PLOT_PATH)
    loads = ", ".join(f"{r['id_type']} {r['size']:,}: {r.get('load_average', 0):.1f}" for r in results)
    huge = ", ".join(f"{r['id_type']} {r['size']:,}" for r in results if r.get("huge_pages")) or "none"
    text = "\n\n".join(part for part in [
        "## Scale: the whole user path at 10k, 100k and 1M images",
        f"```\n{command}\n```",
        f"Machine: {machine()}; revision {git_revision()}. Load average (1 min) when each run ended: {loads}. "
        f"Runs with PyTorch's huge-page allocation (`THP_MEM_ALLOC_ENABLE=1`, the script's default since issue 16's "
        f"second pass; the others ran before it): {huge}.",
        "Tiny model (T5 d_model 32, one layer) on 512-d seeded clustered features, so the figures are what grows "
        "with the collection. Peak RSS is each step's own (reset before it); build..save run in one process, load.."
        "remove in a fresh one. Train: memorize steps of batch 64 with AdamW (a full epoch, or the step count shown).",
        table(results),
        targets(results),
        "![cost against collection size](scale.png)",
        FINDINGS.read_text(encoding="utf-8").strip(),
    ] if part)
    write_section(DOC_PATH, "scale", text, "# Benchmarks\n")
    print(table(results))
    print(targets(results))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--id_types", default="coarse_fine,structured,atomic")
    parser.add_argument("--max_train_steps", type=int, default=200,
                        help="Memorize steps timed at most (a full epoch when it is shorter).")
    parser.add_argument("--work", default=str(REPO / "benchmarks" / "results" / "scale_work"),
                        help="Where checkpoints are written (removed after each run).")
    parser.add_argument("--rss_limit_gb", type=float, default=11.0,
                        help="A worker past this RSS is killed (the machine is shared); training that would pass it "
                        "is skipped and said so.")
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument("--worker", choices=("build", "serve"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    id_types = args.id_types.split(",")
    work = Path(args.work)
    if args.worker:
        folder = work / f"{id_types[0]}_{sizes[0]}"
        if args.worker == "build":
            result = build_half(id_types[0], sizes[0], folder, args.max_train_steps, args.rss_limit_gb * 1e9)
        else:
            result = serve_half(id_types[0], sizes[0], folder)
        print(json.dumps(result))
        return
    if not args.report_only:
        work.mkdir(parents=True, exist_ok=True)
        for size in sizes:
            for id_type in id_types:
                run_one(id_type, size, work, args.max_train_steps, args.rss_limit_gb)
    report("python benchmarks/scale.py " + shlex.join(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
