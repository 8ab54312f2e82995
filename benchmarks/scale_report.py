"""Tables, plots and targets of `benchmarks/scale.py`'s results: the `scale` (CPU) and `scale_cuda` sections of
docs/benchmarks.md, with `docs/scale.png` / `docs/scale_cuda.png`. Measuring lives in scale.py, reporting here."""
from __future__ import annotations

import json
from pathlib import Path

from report import REPO, git_revision, machine, markdown_table, write_section

RESULTS = REPO / "benchmarks" / "results" / "scale"
RESULTS_CUDA = REPO / "benchmarks" / "results" / "scale_cuda"  # `--device cuda` runs: their own section
DOC_PATH = REPO / "docs" / "benchmarks.md"
PLOT_PATH = REPO / "docs" / "scale.png"
PLOT_PATH_CUDA = REPO / "docs" / "scale_cuda.png"
FINDINGS = Path(__file__).with_name("scale_findings.md")  # what the runs showed: prose, kept out of the code


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else (f"{value:.1f}" if value >= 1 else f"{value:.2f}")


def _worst(result: dict, measure: str) -> tuple[float | None, str]:
    """The largest per-step peak of `measure` (peak_rss_gb, peak_gpu_gb) and the step it came from."""
    peaks = {name: result.get(f"{name}_{measure}") for name in ("build", "fit", "train", "save", "load", "to_device",
                                                                 "retrieve", "add", "remove")}
    return max(((v, k) for k, v in peaks.items() if v is not None), default=(None, "-"))


def table(results: list[dict]) -> str:
    gpu = any("train_peak_gpu_gb" in r or "retrieve_peak_gpu_gb" in r for r in results)
    header = ["id_type", "images", "build s", "fit s", "train ex/s", "save s", "load s", "checkpoint GB",
              "retrieve ms/q", "add 10k s", "add ms/image (model)", "remove 10k s", "peak RSS GB (step)",
              *(["peak GPU GB (step)"] if gpu else [])]
    rows = []
    for r in results:
        worst = _worst(r, "peak_rss_gb")
        train = "skipped (memory)" if r.get("train_skipped") else "-" if "train_examples_per_second" not in r else (
            f"{r['train_examples_per_second']:.0f}" + ("" if r["train_full_epoch"] else f" ({r['train_steps']} steps)"))
        rows.append([r["id_type"], f"{r['size']:,}", _seconds(r.get("build_seconds")), _seconds(r.get("fit_seconds")),
                     train, _seconds(r.get("save_seconds")), _seconds(r.get("load_seconds")),
                     _gb(r["checkpoint_bytes"] / 1e9 if "checkpoint_bytes" in r else None),
                     _seconds(r.get("retrieve_ms_per_query")), _seconds(r.get("add_seconds")),
                     _seconds(r.get("add_model_placement_ms_per_image")),
                     _seconds(r.get("remove_seconds")), f"{_gb(worst[0])} ({worst[1]})"])
        if gpu:
            worst_gpu = _worst(r, "peak_gpu_gb")
            rows[-1].append(f"{_gb(worst_gpu[0])} ({worst_gpu[1]})")
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
        raw = big["size"] * big["dim"] * 4 / 1e9
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


def report(command: str, device: str = "cpu") -> None:
    if device != "cpu":
        report_cuda(command)
        return
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


def report_cuda(command: str) -> None:
    """The `scale_cuda` section of docs/benchmarks.md: the same path on a GPU, beside the CPU section above it."""
    results = [json.loads(path.read_text(encoding="utf-8")) for path in sorted(RESULTS_CUDA.glob("*.json"))]
    results.sort(key=lambda r: (r["id_type"], r["size"]))
    if not results:
        raise SystemExit(f"no results under {RESULTS_CUDA}")
    plot(results, PLOT_PATH_CUDA)
    devices = sorted({r.get("device_name", r.get("device", "?")) for r in results})
    text = "\n\n".join([
        "## Scale on CUDA: the same path on a GPU",
        f"```\n{command}\n```",
        f"Machine: {machine()} ({', '.join(devices)}); revision {git_revision()}. Training in bf16 autocast with fp32 "
        "weights where the rows say bf16: " + (", ".join(f"{r['id_type']} {r['size']:,}" for r in results
                                                         if r.get("bf16")) or "none") + ".",
        "As the CPU section above: build and fit on the CPU (as `run_gcmr.py` does before the Trainer moves the "
        "model), then the model on the GPU for training, saved from host memory; in the serving process the "
        "checkpoint is loaded and moved to the GPU (`to_device`), where retrieve, add and remove run. Peak GPU "
        "memory is `torch.cuda.max_memory_allocated()` per step.",
        table(results),
        "![cost against collection size, CUDA](scale_cuda.png)",
    ])
    write_section(DOC_PATH, "scale_cuda", text, "# Benchmarks\n")
    print(table(results))
