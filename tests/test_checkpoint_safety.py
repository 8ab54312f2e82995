"""Saving never corrupts or destroys a checkpoint; loading a damaged or incomplete one fails with a clear error.

The kill tests save in a loop (alternating two different retrievers, A and B) in a child forked from one helper
process that imported the package once, and SIGKILL the child at seeded random moments. After every kill the folder
must load, with the package and through its own code in a process without it, as A or as B (keys exactly, scores
with a tolerance), with no empty file and every mode what the umask gives a new file. The README's two calls
(`model.save_pretrained(d); tokenizer.save_pretrained(d)`) are not atomic as a pair: there a kill may also leave a
model and a tokenizer from different saves, which must fail with an error that says so.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from subprocess_utils import run_without_package

from modeling_gcmr import GcmrConfig, GcmrForRetrieval
from modeling_gcmr.publishing.checkpoint import save_retriever
from tokenization_gcmr import ImageIdTokenizer, build_identifiers

QUERIES = ["a small red circle left of a blue square", "a big green star above a grey ring"]
TOP_K = 3
MIXED_SAVES = "different saves"
STAGING_NAME = re.compile(r"\.(?:.+\.)?gcmr-(?:staging|old|trash)-\d+-[0-9a-f]{8}$")
# experiment -> kills. "retriever_fallback" runs save_retriever as where renameat2 is missing.
EXPERIMENTS = {"retriever": 20, "retriever_fallback": 8, "pair": 20}
# A kill lands after this many times the duration of one save (measured per experiment, so a loaded machine that
# saves slower gets later kills): mostly in the first, second or third save of the loop.
KILL_AFTER_SAVES = (0.05, 3.0)

# Imports the package and loads A and B once, then forks one child per command; the child saves them in turn (one
# byte on the pipe per finished save) until it is killed. A forked child can deadlock on a lock another thread or
# process held at the wrong moment: torch's OpenMP pool is kept at one thread, the weight loader's threads are waited
# for, and progress bars are off (tqdm's lock is shared by every forked child, and a child killed while holding it
# would block all the next ones). A hung child fails the test.
SAVER = r"""
import itertools, json, os, select, signal, sys, threading, time, traceback
import torch
from transformers.utils import logging as transformers_logging
torch.set_num_threads(1)
transformers_logging.disable_progress_bar()
import modeling_gcmr.atomic_write_gcmr as atomic_write_gcmr
from modeling_gcmr import GcmrForRetrieval
from modeling_gcmr.publishing.checkpoint import save_retriever
from tokenization_gcmr import ImageIdTokenizer

sources = json.loads(sys.argv[1])
pairs = {name: (GcmrForRetrieval.from_pretrained(path).eval(), ImageIdTokenizer.from_pretrained(path))
         for name, path in sources.items()}
for thread in threading.enumerate():  # the weight loader's pool threads may still be exiting
    if thread is not threading.main_thread():
        thread.join(timeout=10)
assert threading.active_count() == 1, threading.enumerate()
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    command = json.loads(line)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        try:
            if command["fallback"]:
                atomic_write_gcmr._swap_paths = None  # as where renameat2 is missing: rename aside, then rename in
            os.write(write_end, b"r")
            order = [command["first"], "b" if command["first"] == "a" else "a"]
            for count in itertools.count():
                model, tokenizer = pairs[order[count % 2]]
                if command["mode"] == "pair":
                    model.save_pretrained(command["target"])
                    tokenizer.save_pretrained(command["target"])
                else:
                    save_retriever(model, tokenizer, command["target"])
                os.write(write_end, b"s")
                if command["once"]:
                    break
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    os.close(write_end)
    ready = os.read(read_end, 1) == b"r"
    print(json.dumps({"pid": pid, "ready": ready}), flush=True)
    deadline = time.monotonic() + 60
    while True:  # a save that hangs is a failure too, not a wait forever
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            status = "hung"
            break
        time.sleep(0.01)
    saves = b""
    while select.select([read_end], [], [], 0)[0]:
        chunk = os.read(read_end, 4096)
        if not chunk:
            break
        saves += chunk
    os.close(read_end)
    print(json.dumps({"status": status, "saves": saves.count(b"s")}), flush=True)
