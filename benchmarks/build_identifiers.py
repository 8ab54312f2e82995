"""Build time, size on disk and shape of `structured` and `coarse_fine` identifier tables at scale.

The corpus is a seeded synthetic Gaussian mixture (clustered like real image embeddings). For each
size, it builds structured (GRACE defaults) and coarse_fine with both fine quantizers (the default
RQ-VAE and residual k-means); it saves each table to measure its size
and, when ``tokenization_gcmr.prefix_trie`` is there, builds the decoding trie over it. Results go
to stdout as a markdown table, to ``benchmarks/results/build_identifiers.json`` and into the marked
section of ``docs/identifiers.md``.

    python benchmarks/build_identifiers.py --sizes 10000            # quick
    python benchmarks/build_identifiers.py --sizes 10000,1000000    # the documented figures
"""
from __future__ import annotations

import os

# Spinning OpenMP threads slow faiss down many times over on a machine whose cores are shared;
# this has to be set before any OpenMP runtime loads (numpy, faiss, torch).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from tokenization_gcmr.builders.identifiers import build_identifiers  # noqa: E402

try:
    from tokenization_gcmr.prefix_trie import PrefixTrie  # noqa: E402
except ImportError:  # the trie is built by another module; its columns are left out without it
    PrefixTrie = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_PATH = os.path.join(ROOT, "docs", "identifiers.md")
RESULTS_PATH = os.path.join(ROOT, "benchmarks", "results", "build_identifiers.json")
SECTION_START = "<!-- benchmark:build_identifiers:start -->"
SECTION_END = "<!-- benchmark:build_identifiers:end -->"
# A T5-sized text vocabulary: new identifier units get ids TEXT_VOCAB + unit index, EOS is 1.
TEXT_VOCAB = 32_100
EOS_TOKEN_ID = 1


def gaussian_mixture(
    num_items: int, dim: int, num_clusters: int, intrinsic_dim: int, seed: int, out: np.ndarray | None = None
) -> np.ndarray:
    """Seeded clustered embeddings, built in float32 blocks so 1M x 512 stays near 2 GB (or written into
    ``out``, for example a memory-mapped .npy file, holding one block at a time).

    Each component varies mostly inside a shared ``intrinsic_dim``-dimensional subspace (plus a little
    isotropic noise), as real image embeddings do; ``intrinsic_dim=0`` gives isotropic components,
    whose residuals are pure high-dimensional noise that no quantizer can tell apart.
    """
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((num_clusters, dim), dtype=np.float32)
    spread = rng.uniform(0.2, 0.8, num_clusters).astype(np.float32)
    basis = rng.standard_normal((max(intrinsic_dim, 1), dim), dtype=np.float32) / np.sqrt(max(intrinsic_dim, 1))
    labels = rng.integers(0, num_clusters, num_items)
    embeddings = np.empty((num_items, dim), dtype=np.float32) if out is None else out
    for start in range(0, num_items, 100_000):
        block = labels[start : start + 100_000]
        isotropic = rng.standard_normal((len(block), dim), dtype=np.float32)
        if intrinsic_dim:
            structured = rng.standard_normal((len(block), intrinsic_dim), dtype=np.float32) @ basis
            noise = structured + 0.1 * isotropic
        else:
            noise = isotropic
        embeddings[start : start + len(block)] = centers[block] + spread[block, None] * noise
    return embeddings


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def measure(keys: list[str], embeddings: np.ndarray, id_type: str, options: dict, label: str) -> dict:
    start = time.perf_counter()
    table = build_identifiers(keys, id_type, embeddings=embeddings, seed=0, **options)
    build_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        table.save(directory)
        save_s = time.perf_counter() - start
        disk = {name: os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory)}
    lengths = table.lengths()
    is_suffix = np.array([unit.startswith("<u_") for unit in table.units])
    last_units = table.codes[np.arange(len(keys)), lengths - 1]
    row = {
        "size": len(keys),
        "config": label,
        "build_s": round(build_s, 2),
        "save_s": round(save_s, 2),
        "disk_bytes": sum(disk.values()),
        "bytes_per_id": round(sum(disk.values()) / len(keys), 1),
        "disk_files": disk,
        "units": len(table.units),
        "length_mean": round(float(lengths.mean()), 2),
        "length_max": int(lengths.max()),
        "collided_ids": int(is_suffix[last_units].sum()),
        "peak_rss_gb": round(peak_rss_gb(), 2),
    }
    if PrefixTrie is not None:
        rows = np.where(table.codes >= 0, table.codes + TEXT_VOCAB, -1)
        start = time.perf_counter()
        trie = PrefixTrie.from_sequences(rows, EOS_TOKEN_ID, TEXT_VOCAB + len(table.units))
        row["trie_build_s"] = round(time.perf_counter() - start, 2)
        row["trie_mb"] = round(trie.nbytes / 1024**2, 1)
    return row


