"""Peak memory and time of `build_identifiers` on features that stay on disk (a memory-mapped .npy file).

Writes a seeded Gaussian-mixture feature matrix (the one of ``build_identifiers.py``) to a .npy file block by
block, builds the identifiers from ``np.load(path, mmap_mode="r")`` in a fresh process, and with
``--compare-in-memory`` builds them again from the array loaded whole, in another fresh process; it checks that
both tables are the same (content hash) and deletes the file. Each child samples its own resident memory:
``peak_rss_gb`` is the kernel's high-water mark (VmHWM), which counts the pages of the memory-mapped file
that the build has touched (page cache the kernel can drop at any time); ``peak_anon_gb`` is the memory the
build itself holds (RssAnon, sampled every 50 ms).

    python benchmarks/streamed_build.py --num-images 1000000 --compare-in-memory
"""
from __future__ import annotations

import os

# See build_identifiers.py: spinning OpenMP threads slow faiss down on shared cores; set before numpy loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)

from build_identifiers import gaussian_mixture  # noqa: E402

from tokenization_gcmr.builders.identifiers import build_identifiers  # noqa: E402


def memory_gb() -> dict[str, float]:
    """VmHWM (peak resident), RssAnon and RssFile of this process, in GB."""
    fields = {}
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name in ("VmHWM", "RssAnon", "RssFile"):
                fields[name] = int(value.split()[0]) / 1024**2
    return fields


def child(mode: str, path: str, id_type: str, options: dict) -> None:
    """Build from the file (memory-mapped, or loaded whole) and print one JSON line of figures."""
    peak = {"RssAnon": 0.0, "RssFile": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            for name, value in memory_gb().items():
                if name in peak:
                    peak[name] = max(peak[name], value)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    embeddings = np.load(path, mmap_mode="r" if mode == "memmap" else None)
    keys = [f"image-{i:07d}" for i in range(len(embeddings))]
    table = build_identifiers(keys, id_type, embeddings=embeddings, seed=0, **options)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    final = memory_gb()
    print(json.dumps({
        "mode": mode, "id_type": id_type, "options": options, "build_s": round(seconds, 1),
        "peak_rss_gb": round(final["VmHWM"], 2), "peak_anon_gb": round(max(peak["RssAnon"], final["RssAnon"]), 2),
        "peak_file_gb": round(max(peak["RssFile"], final["RssFile"]), 2), "content_hash": table.content_hash,
        "units": len(table.units),
    }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--id-type", default="coarse_fine", choices=["coarse_fine", "structured", "atomic"])
    parser.add_argument("--options", default="{}", help="JSON options for build_identifiers")
    parser.add_argument("--compare-in-memory", action="store_true", help="also build from the array loaded whole")
    parser.add_argument("--dir", default=None, help="where to write the temporary .npy file (default: TMPDIR)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    options = json.loads(args.options)
    if args.child:
        child(args.child[0], args.child[1], args.id_type, options)
        return
    directory = tempfile.mkdtemp(prefix="gcmr-streamed-", dir=args.dir)
    try:
        path = os.path.join(directory, "features.npy")
        start = time.perf_counter()
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(args.num_images, args.dim))
        gaussian_mixture(args.num_images, args.dim, 1000, 32, seed=args.num_images, out=out)
        out.flush()
        del out
        seconds = time.perf_counter() - start
        print(f"wrote {os.path.getsize(path) / 1e9:.2f} GB to {path} in {seconds:.1f} s", flush=True)
        results = []
        for mode in ["memmap"] + (["in_memory"] if args.compare_in_memory else []):
            command = [sys.executable, os.path.abspath(__file__), "--child", mode, path, "--id-type", args.id_type,
                       "--options", args.options]
            line = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results.append(json.loads(line))
            print(line, flush=True)
        if len(results) == 2:
            same = results[0]["content_hash"] == results[1]["content_hash"]
            print(f"memory-mapped and in-memory tables identical: {same}")
    finally:
        shutil.rmtree(directory)


if __name__ == "__main__":
    main()