"""

REMOTE_LOAD = r"""
import json
from transformers import AutoModel, AutoTokenizer
out = {}
for folder in FOLDERS:
    try:
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        hits = model.retrieve(QUERIES, tokenizer, top_k=TOP_K)
        out[folder] = {"hits": [[[k, float(s)] for k, s in row] for row in hits], "module": type(model).__module__}
    except Exception as error:
        out[folder] = {"error": f"{type(error).__name__}: {error}"}
print(json.dumps(out))
"""


def build_retriever(text_tokenizer, prefix: str, num_images: int, seed: int):
    """A tiny T5 retriever over atomic identifiers; A and B differ in keys, vocabulary size and weights."""
    torch.manual_seed(seed)
    table = build_identifiers([f"{prefix}-{i:02d}" for i in range(num_images)], "atomic")
    tokenizer = ImageIdTokenizer(text_tokenizer, table)
    text_config = dict(model_type="t5", vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_heads=2,
                       num_layers=1, num_decoder_layers=1, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = GcmrForRetrieval(GcmrConfig(text_config=text_config, num_beams=4))
    model.set_identifier_vocabulary(tokenizer)
    return model.eval(), tokenizer


def _hits(model, tokenizer) -> list:
    return [[[key, float(score)] for key, score in row] for row in model.retrieve(QUERIES, tokenizer, top_k=TOP_K)]


def _which(hits: list, expected: dict) -> str:
    """'a' or 'b' when `hits` are that checkpoint's (keys exactly, scores within 1e-4), else 'neither'."""
    for name, reference in expected.items():
        same_keys = [[k for k, _ in row] for row in hits] == [[k for k, _ in row] for row in reference]
        if same_keys and all(
            s == pytest.approx(r, abs=1e-4) for row, ref in zip(hits, reference) for (_, s), (_, r) in zip(row, ref)
        ):
            return name
    return "neither"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(path for path in _checkpoint_paths(folder) if path.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _checkpoint_paths(folder: Path) -> list[Path]:
    """The folder and what it holds, without the staging folder a killed staged save left inside it.

    That one is no part of the checkpoint (loading never reads it); the next save removes it, which
    `test_the_next_save_leaves_no_staging_folder` checks.
    """
    paths = [folder]
    for root, folders, files in os.walk(folder):
        folders[:] = [name for name in folders if not STAGING_NAME.match(name)]
        paths += [Path(root, name) for name in folders + files]
    return paths


def _inspect(folder: Path, expected: dict) -> dict:
    """What a kill left: empty files, wrong modes, and what the package loads from the folder."""
    mask = _umask()
    state = {"zero_bytes": [], "bad_modes": [], "outcome": None, "error": None}
    try:
        model = GcmrForRetrieval.from_pretrained(folder).eval()  # first: it restores an interrupted swap
        tokenizer = ImageIdTokenizer.from_pretrained(folder)
        state["outcome"] = _which(_hits(model, tokenizer), expected)
    except Exception as error:  # the test classifies every failure below; none may pass unnoticed
        state["outcome"], state["error"] = "error", f"{type(error).__name__}: {error}"
    if folder.is_dir():
        for path in _checkpoint_paths(folder):
            mode = path.stat().st_mode & 0o777
            if mode != (0o777 if path.is_dir() else 0o666) & ~mask:
                state["bad_modes"].append(f"{path.relative_to(folder)} {oct(mode)}")
            if path.is_file() and path.stat().st_size == 0:
                state["zero_bytes"].append(str(path.relative_to(folder)))
    return state


class Saver:
    """The helper process: one import of the package, one forked child per save loop."""

    def __init__(self, sources: dict, cwd: Path):
        self.log = (cwd / "saver.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SAVER, json.dumps(sources)], cwd=cwd, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=dict(os.environ),
        )
        assert self._read().get("ready"), "the saving helper did not start"

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"the saving helper exited ({self.proc.poll()}); see saver.log"
        return json.loads(line)

    def save(self, mode: str, first: str, target: Path, fallback: bool, kill_after: float | None = None) -> int:
        """Start a save loop (or one save, when `kill_after` is None), SIGKILL it after `kill_after` seconds.

        Returns how many saves the child finished before it was killed.
        """
        command = {"mode": mode, "first": first, "target": str(target), "fallback": fallback,
                   "once": kill_after is None}
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        started = self._read()
        assert started["ready"], "the saving child could not load the retrievers; see saver.log"
        if kill_after is not None:
            time.sleep(kill_after)
            os.kill(started["pid"], signal.SIGKILL)
        ended = self._read()
        assert ended["status"] == (signal.SIGKILL if kill_after is not None else 0), ended
        return ended["saves"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.log.close()


def _leftovers(target: Path) -> list[str]:
    """What else a save left next to `target` (alone in its folder) or hidden inside it: staging, backups."""
    beside = [path for path in target.parent.iterdir() if path != target]
    inside = [path for path in target.iterdir() if path.name.startswith(".")] if target.is_dir() else []
    return sorted(str(path) for path in beside + inside)


@pytest.fixture(scope="module")
def kills(text_tokenizer, tmp_path_factory) -> dict:
    """Every experiment's trials (what each kill left), and the same folders loaded without the package."""
    work = tmp_path_factory.mktemp("kills")
    retrievers = {"a": build_retriever(text_tokenizer, "a", 8, seed=1),
                  "b": build_retriever(text_tokenizer, "b", 12, seed=2)}
    expected = {name: _hits(*pair) for name, pair in retrievers.items()}
    sources = {}
    for name, (model, tokenizer) in retrievers.items():
        sources[name] = str(work / f"source_{name}")
        model.save_pretrained(sources[name])
        tokenizer.save_pretrained(sources[name])
    rng = random.Random(8)
    snapshots: dict[str, str] = {}
    results: dict = {"expected": expected}
    saver = Saver(sources, work)
    try:
        for experiment, trials in EXPERIMENTS.items():
            mode, fallback = ("pair" if experiment == "pair" else "retriever"), experiment.endswith("fallback")
            target = work / experiment / "ckpt"
            target.parent.mkdir()
            shutil.copytree(sources["a"], target)
            started = time.monotonic()
            saver.save(mode, "b", target, fallback)
            one_save, states, current = time.monotonic() - started, [], "b"
            for _ in range(trials):
                other = "b" if current == "a" else "a"
                finished = saver.save(mode, other, target, fallback, one_save * rng.uniform(*KILL_AFTER_SAVES))
                state = {**_inspect(target, expected), "saves_before_kill": finished}
                if target.is_dir():
                    digest = _digest(target)
                    if digest not in snapshots:
                        snapshots[digest] = str(work / "snapshots" / f"state_{digest}")
                        shutil.copytree(target, snapshots[digest])
                    state["snapshot"] = snapshots[digest]
                states.append(state)
                current = state["outcome"] if state["outcome"] in ("a", "b") else current
            saver.save(mode, "b" if current == "a" else "a", target, fallback)
            results[experiment] = {"states": states, "leftovers_after_next_save": _leftovers(target),
                                   "after_next_save": _inspect(target, expected)}
    finally:
        saver.close()
    code = f"FOLDERS = {sorted(snapshots.values())!r}\nQUERIES = {QUERIES!r}\nTOP_K = {TOP_K}\n" + REMOTE_LOAD
    results["remote"] = run_without_package(code, cwd=str(work), timeout=240)
    return results


def _summary(states: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for state in states:
        kind = state["outcome"]
        if kind == "error":
            kind = "mixed" if MIXED_SAVES in state["error"] else "error"
        counts[kind] = counts.get(kind, 0) + 1
        if state["zero_bytes"]:
            counts["with a 0-byte file"] = counts.get("with a 0-byte file", 0) + 1
    return counts


def _remote_outcome(result: dict, expected: dict) -> str:
    return _which(result["hits"], expected) if "hits" in result else "error: " + result["error"]


@pytest.mark.parametrize("experiment", ["retriever", "retriever_fallback"])
def test_a_killed_save_retriever_leaves_the_old_or_the_new_checkpoint(kills, experiment):
    states = kills[experiment]["states"]
    summary = _summary(states)
    assert {state["outcome"] for state in states} <= {"a", "b"}, (summary, [s["error"] for s in states if s["error"]])
    assert sum(state["saves_before_kill"] for state in states) > 0, summary  # folders were replaced, then killed
    assert not [state["zero_bytes"] for state in states if state["zero_bytes"]], summary
    for state in states:  # the checkpoint's own code, in a process without the package, loads the same checkpoint
        assert _remote_outcome(kills["remote"][state["snapshot"]], kills["expected"]) == state["outcome"]


def test_a_killed_readme_save_never_leaves_an_empty_file_nor_an_unnoticed_mix(kills):
    states = kills["pair"]["states"]
    summary = _summary(states)
    assert sum(state["saves_before_kill"] for state in states) > 0, summary  # folders were replaced, then killed
    assert not [state["zero_bytes"] for state in states if state["zero_bytes"]], summary
    assert set(summary) <= {"a", "b", "mixed"}, (summary, [s["error"] for s in states if s["error"]])
    for state in states:
        remote = _remote_outcome(kills["remote"][state["snapshot"]], kills["expected"])
        if state["outcome"] == "error":
            assert remote.startswith("error: ") and MIXED_SAVES in remote and "save_retriever" in remote, remote
            assert "save_retriever" in state["error"]
        else:
            assert remote == state["outcome"]


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_every_file_gets_the_mode_the_umask_gives_a_new_file(kills, experiment):
    bad = [state["bad_modes"] for state in kills[experiment]["states"] if state["bad_modes"]]
    assert not bad and not kills[experiment]["after_next_save"]["bad_modes"], bad


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_the_next_save_leaves_no_staging_folder(kills, experiment):
    assert kills[experiment]["leftovers_after_next_save"] == []
    assert kills[experiment]["after_next_save"]["outcome"] in ("a", "b")


# -- loading a damaged or incomplete folder ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair_a_b(text_tokenizer):
    return build_retriever(text_tokenizer, "a", 8, seed=1), build_retriever(text_tokenizer, "b", 12, seed=2)


@pytest.fixture
def checkpoint(pair_a_b, tmp_path) -> Path:
    (model, tokenizer), _ = pair_a_b
    return save_retriever(model, tokenizer, tmp_path / "ckpt")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _grow_config_vocabulary(folder: Path) -> tuple[int, int]:
    """Make config.json claim 5 more tokens than the weights hold; returns (config's size, the weights' size)."""
    config = json.loads((folder / "config.json").read_text())
    weights = config["text_config"]["vocab_size"]
    config["text_config"]["vocab_size"] = weights + 5
    (folder / "config.json").write_text(json.dumps(config))
    return weights + 5, weights


def _edit_config(folder: Path, edits: dict) -> None:
    """Set config.json's dotted `edits` (e.g. {"text_config.num_layers": 3})."""
    config = json.loads((folder / "config.json").read_text())
    for path, value in edits.items():
        *parents, name = path.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[name] = value
    (folder / "config.json").write_text(json.dumps(config))


# config.json edits that build what the weights do not hold (the tiny A checkpoint: 37 tensors, 8 identifiers, width
# 32, one layer each side), and what the error must say: the field, its value, and what model.safetensors holds.
SIZE_EDITS = {
    "layers_absurd": ({"text_config.num_layers": 10**6},
                      r"text_config\.num_layers = 1000000: it must be in \[0, 1024\].*model\.safetensors holds 37 "
                      r"tensors"),
    "layers_float": ({"text_config.num_layers": 1e6},
                     r"text_config\.num_layers = 1000000\.0: a size must be an int; model\.safetensors holds 37"),
    "layers_beyond_tensors": ({"text_config.num_decoder_layers": 500},
                              r"text_config\.num_decoder_layers = 500, but model\.safetensors holds 37 tensors in all"),
    "layers_more": ({"text_config.num_layers": 3},
                    r"text_config\.num_layers mismatch: config\.json .* sets text_config\.num_layers = 3, which "
                    r"builds 3 layers in backbone\.encoder\.block; model\.safetensors holds 1"),
    "identifiers_huge": ({"num_identifiers": 10**8},
                         r"num_identifiers mismatch: config\.json .* sets num_identifiers = 100000000, which builds "
                         r"identifier_head\.paths as \(100000000, 2\); model\.safetensors holds \(8, 2\)"),
    "identifiers_absurd": ({"num_identifiers": 10**12},
                           r"num_identifiers = 1000000000000: it must be in \[0, 2147483647\]"),
    "edges": ({"num_identifier_edges": 10**7}, r"num_identifier_edges mismatch: .* = 10000000, which builds "
              r"identifier_head\.edge_vectors as \(10000000, 32\); model\.safetensors holds \(16, 32\)"),
    "identifier_dim": ({"identifier_dim": 64}, r"identifier_dim mismatch: .* sets identifier_dim = 64, which builds"),
    "heads": ({"text_config.num_heads": 4}, r"text_config\.num_heads mismatch: .* sets text_config\.num_heads = 4"),
    "width": ({"text_config.d_model": 4096}, r"text_config\.d_model mismatch: .* sets text_config\.d_model = 4096"),
}


@pytest.mark.parametrize("case", sorted(SIZE_EDITS))
def test_config_sizes_the_weights_do_not_hold_are_refused_before_anything_is_built(checkpoint, case):
    """Issue 17: num_layers = 1e6 ran the loader into a SystemError after 1.5 GB; 3 layers loaded two random ones;
    a huge num_identifiers was reported as a "vocab_size mismatch"."""
    edits, message = SIZE_EDITS[case]
    _edit_config(checkpoint, edits)
    with pytest.raises(Exception, match=message) as error:
        GcmrForRetrieval.from_pretrained(checkpoint)
    assert "vocab" not in str(error.value)


def test_sharded_weights_are_checked_shard_by_shard(pair_a_b, tmp_path):
    (model, _), _ = pair_a_b
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    GcmrForRetrieval.from_pretrained(tmp_path)  # a sharded checkpoint of matching sizes loads
    _edit_config(tmp_path, {"num_identifiers": 9})
    with pytest.raises(ValueError, match=r"num_identifiers = 9, which builds identifier_head\.paths as \(9, 2\); "
                                         r"model-\d{5}-of-\d{5}\.safetensors holds \(8, 2\)"):
        GcmrForRetrieval.from_pretrained(tmp_path)


def test_ignore_mismatched_sizes_still_loads_a_checkpoint_of_another_vocabulary(checkpoint):
    config_size, _ = _grow_config_vocabulary(checkpoint)
    model = GcmrForRetrieval.from_pretrained(checkpoint, ignore_mismatched_sizes=True)
    assert model.vocab_size == config_size


def test_a_config_made_in_code_with_absurd_sizes_is_refused_before_allocation():
    text = dict(model_type="t5", vocab_size=100, d_model=16, d_ff=32, d_kv=4, num_heads=4, num_layers=1)
    for options, message in [
        (dict(text_config={**text, "num_layers": 10**6}), r"text_config\.num_layers = 1000000: it must be in"),
        (dict(text_config={**text, "vocab_size": 2**40}), r"text_config\.vocab_size = 1099511627776: it must be in"),
        (dict(text_config=text, num_identifiers=10**12), r"num_identifiers = 1000000000000: it must be in"),
        (dict(text_config=text, image_embed_dim=10**9), r"image_embed_dim = 1000000000: it must be in"),
    ]:
        with pytest.raises(Exception, match=message):
            GcmrConfig(**options)
    config = GcmrConfig(text_config=text)
    config.text_config.num_layers = 10**6  # changed after the config was made
    started = time.monotonic()
    with pytest.raises(Exception, match=r"text_config\.num_layers = 1000000: it must be in"):
        GcmrForRetrieval(config)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("value", ["some/dir/modeling_gcmr.GcmrForRetrieval", "some.dir.modeling_gcmr.GcmrForRetrieval",
                                   "a--b--modeling_gcmr.GcmrForRetrieval", "modeling_gcmr"])
def test_an_auto_map_entry_transformers_cannot_resolve_is_named(checkpoint, value):
    """Issue 17: such an entry gave transformers' "too many values to unpack" (or a missing some/dir/... file)."""
    from modeling_gcmr.publishing.checkpoint import check_checkpoint_files

    _edit_config(checkpoint, {"auto_map.AutoModel": value})
    message = rf"the auto_map entry AutoModel = '{re.escape(value)}' of config\.json cannot be resolved"
    with pytest.raises(ValueError, match=message):
        check_checkpoint_files(checkpoint)
    with pytest.raises(Exception, match=message):
        GcmrForRetrieval.from_pretrained(checkpoint)


def test_a_checkpoint_whose_auto_map_points_at_another_repository_is_incomplete(checkpoint):
    from modeling_gcmr.publishing.checkpoint import check_checkpoint_files

    _edit_config(checkpoint, {"auto_map.AutoModel": "user/repo--modeling_gcmr.GcmrForRetrieval"})
    with pytest.raises(ValueError, match=r"auto_map of config\.json points at code in another repository"):
        check_checkpoint_files(checkpoint)


def test_a_missing_tokenizer_config_is_named(checkpoint):
    from transformers import AutoTokenizer

    (checkpoint / "tokenizer_config.json").unlink()
    for load in (ImageIdTokenizer.from_pretrained, AutoTokenizer.from_pretrained):
        with pytest.raises(ValueError, match=r"tokenizer_config\.json is missing") as error:
            load(checkpoint)
        assert "neither an EOS nor a SEP" not in str(error.value)


def test_a_missing_config_json_fails_instead_of_building_a_default_model(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(OSError, match=r"config\.json is missing from .*ckpt"):
        GcmrForRetrieval.from_pretrained(checkpoint)


def test_a_config_and_weights_of_different_vocabulary_sizes_name_both_sizes(checkpoint):
    config_size, weights_size = _grow_config_vocabulary(checkpoint)
    message = rf"vocab_size mismatch: config\.json .*{config_size}.*model\.safetensors .*{weights_size}"
    with pytest.raises(ValueError, match=message) as error:
        GcmrForRetrieval.from_pretrained(checkpoint)
    assert MIXED_SAVES in str(error.value) and "save_retriever" in str(error.value)
    assert "ignore_mismatched_sizes" not in str(error.value).split("(")[0]


def test_a_model_and_a_tokenizer_from_different_saves_are_named_as_such(pair_a_b, tmp_path):
    (_, tokenizer_a), (model_b, _) = pair_a_b
    model_b.save_pretrained(tmp_path)
    tokenizer_a.save_pretrained(tmp_path)  # as a kill between the README's two calls leaves the folder
    model, tokenizer = GcmrForRetrieval.from_pretrained(tmp_path), ImageIdTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"identifier vocabulary mismatch.*{MIXED_SAVES}.*save_retriever"):
        model.retrieve(QUERIES, tokenizer)


def test_damaged_folders_give_the_packages_errors_through_the_checkpoints_own_code(checkpoint, pair_a_b, tmp_path):
    """The same errors where only the checkpoint's code exists (trust_remote_code=True, no package)."""
    damaged = {}
    for name, damage in {
        "vocabulary": lambda folder: _grow_config_vocabulary(folder),
        "layers_absurd": lambda folder: _edit_config(folder, SIZE_EDITS["layers_absurd"][0]),
        "layers_float": lambda folder: _edit_config(folder, SIZE_EDITS["layers_float"][0]),
        "layers_more": lambda folder: _edit_config(folder, SIZE_EDITS["layers_more"][0]),
        "identifiers_huge": lambda folder: _edit_config(folder, SIZE_EDITS["identifiers_huge"][0]),
        "auto_map_path": lambda folder: _edit_config(folder, {"auto_map.AutoModel": "some/dir/modeling_gcmr.Gcmr"}),
        "auto_map_dots": lambda folder: _edit_config(folder, {"auto_map.AutoModel": "some.dir.modeling_gcmr.Gcmr"}),
        "weights_truncated": lambda folder: _truncate(folder / "model.safetensors"),
        "table_truncated": lambda folder: _truncate(folder / "identifier_table.safetensors"),
    }.items():
        damaged[name] = tmp_path / name
        shutil.copytree(checkpoint, damaged[name])
        damage(damaged[name])
    (_, tokenizer_a), (model_b, _) = pair_a_b
    damaged["mixed"] = tmp_path / "mixed"
    model_b.save_pretrained(damaged["mixed"])
    tokenizer_a.save_pretrained(damaged["mixed"])
    code = f"FOLDERS = {[str(p) for p in damaged.values()]!r}\nQUERIES = {QUERIES!r}\nTOP_K = {TOP_K}\n" + REMOTE_LOAD
    out = run_without_package(code, cwd=str(tmp_path), timeout=240)
    errors = {name: out[str(folder)].get("error", "") for name, folder in damaged.items()}
    assert re.search(r"vocab_size mismatch: config\.json .*model\.safetensors", errors["vocabulary"]), errors
    for name in ("layers_absurd", "layers_float", "layers_more", "identifiers_huge"):
        assert re.search(SIZE_EDITS[name][1], errors[name]), errors
    for name in ("auto_map_path", "auto_map_dots"):
        assert re.search(r"auto_map entry AutoModel = '.*' of config\.json cannot be resolved", errors[name]), errors
    assert re.search(r"model\.safetensors is truncated or corrupt", errors["weights_truncated"]), errors
    assert re.search(r"identifier_table\.safetensors cannot be read", errors["table_truncated"]), errors
    assert MIXED_SAVES in errors["mixed"] and "save_retriever" in errors["mixed"], errors


# -- the staged saves themselves ------------------------------------------------------------------------------------


def test_save_pretrained_of_model_and_tokenizer_write_through_staging_with_umask_modes(pair_a_b, tmp_path):
    (model, tokenizer), _ = pair_a_b
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    mask = _umask()
    modes = {path.name: path.stat().st_mode & 0o777 for path in folder.iterdir()}
    assert modes and set(modes.values()) == {0o666 & ~mask}, modes
    assert (folder.stat().st_mode & 0o777) == 0o777 & ~mask
    assert not _leftovers(folder)


def test_save_retriever_keeps_the_folders_own_mode_and_saves_through_a_symlink(pair_a_b, tmp_path):
    (model, tokenizer), _ = pair_a_b
    folder = save_retriever(model, tokenizer, tmp_path / "ckpt")
    folder.chmod(0o750)
    (tmp_path / "link").symlink_to(folder)
    save_retriever(model, tokenizer, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (folder.stat().st_mode & 0o777) == 0o750
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ckpt", "link"]
    assert _which(_hits(GcmrForRetrieval.from_pretrained(tmp_path / "link"), ImageIdTokenizer.from_pretrained(folder)),
                  {"a": _hits(model, tokenizer)}) == "a"


def test_stale_staging_of_a_dead_save_is_removed_and_a_live_ones_kept(pair_a_b, tmp_path):
    (model, tokenizer), _ = pair_a_b
    folder = save_retriever(model, tokenizer, tmp_path / "ckpt")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = [tmp_path / f".ckpt.gcmr-staging-{dead_pid}-0123abcd", tmp_path / f".ckpt.gcmr-trash-{dead_pid}-0123abce",
             folder / f".gcmr-staging-{dead_pid}-0123abcf"]
    live = tmp_path / f".ckpt.gcmr-staging-{os.getpid()}-0123abd0"
    not_ours = [tmp_path / ".ckpt.gcmr-staging-x", tmp_path / f".other.gcmr-staging-{dead_pid}-0123abd1"]
    for path in [*stale, live, *not_ours]:
        path.mkdir()
        (path / "config.json").write_text("{}")
    save_retriever(model, tokenizer, folder)
    assert [path for path in stale if path.exists()] == []
    assert live.exists() and all(path.exists() for path in not_ours)


def test_an_interrupted_fallback_swap_is_restored_by_the_next_load(pair_a_b, tmp_path):
    """Where renameat2 is missing, a kill between 'rename aside' and 'rename in' leaves only the backup."""
    (model, tokenizer), _ = pair_a_b
    folder = save_retriever(model, tokenizer, tmp_path / "ckpt")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    backup = tmp_path / f".ckpt.gcmr-old-{int(dead.stdout)}-0123abcd"
    os.rename(folder, backup)
    reloaded = GcmrForRetrieval.from_pretrained(folder)
    assert folder.is_dir() and not backup.exists()
    assert _which(_hits(reloaded, ImageIdTokenizer.from_pretrained(folder)), {"a": _hits(model, tokenizer)}) == "a"


# -- a disk that fills up while saving -----------------------------------------------------------------------------

# The child saves with a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored): every write past it fails with EFBIG, as a
# full disk fails with ENOSPC, without needing a small file system to be mounted.
FULL_DISK_SAVER = r"""
import json, resource, signal, sys
from modeling_gcmr import GcmrForRetrieval
from modeling_gcmr.publishing.checkpoint import save_retriever
from tokenization_gcmr import ImageIdTokenizer
source, target, limit, how = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
model, tokenizer = GcmrForRetrieval.from_pretrained(source), ImageIdTokenizer.from_pretrained(source)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    if how == "retriever":
        save_retriever(model, tokenizer, target)
    else:
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
except Exception as error:
    print(json.dumps({"error": f"{type(error).__name__}: {error}"}))
else:
    print(json.dumps({"error": None}))
"""


@pytest.mark.parametrize("how", ["retriever", "pair"])
def test_a_disk_that_fills_up_while_saving_keeps_the_old_checkpoint_and_leaves_nothing_half_written(
        pair_a_b, tmp_path, how):
    (model_a, tokenizer_a), (model_b, tokenizer_b) = pair_a_b
    source, target = tmp_path / "a", tmp_path / "target"
    save_retriever(model_a, tokenizer_a, source)
    save_retriever(model_b, tokenizer_b, target)
    before = {path.name: path.read_bytes() for path in target.iterdir()}
    weights = (source / "model.safetensors").stat().st_size
    done = subprocess.run([sys.executable, "-c", FULL_DISK_SAVER, str(source), str(target), str(weights // 2), how],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 0, done.stderr[-3000:]
    error = json.loads(done.stdout.strip().splitlines()[-1])["error"]
    assert error.startswith("DiskFullError") and f"while saving to {target} " in error, error
    assert "File too large" in error and "is as it was before" in error, error
    # The old checkpoint is there, byte for byte, and nothing of the failed save is left next to it or inside it.
    assert {path.name: path.read_bytes() for path in target.iterdir()} == before
    assert not [path.name for path in tmp_path.iterdir() if STAGING_NAME.search(path.name)]
    loaded = GcmrForRetrieval.from_pretrained(target).eval()
    assert _which(_hits(loaded, ImageIdTokenizer.from_pretrained(target)), {"b": _hits(model_b, tokenizer_b)}) == "b"