def markdown(rows: list[dict], environment: str) -> str:
    columns = ["size", "config", "build_s", "disk_bytes", "bytes_per_id", "units", "length_mean", "length_max",
               "collided_ids", "peak_rss_gb"]
    if any("trie_build_s" in row for row in rows):
        columns += ["trie_build_s", "trie_mb"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(f"{row.get(c, '')}" for c in columns) + " |" for row in rows]
    return environment + "\n\n" + "\n".join(lines)


def write_doc_section(text: str) -> None:
    """Replace the marked section of docs/identifiers.md (atomically), or append it."""
    content = open(DOC_PATH, encoding="utf-8").read() if os.path.exists(DOC_PATH) else ""
    section = f"{SECTION_START}\n{text}\n{SECTION_END}"
    if SECTION_START in content and SECTION_END in content:
        head, rest = content.split(SECTION_START, 1)
        content = head + section + rest.split(SECTION_END, 1)[1]
    else:
        content = content.rstrip("\n") + "\n\n" + section + "\n"
    tmp = DOC_PATH + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(content)
    os.replace(tmp, DOC_PATH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,1000000", help="comma-separated corpus sizes")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1000, help="Gaussian mixture components")
    parser.add_argument("--intrinsic-dim", type=int, default=32, help="rank of each component's main variation (0: isotropic)")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite the section of docs/identifiers.md")
    args = parser.parse_args()

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0]
    environment = (
        f"Measured on {platform.machine()} with {cpus} cores (1-minute load average {load:.1f} at start, the cores "
        f"being shared), faiss {faiss.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; embeddings {args.dim}-d float32 from a "
        f"{args.clusters}-component Gaussian mixture varying in a {args.intrinsic_dim}-d subspace (0 = isotropic); "
        f"default options; command: `python benchmarks/build_identifiers.py --sizes {args.sizes} "
        f"--intrinsic-dim {args.intrinsic_dim}`."
    )
    rows = []
    for size in (int(part) for part in args.sizes.split(",")):
        embeddings = gaussian_mixture(size, args.dim, args.clusters, args.intrinsic_dim, seed=size)
        keys = [f"image-{i:07d}" for i in range(size)]
        configs = [
            ("structured", {}, "structured"),
            ("coarse_fine", {}, "coarse_fine rqvae (default)"),
            ("coarse_fine", {"fine_quantizer": "residual_kmeans"}, "coarse_fine residual_kmeans"),
        ]
        for id_type, options, label in configs:
            row = measure(keys, embeddings, id_type, options, label)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del embeddings
    environment += f" Load average at the end: {os.getloadavg()[0]:.1f}."
    report = markdown(rows, environment)
    print(report)
    os.makedirs(os.path.dirname(RESULTS_PATH), exist_ok=True)
    with open(RESULTS_PATH, "w", encoding="utf-8") as handle:
        json.dump({"environment": environment, "rows": rows}, handle, indent=1)
    if not args.no_doc:
        write_doc_section(report)


if __name__ == "__main__":
    main()
