"""Trie-constrained decoding speed, side by side in one process on the same model.

For each identifier shape (structured, coarse_fine, atomic), corpus size and beam count, it times
`generate` three ways on one random "tiny but realistic" T5 (d_model 256, 4+4 layers, 4 heads, a
32k text vocabulary plus the identifier tokens):

- unconstrained beam search (the floor: what the model alone costs),
- `PrefixTrieLogitsProcessor` on the `PrefixTrie` CSR arrays (in place, as `constrained_generate` runs it),
- transformers' `PrefixConstrainedLogitsProcessor` with a nested Python dict trie, the way the published
  GRACE code decodes (`prefix_allowed_tokens_fn` walks the dict and returns the allowed token list).

Identifier tables are synthetic (random unique codes, not k-means): decoding speed depends only on the
trie's shape. Prints a markdown table and writes it into docs/benchmarks.md (its own section).

    python benchmarks/decoding.py            # full: 1k / 100k / 1M identifiers, batch 32, beams 10 and 50
    python benchmarks/decoding.py --quick    # a minute: 1k / 10k identifiers, batch 8, beams 10
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PrefixConstrainedLogitsProcessor,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.utils import logging as hf_logging

from modeling_gcmr.prefix_trie_logits_processor import PrefixTrieLogitsProcessor
from tokenization_gcmr.prefix_trie import PrefixTrie

TEXT_VOCAB = 32_000  # <pad>=0, </s>=1, then text pieces; identifier tokens follow
PAD, EOS = 0, 1
QUERY_LENGTH = 16
SECTION_START = "<!-- decoding benchmark: start (written by benchmarks/decoding.py) -->"
SECTION_END = "<!-- decoding benchmark: end -->"
PLOT_NAME = "decoding_benchmark.png"


# --- synthetic identifier tables ----------------------------------------------------------------

def structured_rows(count: int, rng: np.random.Generator, fanout: int = 30) -> np.ndarray:
    """GRACE structured ids: a path of `fanout`-way choices, level-specific tokens, depth ceil(log_fanout N)."""
    depth = max(2, math.ceil(math.log(count) / math.log(fanout)))
    codes = rng.choice(fanout ** depth, size=count, replace=False)
    digits = np.stack([(codes // fanout ** (depth - 1 - level)) % fanout for level in range(depth)], axis=1)
    return TEXT_VOCAB + np.arange(depth) * fanout + digits


def coarse_fine_rows(count: int, rng: np.random.Generator, levels: int = 3, codebook: int = 256,
                     coarse: int | None = None) -> np.ndarray:
    """ACE ids: a coarse token (default 256 or 1024 clusters), `levels` fine tokens, a uniqueness token on collision."""
    coarse = coarse or (256 if count <= 10_000 else 1024)
    codes = np.empty((count, levels + 1), dtype=np.int64)
    codes[:, 0] = rng.integers(0, coarse, count)
    # Skewed fine codes, so that prefixes are shared and codes collide as residual codes of real data do.
    codes[:, 1:] = np.minimum(rng.geometric(8.0 / codebook, size=(count, levels)) - 1, codebook - 1)
    order = np.lexsort(codes.T[::-1])
    ordered = codes[order]
    new_group = np.r_[True, (ordered[1:] != ordered[:-1]).any(axis=1)]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(count), 0))
    group_size = np.diff(np.r_[np.flatnonzero(new_group), count])
    rank, size = np.empty(count, np.int64), np.empty(count, np.int64)
    rank[order] = np.arange(count) - group_start
    size[order] = np.repeat(group_size, group_size)
    rows = np.full((count, levels + 2), -1, dtype=np.int64)
    rows[:, 0] = TEXT_VOCAB + codes[:, 0]
    rows[:, 1 : levels + 1] = TEXT_VOCAB + coarse + np.arange(levels) * codebook + codes[:, 1:]
    unique_base = TEXT_VOCAB + coarse + levels * codebook
    collided = size > 1
    rows[collided, levels + 1] = unique_base + rank[collided]
    return rows


def atomic_rows(count: int, rng: np.random.Generator) -> np.ndarray:
    """One new token per image."""
    return (TEXT_VOCAB + rng.permutation(count))[:, None]


ID_SHAPES = {"structured": structured_rows, "coarse_fine": coarse_fine_rows, "atomic": atomic_rows}


# --- the GRACE-style baseline ---------------------------------------------------------------------

def build_dict_trie(rows: np.ndarray) -> dict:
    """Nested dicts token -> subtree, each identifier followed by EOS (as GRACE/GENRE's Trie)."""
    root: dict = {}
    for row in rows.tolist():
        node = root
        for token in row:
            if token < 0:
                break
            node = node.setdefault(token, {})
        node[EOS] = {}
    return root


def dict_trie_bytes(root: dict) -> int:
    """sys.getsizeof over every dict (keys are small shared ints)."""
    total, stack = 0, [root]
    while stack:
        node = stack.pop()
        total += sys.getsizeof(node)
        stack.extend(node.values())
    return total


def dict_allowed_tokens_fn(root: dict):
    def prefix_allowed_tokens_fn(batch_id: int, sent: torch.Tensor) -> list[int]:
        node = root
        for token in sent.tolist()[1:]:  # skip the decoder start token
            node = node.get(token)
            if node is None:
                return [EOS]
        return list(node.keys()) or [EOS]

    return prefix_allowed_tokens_fn


# --- timing ---------------------------------------------------------------------------------------

@dataclass
class Cell:
    id_type: str
    count: int
    beams: int
    vocab: int = 0
    depth: int = 0
    nodes: int = 0
    trie_mb: float = 0.0
    device_trie_mb: float = 0.0
    dict_mb: float = float("nan")
    trie_build_s: float = 0.0
    unconstrained_s: float = float("nan")
    ours_s: float = float("nan")
    ours_constraint_s: float = float("nan")
    dict_s: float = float("nan")
    dict_constraint_s: float = float("nan")
    dict_note: str = ""
    same_output: str = ""
    skipped: str = ""


def build_model(vocab: int, seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab, d_model=256, d_ff=1024, d_kv=64, num_layers=4, num_decoder_layers=4,
                      num_heads=4, decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS,
                      tie_word_embeddings=True)
    return T5ForConditionalGeneration(config).eval()


def generate(model, queries, beams: int, steps: int, processor=None) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(input_ids=queries, attention_mask=torch.ones_like(queries), do_sample=False,
                              num_beams=beams, num_return_sequences=beams, max_new_tokens=steps, length_penalty=0.0,
                              logits_processor=LogitsProcessorList([processor]) if processor else None)


class TimedProcessor(LogitsProcessor):
    """Runs a logits processor and adds up the CPU time it takes: the constraint's own cost."""

    def __init__(self, inner: LogitsProcessor) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.runs = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        start = time.process_time()
        processed = self.inner(input_ids, scores)
        self.seconds += time.process_time() - start
        return processed

    def per_run(self) -> float:
        return self.seconds / self.runs


def timed(fn, repeats: int, timer: TimedProcessor | None = None, slow_s: float = 5.0) -> tuple[float, object]:
    """Median CPU time of this process over `repeats` runs (one run when slower than `slow_s`), last result.

    CPU time rather than wall time: the cores are shared with other jobs, whose load would otherwise
    be measured too; with torch on one thread it counts exactly the work of the decode.
    """
    times, result = [], None
    for _ in range(repeats):
        start = time.process_time()
        result = fn()
        times.append(time.process_time() - start)
        if timer is not None:
            timer.runs += 1
        if times[-1] > slow_s:
            break
    return statistics.median(times), result


def peak_bytes_estimate(rows: int, vocab: int) -> int:
    # generate holds about five (rows, vocab) float32 matrices at once in a beam step: the logits, their
    # float copy, the log-softmax, the beam-score sum and top-k's buffers.
    return 5 * rows * vocab * 4


def run_shape(id_type: str, count: int, beam_list: list[int], args, rng: np.random.Generator) -> list[Cell]:
    rows = ID_SHAPES[id_type](count, rng)
    vocab = int(rows.max()) + 1
    start = time.perf_counter()
    trie = PrefixTrie.from_sequences(rows, EOS, vocab)
    build_s = time.perf_counter() - start
    processor = PrefixTrieLogitsProcessor(trie, num_skip_tokens=1, pad_token_id=PAD, inplace=True)
    steps = trie.depth  # identifier tokens + EOS
    model = build_model(vocab)
    queries = torch.from_numpy(rng.integers(2, TEXT_VOCAB, size=(args.batch_size, QUERY_LENGTH)))
    generate(model, queries[:2], 2, 2)  # warm up kernels and the device trie
    generate(model, queries[:2], 2, 2, processor=processor)
    dict_trie = build_dict_trie(rows)
    prefix_fn = dict_allowed_tokens_fn(dict_trie)
    cells = []
    for beams in beam_list:
        cell = Cell(id_type, count, beams, vocab=vocab, depth=steps - 1, nodes=trie.num_nodes,
                    trie_mb=trie.nbytes / 2**20, device_trie_mb=trie.on("cpu").nbytes() / 2**20,
                    dict_mb=dict_trie_bytes(dict_trie) / 2**20, trie_build_s=build_s)
        need = peak_bytes_estimate(args.batch_size * beams, vocab)
        if need > args.max_memory_gb * 2**30:
            cell.skipped = (f"needs ~{need / 2**30:.0f} GB for ({args.batch_size}x{beams}) x {vocab} float32 score "
                            f"matrices, over the {args.max_memory_gb:g} GB allowed on this shared 24 GB machine")
            cells.append(cell)
            continue
        cell.unconstrained_s, _ = timed(lambda: generate(model, queries, beams, steps), args.repeats,
                                        slow_s=args.slow_s)
        ours_timer = TimedProcessor(processor)
        cell.ours_s, ours = timed(lambda: generate(model, queries, beams, steps, processor=ours_timer), args.repeats,
                                  ours_timer, slow_s=args.slow_s)
        cell.ours_constraint_s = ours_timer.per_run()
        valid = trie.lookup(ours[:, 1:]) >= 0  # the decoder start token is not part of an identifier
        if not bool(valid.all()):
            raise AssertionError(f"{id_type} {count}: {int((~valid).sum())} constrained sequences are not identifiers")
        # Probe the baseline's processor on the first step to decide whether a full run is affordable.
        probe_rows = min(args.batch_size * beams, 16)
        start_ids = torch.full((probe_rows, 1), PAD, dtype=torch.long)
        baseline = PrefixConstrainedLogitsProcessor(prefix_fn, probe_rows)
        probe_scores = torch.zeros(probe_rows, vocab)
        start = time.process_time()
        baseline(start_ids, probe_scores)
        per_row_s = (time.process_time() - start) / probe_rows
        estimate_s = cell.unconstrained_s + per_row_s * args.batch_size * beams * steps
        if estimate_s > args.dict_budget_s:
            cell.dict_s = estimate_s
            cell.dict_constraint_s = estimate_s - cell.unconstrained_s
            cell.dict_note = "extrapolated"
            cell.same_output = "n/a"
        else:
            # One run: the baseline is the slow side, and the shared machine's time is scarce.
            dict_timer = TimedProcessor(PrefixConstrainedLogitsProcessor(prefix_fn, beams))
            cell.dict_s, theirs = timed(lambda: generate(model, queries, beams, steps, processor=dict_timer), 1,
                                        dict_timer)
            cell.dict_constraint_s = dict_timer.per_run()
            cell.same_output = "yes" if theirs.shape == ours.shape and bool((theirs == ours).all()) else "no"
        cells.append(cell)
        tqdm.write(table([cell]).splitlines()[-1])
    del model, dict_trie
    gc.collect()
    return cells


# --- report ---------------------------------------------------------------------------------------

def fmt_count(count: int) -> str:
    return f"{count // 1_000_000}M" if count >= 1_000_000 and count % 1_000_000 == 0 else (
        f"{count // 1000}k" if count % 1000 == 0 else str(count))


def table(cells: list[Cell]) -> str:
    order = list(ID_SHAPES)
    cells = sorted(cells, key=lambda c: (order.index(c.id_type), c.count, c.beams))
    head = ("| ids | N | beams | vocab | depth | trie nodes | CSR trie MB | on-device trie MB | dict trie MB "
            "| unconstrained s | ours s (constraint) | dict-trie s (constraint) | ours / unconstrained "
            "| dict-trie / ours | constraint: dict-trie / ours | same output |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in cells:
        prefix = (f"| {c.id_type} | {fmt_count(c.count)} | {c.beams} | {c.vocab:,} | {c.depth} | {c.nodes:,} "
                  f"| {c.trie_mb:.1f} | {c.device_trie_mb:.1f} | {c.dict_mb:.0f} ")
        if c.skipped:
            lines.append(prefix + f"| skipped: {c.skipped} | | | | | | |")
            continue
        dict_s = f"{c.dict_s:.2f} ({c.dict_constraint_s:.2f})" + (" extrapolated" if c.dict_note else "")
        lines.append(prefix + f"| {c.unconstrained_s:.2f} | {c.ours_s:.2f} ({c.ours_constraint_s:.3f}) | {dict_s} "
                     f"| {c.ours_s / c.unconstrained_s:.2f} | {c.dict_s / c.ours_s:.1f} "
                     f"| {c.dict_constraint_s / c.ours_constraint_s:.0f} | {c.same_output} |")
    return "\n".join(lines)


def _row_key(line: str) -> tuple[str, str, str]:
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    return cells[0], cells[1], cells[2]


def _row_order(line: str) -> tuple[int, int, int]:
    id_type, count, beams = _row_key(line)
    number = int(count.rstrip("kM")) * {"k": 1000, "M": 1_000_000}.get(count[-1], 1)
    return list(ID_SHAPES).index(id_type), number, int(beams)


def write_section(path: str, command: str, cells: list[Cell], args) -> None:
    """Write this benchmark's section of `path` (other sections stay), atomically.

    Rows of an earlier run that this run did not measure are kept, and the commands are listed.
    """
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    old_rows, commands = {}, []
    if SECTION_START in text and SECTION_END in text:
        old = text.split(SECTION_START, 1)[1].split(SECTION_END, 1)[0]
        commands = [line.split("`")[1] for line in old.splitlines() if line.startswith(("- `python ", "Command: `"))]
        old_rows = {_row_key(line): line for line in old.splitlines()
                    if line.startswith("| ") and line.split("|")[1].strip() in ID_SHAPES}
    new_lines = table(cells).splitlines()
    rows = {**old_rows, **{_row_key(line): line for line in new_lines[2:]}}
    body = "\n".join(new_lines[:2] + sorted(rows.values(), key=_row_order))
    commands = commands + [command] if command not in commands else commands
    section = "\n".join([
        SECTION_START,
        "## Trie-constrained decoding",
        "",
        "Commands:",
        "",
        *[f"- `{line}`" for line in commands],
        "",
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), shared with other "
        f"jobs, torch {torch.__version__} on {torch.get_num_threads()} thread(s), no GPU. Model: random T5, "
        f"d_model 256, 4+4 layers, 4 heads, 32k text vocabulary + identifier tokens; batch {args.batch_size}, "
        f"queries of {QUERY_LENGTH} tokens; `max_new_tokens` = identifier depth + 1 (EOS), `length_penalty=0`. "
        f"Times are CPU seconds of the process (not wall time: the cores are shared, so wall time would "
        f"measure the neighbours' load, and memory-bound steps still feel it: expect +-10% between runs), median "
        f"of {args.repeats} `generate` calls (one call when it takes over `--slow-s`, 5 s by default; always one "
        f"for the dict-trie baseline). Rows can be re-measured with `--id-types/--sizes/--beams`: a run replaces "
        f"only its own rows, and its command is added to the list. "
        "*ours* is `PrefixTrieLogitsProcessor` (in place, as `constrained_generate` runs it); *dict-trie* is "
        "transformers' `PrefixConstrainedLogitsProcessor` over a nested Python dict trie, as the GRACE code "
        "decodes. *Same output*: both constrained runs return identical sequences. *(constraint)*: CPU seconds spent inside the logits processor per `generate` call. *Extrapolated*: the "
        "baseline was timed on the first step for 16 rows and scaled to all rows and steps plus the "
        "unconstrained time, because a full run would exceed the time budget. Trie memory: the CSR arrays, "
        "their int64 copy with the search keys that the processor keeps per device, and the dict trie "
        "(`sys.getsizeof` over its dicts). Identifier tables are synthetic (random unique codes: "
        "structured = fan-out 30 per level, coarse_fine = 256/1024 coarse + 3 skewed fine levels of 256 "
        "+ a uniqueness token on collision, atomic = one token per id).",
        "",
        body,
        "",
        f"![CPU seconds per generate call vs identifiers, per id type and beam width]({PLOT_NAME})",
        SECTION_END,
    ])
    if SECTION_START in text and SECTION_END in text:
        before, rest = text.split(SECTION_START, 1)
        text = before + section + rest.split(SECTION_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as handle:
        handle.write(text)
    os.chmod(handle.name, 0o644)  # NamedTemporaryFile creates 0600
    os.replace(handle.name, path)


def _seconds(cell: str) -> float | None:
    """'12.68 (0.458)' -> 12.68; an empty or skipped cell -> None."""
    try:
        return float(cell.split("(")[0].strip())
    except ValueError:
        return None


def plot_section(doc_path: str) -> str:
    """Draw every row of the section's table: CPU seconds per `generate` call vs identifiers, one panel per id type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from modeling_gcmr.atomic_write_gcmr import atomic_write

    section = open(doc_path).read().split(SECTION_START, 1)[1].split(SECTION_END, 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and line.split("|")[1].strip() in ID_SHAPES]
    methods = {"unconstrained": 9, "ours": 10, "dict-trie": 11}
    figure, axes = plt.subplots(1, len(ID_SHAPES), figsize=(4.2 * len(ID_SHAPES), 3.6), sharey=True)
    for axis, id_type in zip(axes, ID_SHAPES):
        for (name, column), color in zip(methods.items(), ("tab:gray", "tab:blue", "tab:red")):
            for beams, style in (("10", "-"), ("50", "--")):
                points = sorted(
                    (_row_order(line)[1], _seconds(line.strip("|").split("|")[column]))
                    for line in rows if _row_key(line)[0] == id_type and _row_key(line)[2] == beams
                )
                points = [(x, y) for x, y in points if y is not None]
                if points:
                    axis.plot(*zip(*points), style, marker="o", color=color, label=f"{name}, beams {beams}")
        axis.set(title=id_type, xscale="log", yscale="log", xlabel="identifiers")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("CPU s per generate call (batch 32)")
    axes[-1].legend(fontsize=7)
    figure.tight_layout()
    path = os.path.join(os.path.dirname(os.path.abspath(doc_path)), PLOT_NAME)
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=100), mode="wb")
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1k/10k identifiers, batch 8, beams 10, 1 repeat")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
    parser.add_argument("--id-types", nargs="+", default=list(ID_SHAPES), choices=list(ID_SHAPES))
    parser.add_argument("--beams", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slow-s", type=float, default=5.0,
                        help="time a call once when it takes longer than this (CPU seconds)")
    parser.add_argument("--max-memory-gb", type=float, default=10.0,
                        help="skip a cell whose score matrices would need more than this")
    parser.add_argument("--dict-budget-s", type=float, default=300.0,
                        help="extrapolate the dict-trie baseline when a full run would take longer")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU time is what is measured)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the figure from the table in --output")
    args = parser.parse_args()
    if args.plot_only:
        print(f"wrote {plot_section(args.output)}")
        return
    if args.quick:
        args.sizes, args.beams, args.batch_size, args.repeats = [1_000, 10_000], [10], 8, 1
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    cells: list[Cell] = []
    # Largest corpora first: they carry the targets, and a run cut short still has them.
    jobs = [(id_type, count) for count in sorted(args.sizes, reverse=True) for id_type in args.id_types]
    command = " ".join(["python", "benchmarks/decoding.py", *sys.argv[1:]])
    for id_type, count in tqdm(jobs, desc="decoding benchmark"):
        cells.extend(run_shape(id_type, count, args.beams, args, rng))
        # Rewritten after every shape, so an interrupted run still leaves its finished rows.
        write_section(args.output, command, cells, args)
        plot_section(args.output)
    print(table(cells))
    print(f"wrote {os.path.normpath(args.output)}")


if __name__ == "__main__":
    main()
