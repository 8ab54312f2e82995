"""`save_retriever` replaces only a retriever checkpoint, an empty folder or a new path, and never loses a user's file.

A folder of other files, the current directory (or a folder holding it), the home folder, the root, and a symlink
to a folder of other files are refused with an error naming the folder and what it holds, and left as they were. A
checkpoint is replaced whole, atomically, but the entries that are not checkpoint data files (a README of one's own,
scripts, Trainer output, `.git`) stay, with their content and modes.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from test_model_card import build_tiny_retriever

import modeling_gcmr.atomic_write_gcmr as atomic_write_gcmr
from modeling_gcmr import GcmrForRetrieval
from modeling_gcmr.publishing import checkpoint as publishing
from modeling_gcmr.publishing.checkpoint import save_retriever
from tokenization_gcmr import ImageIdTokenizer

QUERIES = ["a small red circle left of a blue square", "a big green star above a grey ring"]


def build_retriever(text_tokenizer, prefix: str, num_images: int, seed: int):
    return build_tiny_retriever(text_tokenizer, num_images, prefix=prefix, id_type="atomic", seed=seed)


@pytest.fixture(scope="module")
def pair_a_b(text_tokenizer):
    return build_retriever(text_tokenizer, "a", 8, seed=1), build_retriever(text_tokenizer, "b", 12, seed=2)


def _keys(model, tokenizer) -> list[list[str]]:
    return [[key for key, _ in row] for row in model.retrieve(QUERIES, tokenizer, top_k=3)]


def _loads_as(folder: Path, pair) -> bool:
    model, tokenizer = GcmrForRetrieval.from_pretrained(folder), ImageIdTokenizer.from_pretrained(folder)
    return tokenizer.keys == pair[1].keys and _keys(model, tokenizer) == _keys(*pair)


def _tree(folder: Path) -> dict[str, bytes | str]:
    """Every entry under `folder` (a file's bytes, a symlink's target, a folder as '/')."""
    tree = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        tree[name] = f"-> {os.readlink(path)}" if path.is_symlink() else "/" if path.is_dir() else path.read_bytes()
    return tree


def _user_files(folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "data.txt").write_text("my data")
    (folder / "sub").mkdir()
    (folder / "sub" / "notes.md").write_text("# my notes")


# -- refused: the three data-loss cases of issue 17, and the other folders a swap must never move -------------------


def test_a_folder_of_other_files_is_refused_and_left_as_it_was(pair_a_b, tmp_path):
    (model, tokenizer), _ = pair_a_b
    project = tmp_path / "proj"
    _user_files(project)
    before = _tree(project)
    with pytest.raises(ValueError, match=r"refusing to save a retriever to .*proj: it holds data\.txt, sub/ and is "
                                         r"not a retriever checkpoint") as error:
        save_retriever(model, tokenizer, project)
    assert "proj/retriever" in str(error.value)  # what to do instead
    assert _tree(project) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["proj"]  # no staging folder left


def test_the_current_directory_and_the_folders_holding_it_are_refused(pair_a_b, tmp_path, monkeypatch):
    (model, tokenizer), _ = pair_a_b
    work = tmp_path / "work"
    _user_files(work)
    before = _tree(work)
    monkeypatch.chdir(work)
    with pytest.raises(ValueError, match=r"refusing to replace \.? ?.*work.*: it is the current directory"):
        save_retriever(model, tokenizer, ".")
    assert _tree(work) == before
    # Even a checkpoint is not replaced while the process works inside it.
    checkpoint = save_retriever(model, tokenizer, tmp_path / "ckpt")
    (checkpoint / "eval").mkdir()
    monkeypatch.chdir(checkpoint / "eval")
    with pytest.raises(ValueError, match="a folder holding the current directory"):
        save_retriever(model, tokenizer, "..")
    assert (checkpoint / "eval").is_dir() and _loads_as(checkpoint, (model, tokenizer))


def test_a_symlink_is_judged_by_its_target(pair_a_b, tmp_path):
    (model, tokenizer), _ = pair_a_b
    real = tmp_path / "real"
    _user_files(real)
    before = _tree(real)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(ValueError, match=r"to .*link \(-> .*real\): it holds data\.txt, sub/"):
        save_retriever(model, tokenizer, tmp_path / "link")
    assert _tree(real) == before and (tmp_path / "link").is_symlink()


def test_the_home_folder_and_the_root_are_refused(tmp_path, monkeypatch):
    home = tmp_path / "home" / "me"
    home.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    for folder, what in ((home, "your home folder"), (home.parent, "a folder holding your home folder")):
        with pytest.raises(ValueError, match=f"refusing to replace .*: it is {what}"):
            publishing.check_save_target(folder)
    with pytest.raises(ValueError, match="refusing to replace /: it is"):  # the root also holds the current directory
        publishing.check_save_target("/")


def test_a_file_is_refused(pair_a_b, tmp_path):
    (model, tokenizer), _ = pair_a_b
    (tmp_path / "ckpt").write_text("a file")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        save_retriever(model, tokenizer, tmp_path / "ckpt")
    assert (tmp_path / "ckpt").read_text() == "a file"


# -- replaced: new paths, empty folders, checkpoints ---------------------------------------------------------------


def test_an_empty_folder_or_one_holding_only_leftovers_of_killed_saves_is_saved_into(pair_a_b, tmp_path):
    (model, tokenizer), _ = pair_a_b
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = tmp_path / "ckpt"
    (folder / f".gcmr-staging-{int(dead.stdout)}-0123abcd").mkdir(parents=True)  # a killed save_pretrained's
    (folder / f".gcmr-staging-{int(dead.stdout)}-0123abcd" / "config.json").write_text("{}")
    save_retriever(model, tokenizer, folder)
    assert _loads_as(folder, (model, tokenizer))
    assert not [name for name in os.listdir(folder) if "gcmr-staging" in name]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _loads_as(save_retriever(model, tokenizer, empty), (model, tokenizer))


def test_a_tokenizer_only_folder_counts_as_a_checkpoint(pair_a_b, tmp_path):
    (model, tokenizer), _ = pair_a_b
    tokenizer.save_pretrained(tmp_path / "ckpt")
    assert publishing.is_retriever_checkpoint(tmp_path / "ckpt")
    assert _loads_as(save_retriever(model, tokenizer, tmp_path / "ckpt"), (model, tokenizer))


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two_renames"])
def test_re_saving_a_checkpoint_keeps_the_users_files_and_drops_stale_checkpoint_files(pair_a_b, tmp_path,
                                                                                        monkeypatch, exchange):
    (model_a, tokenizer_a), (model_b, tokenizer_b) = pair_a_b
    if not exchange:
        monkeypatch.setattr(atomic_write_gcmr, "_swap_paths", None)
    folder = save_retriever(model_a, tokenizer_a, tmp_path / "ckpt")
    _user_files(folder)
    (folder / "README.md").write_text("my own README")
    (folder / "secret.key").write_text("0600")
    (folder / "secret.key").chmod(0o600)
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (folder / "latest").symlink_to("sub")
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"a shard of an earlier, sharded save")
    user = {name: content for name, content in _tree(folder).items()
            if name.split("/")[0] in ("data.txt", "sub", "README.md", "secret.key", ".git", "latest")}
    save_retriever(model_b, tokenizer_b, folder)
    after = _tree(folder)
    assert {name: after.get(name) for name in user} == user
    assert (folder / "secret.key").stat().st_mode & 0o777 == 0o600  # a kept file keeps its mode
    assert "model-00001-of-00002.safetensors" not in after  # not written by the new save: it went with the old one
    assert _loads_as(folder, (model_b, tokenizer_b))
    # A card given to the save is its README.md.
    save_retriever(model_a, tokenizer_a, folder, card=ModelCard("---\nlicense: mit\n---\n# card of A"))
    assert "# card of A" in (folder / "README.md").read_text() and (folder / "sub" / "notes.md").is_file()
    assert _loads_as(folder, (model_a, tokenizer_a))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ckpt"]  # no staging, backup or trash left
