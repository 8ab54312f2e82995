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
    python benchmarks/scale.py --device cuda --bf16 --sizes 10000,100000,1000000 --id_types coarse_fine
                                                                         # on a GPU: its own section and plot

Writes `benchmarks/results/scale/<id_type>_<size>.json`, the `scale` section of `docs/benchmarks.md` and
`docs/scale.png`. `make test` runs it once at 2,000 images (`tests/test_scale.py`) and measures nothing. Run it
alone on the machine (`nice`): every figure is a wall-clock time.
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
from report import REPO  # noqa: E402
from scale_report import RESULTS, RESULTS_CUDA, report  # noqa: E402

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
    """Wall time and peak RSS of each step (and peak GPU memory on CUDA); the peaks are reset before a step, so they
    are that step's own. On CUDA a step ends when the device has finished its work."""

    def __init__(self, device: str = "cpu") -> None:
        self.results: dict[str, Any] = {}
        self.cuda = device.startswith("cuda")

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        import torch

        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # resets VmHWM to the current RSS
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        self.results[f"{name}_seconds"] = seconds
        self.results[f"{name}_peak_rss_gb"] = _status("VmHWM") / 1e9
        gpu = ""
        if self.cuda:
            self.results[f"{name}_peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
            gpu = f", peak GPU {self.results[f'{name}_peak_gpu_gb']:.2f} GB"
        print(f"  {name}: {seconds:.2f} s, peak RSS {_status('VmHWM') / 1e9:.2f} GB{gpu}", flush=True)


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


def tiny_model(tokenizer: Any, shared_eos_vector: bool = False) -> Any:
    """A GcmrForRetrieval with a one-layer T5 of width 32 and an identifier space of the features' width: the
    figures are then the collection's costs, not the backbone's."""
    from modeling_gcmr import GcmrConfig, GcmrForRetrieval

    return GcmrForRetrieval(GcmrConfig(
        text_config=dict(model_type="t5", vocab_size=tokenizer.num_text_tokens, d_model=32, d_ff=64, d_kv=8,
                         num_heads=4, num_layers=1, decoder_start_token_id=tokenizer.pad_token_id,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id),
        image_embed_dim=DIM, identifier_dim=DIM, shared_eos_vector=shared_eos_vector))


# ------------------------------------------------------------------------------------------------ the two halves
def build_half(id_type: str, size: int, folder: Path, max_train_steps: int, rss_limit: float, device: str = "cpu",
               bf16: bool = False, save_dtype: str = "float32", shared_eos_vector: bool = False,
               edge_optimizer_state: str = "full") -> dict:
    import torch

    from modeling_gcmr.publishing.checkpoint import save_retriever
    from modeling_gcmr.training.lazy_adamw import LazyAdamW
    from modeling_gcmr.training.optimization import sparse_edge_gradients
    from tokenization_gcmr import ImageIdTokenizer, build_identifiers, train_text_tokenizer

    torch.manual_seed(0)
    steps = Steps(device)
    matrix = features(size, seed=0)
    keys = [f"img{i}" for i in range(size)]
    steps.results["rss_with_features_gb"] = _status("VmRSS") / 1e9
    with steps.step("build"):
        table = build_identifiers(keys, id_type=id_type, embeddings=matrix, seed=0)
        text = train_text_tokenizer(captions(2000, seed=1), vocab_size=200)
        tokenizer = ImageIdTokenizer(text, table)
    del table
    model = tiny_model(tokenizer, shared_eos_vector)
    with steps.step("fit"):
        model.set_identifier_vocabulary(tokenizer, image_embeds=matrix)
        model.store_image_features(matrix)
    steps.results["trie_edges"] = int(tokenizer.prefix_trie.num_edges)
    steps.results["edge_vector_rows"] = int(model.config.num_identifier_edges)
    epoch_steps = -(-size // BATCH)
    train_steps = min(epoch_steps, max_train_steps)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(0))[: train_steps * BATCH]
    labels = tokenizer.encode_identifiers([keys[i] for i in order.tolist()])
    trained = [p for p in model.parameters() if p.requires_grad]
    # What run_gcmr.py's Trainer does (optimization.optimizer_cls_and_kwargs): past FULL_SOFTMAX_LIMIT identifiers
    # the edge vectors train with sparse gradients and LazyAdamW, so they hold two moments (or, row-wise, two floats
    # per row) and no dense gradient.
    sparse = sparse_edge_gradients(model)
    model.identifier_head.sparse_gradients = sparse
    steps.results["train_sparse_edge_gradients"] = sparse
    row_wise = edge_optimizer_state == "row_wise"
    edges = model.identifier_head.edge_vectors
    copies = sum(((0 if row_wise else 2) if sparse and p is edges else 3) * p.numel() * p.element_size()
                 for p in trained)
    needed = _status("VmRSS") + copies + (1 << 30)
    if needed > rss_limit and device == "cpu":
        steps.results["train_skipped"] = (f"AdamW over {sum(p.numel() for p in trained) / 1e6:.0f}M parameters "
                                          f"needs ~{needed / 1e9:.1f} GB (limit {rss_limit / 1e9:.1f} GB)")
        print(f"  train: skipped, {steps.results['train_skipped']}", flush=True)
        train_steps = 0
    # As a GPU user's Trainer does: the fit on the CPU, then the model on the device (bf16: autocast, fp32 weights).
    model.to(device)
    optimizer = LazyAdamW([{"params": [edges], "row_wise": row_wise},
                           {"params": [p for p in trained if p is not edges]}], lr=1e-3)
    model.train()
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16)
    with steps.step("train"), autocast:
        for step in range(train_steps):
            rows = order[step * BATCH: (step + 1) * BATCH]
            gold = labels[step * BATCH: (step + 1) * BATCH]
            width = max(len(row) for row in gold)
            batch_labels = torch.full((len(gold), width), -100, dtype=torch.long)
            for i, row in enumerate(gold):
                batch_labels[i, : len(row)] = torch.as_tensor(row)
            loss = model(image_embeds=torch.from_numpy(matrix[rows.numpy()]).to(device),
                         labels=batch_labels.to(device)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    steps.results.update(train_steps=train_steps, train_full_epoch=train_steps == epoch_steps)
    if train_steps:
        steps.results["train_examples_per_second"] = train_steps * BATCH / steps.results["train_seconds"]
    del optimizer, labels
    model.eval()
    model.to("cpu")  # saved from host memory, as the CPU rows (not timed)
    if save_dtype != "float32":  # the serving checkpoint in half precision (docs/user_guide.md); trained in fp32
        model.to(getattr(torch, save_dtype))
    shutil.rmtree(folder, ignore_errors=True)
    with steps.step("save"):
        save_retriever(model, tokenizer, folder)
    steps.results["checkpoint_bytes"] = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    steps.results["checkpoint_files"] = {path.name: path.stat().st_size for path in folder.iterdir() if path.is_file()
                                         and path.stat().st_size > 1_000_000}
    steps.results["stored_feature_bytes"] = matrix.nbytes
    return steps.results


def serve_half(id_type: str, size: int, folder: Path, device: str = "cpu") -> dict:
    import torch
    from transformers import AutoModel, AutoTokenizer

    steps = Steps(device)
    steps.results["rss_start_gb"] = _status("VmRSS") / 1e9
    with steps.step("load"):
        model = AutoModel.from_pretrained(folder, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    if device != "cpu":
        with steps.step("to_device"):
            model.to(device)
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


def run_one(id_type: str, size: int, work: Path, max_train_steps: int, rss_limit_gb: float, device: str = "cpu",
            bf16: bool = False, results_dir: Path | None = None, save_dtype: str = "float32",
            shared_eos_vector: bool = False, edge_optimizer_state: str = "full") -> dict:
    """Both halves of one (id_type, size) in their own processes; the result is also written to `results_dir`
    (`RESULTS`, or `RESULTS_CUDA` for a CUDA run), named for the checkpoint's dtype where it is not float32, for
    the shared EOS vector where it is on, and for a row-wise edge optimizer state."""
    folder = work / f"{id_type}_{size}"
    result: dict[str, Any] = {"id_type": id_type, "size": size, "dim": DIM, "device": device, "bf16": bf16,
                              "save_dtype": save_dtype, "shared_eos_vector": shared_eos_vector,
                              "edge_optimizer_state": edge_optimizer_state,
                              "huge_pages": os.environ["THP_MEM_ALLOC_ENABLE"] == "1"}
    notes = ([f"{save_dtype} checkpoint"] if save_dtype != "float32" else []) + (
        ["shared EOS vector"] if shared_eos_vector else []) + (
        ["row-wise edge optimizer state"] if edge_optimizer_state != "full" else [])
    if notes:
        result["note"] = ", ".join(notes)
    for half in ("build", "serve"):
        command = [sys.executable, __file__, "--worker", half, "--id_types", id_type, "--sizes", str(size),
                   "--work", str(work), "--max_train_steps", str(max_train_steps), "--rss_limit_gb", str(rss_limit_gb),
                   "--device", device, "--save_dtype", save_dtype, "--edge_optimizer_state", edge_optimizer_state
                   ] + (["--bf16"] if bf16 else []) + (
                       ["--shared_eos_vector"] if shared_eos_vector else [])
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
    if device != "cpu":
        import torch

        result["device_name"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else device
    results_dir = results_dir or (RESULTS if device == "cpu" else RESULTS_CUDA)
    results_dir.mkdir(parents=True, exist_ok=True)
    suffix = ("" if save_dtype == "float32" else f"_{save_dtype}") + ("_shared_eos" if shared_eos_vector else "") + (
        "" if edge_optimizer_state == "full" else f"_{edge_optimizer_state}")
    (results_dir / f"{id_type}_{size}{suffix}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result



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
    parser.add_argument("--device", default="cpu",
                        help="Where the model trains and serves: cpu, or cuda (results in their own section).")
    parser.add_argument("--bf16", action="store_true", help="Train under bf16 autocast (fp32 weights).")
    parser.add_argument("--save_dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="Cast the trained model to this dtype before saving: the serving half loads, searches, "
                        "adds and removes in it.")
    parser.add_argument("--shared_eos_vector", action="store_true",
                        help="Fit the model with GcmrConfig(shared_eos_vector=True): one vector row for every forced "
                        "EOS edge.")
    parser.add_argument("--edge_optimizer_state", default="full", choices=("full", "row_wise"),
                        help="The edge vectors' LazyAdamW state in training (run_gcmr.py --edge_optimizer_state): "
                        "full (two moments) or row_wise (two floats per row).")
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument("--worker", choices=("build", "serve"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device here")
    elif args.device != "cpu":
        parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    sizes = [int(s) for s in args.sizes.split(",")]
    id_types = args.id_types.split(",")
    work = Path(args.work)
    if args.worker:
        folder = work / f"{id_types[0]}_{sizes[0]}"
        if args.worker == "build":
            result = build_half(id_types[0], sizes[0], folder, args.max_train_steps, args.rss_limit_gb * 1e9,
                                args.device, args.bf16, args.save_dtype, args.shared_eos_vector,
                                args.edge_optimizer_state)
        else:
            result = serve_half(id_types[0], sizes[0], folder, args.device)
        print(json.dumps(result))
        return
    if not args.report_only:
        work.mkdir(parents=True, exist_ok=True)
        for size in sizes:
            for id_type in id_types:
                run_one(id_type, size, work, args.max_train_steps, args.rss_limit_gb, args.device, args.bf16,
                        save_dtype=args.save_dtype, shared_eos_vector=args.shared_eos_vector,
                        edge_optimizer_state=args.edge_optimizer_state)
    report("python benchmarks/scale.py " + shlex.join(argv if argv is not None else sys.argv[1:]), args.device)


if __name__ == "__main__":
    main()
