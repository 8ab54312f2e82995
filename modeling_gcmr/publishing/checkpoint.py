"""Save a retriever (model + tokenizer + model card) as one checkpoint folder, and push it to the Hub in one commit.

`save_pretrained` of the model and of the tokenizer copy the Hub code files (configuration, modeling, tokenization
and their siblings) next to the weights, so the folder loads with `trust_remote_code=True` where this package is not
installed. The card is written as README.md explicitly: the Hub's own `push_to_hub` would otherwise write its
template README. The folder is built next to its target, checked, and swapped in atomically
(`atomic_write_gcmr.replacing_folder`): a kill at any moment leaves the old checkpoint or the new one.

Only a retriever checkpoint, an empty folder or a new path is ever replaced (`check_save_target`): a swap replaces a
whole folder, and a folder of other files would lose them all. In a checkpoint that is replaced, every entry that is
not one of a checkpoint's data files (`CHECKPOINT_DATA_FILES`) is kept.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi, ModelCard
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer

from tokenization_gcmr.identifier_table import IdentifierTable

from ..atomic_write_gcmr import check_replaceable_location, is_save_leftover, replacing_folder
from ..configuration_gcmr import auto_map_problem

REQUIRED_FILES = ("config.json", "tokenizer_config.json", "text_tokenizer.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
# The data files a save of a retriever writes (this version or an earlier one). Re-saving a checkpoint drops the old
# copies of these that the new save does not write (a shard of a differently sharded model); every other entry of
# the folder (the code files, a README or script of your own, Trainer output, `.git`) is kept unless the new save
# writes a file of that name.
CHECKPOINT_DATA_FILES = re.compile(
    r"^(?:config\.json|generation_config\.json|model(?:-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"
    r"|tokenizer_config\.json|special_tokens_map\.json|added_tokens\.json|tokenizer\.json|text_tokenizer\.json"
    r"|identifier_table\.(?:json|safetensors))$"
)
# What marks a folder as a retriever checkpoint (either half of one): file -> (field, value).
CHECKPOINT_MARKS = {"config.json": ("model_type", "gcmr"),
                    "tokenizer_config.json": ("tokenizer_class", "ImageIdTokenizer")}
# A config larger than this is not one of ours; it is not read to find out.
_MAX_MARK_BYTES = 16 * 2**20
# Entries named in the error that refuses a folder.
_LISTED_ENTRIES = 6


def save_retriever(model, tokenizer, folder: str | os.PathLike, card: ModelCard | None = None) -> Path:
    """Write `model`, `tokenizer`, their code and `card` (as README.md) into `folder`, as one atomic step.

    Everything is written into a staging folder next to `folder`, checked (every file present and readable, the code
    non-empty), then swapped in with one atomic exchange: a crash or a kill at any moment leaves `folder` holding the
    complete old checkpoint or the complete new one, never a mix, and the next save removes what a killed one left.

    `folder` must be a new path, an empty folder or a retriever checkpoint (`check_save_target`); an existing
    checkpoint is replaced, keeping the entries that are not a checkpoint's data files (your own README, scripts,
    Trainer output). A symlink is followed: the folder it points to is judged and replaced, the link stays.

    Raises:
        ValueError: the model was sized for another identifier vocabulary than the tokenizer's; `folder` is a file,
            a folder of other files, the current directory (or holds it), the home folder or the root; or the saved
            checkpoint did not check out. `folder` is then untouched.
    """
    folder = Path(folder)
    check_save_target(folder)
    _check_pair(model, tokenizer)
    with replacing_folder(folder, keep=lambda name: not CHECKPOINT_DATA_FILES.match(name)) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if card is not None:
            card.save(staging / "README.md")
        check_checkpoint_files(staging)
    return folder


def push_retriever_to_hub(
    model,
    tokenizer,
    repo_id: str,
    card: ModelCard | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload GCMR retriever (model, tokenizer, code and model card)",
    revision: str | None = None,
) -> CommitInfo:
    """Push model, tokenizer, their code files and the card (as README.md) to `repo_id` in a single commit.

    Same files as `model.push_to_hub(repo_id)` + `tokenizer.push_to_hub(repo_id)` + uploading the card, but one
    commit, so the repo never holds a model whose tokenizer or card belongs to another version. Creates the repo if
    needed. Returns the commit's info (`.oid` is the commit id).
    """
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="gcmr-push-") as tmp:
        # Saved before anything touches the Hub, so a bad pair or a failed save never creates an empty repo.
        folder = save_retriever(model, tokenizer, Path(tmp) / "checkpoint", card)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision
        )


def is_retriever_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a retriever checkpoint, or one half of it: a `config.json` whose `model_type` is
    "gcmr", or a `tokenizer_config.json` whose `tokenizer_class` is "ImageIdTokenizer"."""
    for name, (field, value) in CHECKPOINT_MARKS.items():
        path = Path(folder) / name
        try:
            if path.is_file() and path.stat().st_size <= _MAX_MARK_BYTES:
                content = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(content, dict) and content.get(field) == value:
                    return True
        except (OSError, ValueError):  # unreadable: not a mark
            continue
    return False


def check_save_target(folder: str | os.PathLike) -> None:
    """Raise a ValueError unless `save_retriever` may replace `folder`: a new path, an empty folder (leftovers of
    interrupted saves aside) or a retriever checkpoint (`is_retriever_checkpoint`), judged through a symlink by its
    target, and never the current directory, a folder holding it, the home folder or the root."""
    given = Path(folder)
    folder = Path(os.path.realpath(given))
    shown = f"{given} (-> {folder})" if given.is_symlink() else str(given)
    if os.path.lexists(folder) and not folder.is_dir():
        raise ValueError(f"cannot save a retriever to {shown}: it exists and is not a directory")
    check_replaceable_location(folder, given)
    if not os.path.lexists(folder):
        return
    entries = sorted(name for name in os.listdir(folder) if not is_save_leftover(name))
    if not entries or is_retriever_checkpoint(folder):
        return
    listed = [f"{name}/" if (folder / name).is_dir() else name for name in entries[:_LISTED_ENTRIES]]
    more = f" and {len(entries) - _LISTED_ENTRIES} more" if len(entries) > _LISTED_ENTRIES else ""
    raise ValueError(
        f"refusing to save a retriever to {shown}: it holds {', '.join(listed)}{more} and is not a retriever "
        "checkpoint (no config.json with model_type 'gcmr', no tokenizer_config.json of an ImageIdTokenizer). "
        "Saving replaces the whole folder, so it only replaces a checkpoint, an empty folder or a new path: choose "
        f"one, e.g. {given / 'retriever'}"
    )


def _check_pair(model, tokenizer) -> None:
    """A model only decodes the identifiers it was sized for: refuse to save a mismatched pair."""
    expected = getattr(getattr(model, "config", None), "identifier_signature", None)
    actual = getattr(tokenizer, "identifier_signature", None)
    if expected is not None and actual is not None and expected != actual:
        raise ValueError(
            "the model's config.identifier_signature does not match the tokenizer's identifier_signature "
            f"({expected[:12]}... vs {actual[:12]}...): call model.set_identifier_vocabulary(tokenizer) with this "
            "tokenizer, or save the tokenizer the model was trained with"
        )


def check_checkpoint_files(folder: str | os.PathLike) -> None:
    """Raise a ValueError naming every missing, empty or unreadable file of the checkpoint in `folder`.

    Reads what loading needs, without building the model: every JSON file parses, every safetensors header reads and
    covers its file, the identifier table loads (its hash checks both files), and every code file that an `auto_map`
    names exists, is not empty and compiles.
    """
    folder = Path(folder)
    problems = [f"{name} is missing" for name in REQUIRED_FILES if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        problems.append(f"{' or '.join(WEIGHT_FILES)} is missing")
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        try:
            if path.stat().st_size == 0:
                problems.append(f"{path.name} is empty")
            elif path.suffix == ".json" and path.name != "text_tokenizer.json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".safetensors":
                with safe_open(path, framework="np") as handle:
                    handle.keys()
            elif path.suffix == ".py":
                compile(path.read_text(encoding="utf-8"), str(path), "exec")
        except (OSError, ValueError, SyntaxError, SafetensorError) as error:
            problems.append(f"{path.name} cannot be read ({error})")
    for config_name in ("config.json", "tokenizer_config.json"):
        problems += _missing_code(folder, config_name)
    if (folder / "text_tokenizer.json").is_file():
        try:
            Tokenizer.from_file(str(folder / "text_tokenizer.json"))
        except Exception as error:  # tokenizers raises a bare Exception for a bad file
            problems.append(f"text_tokenizer.json cannot be read ({error})")
    try:
        IdentifierTable.load(str(folder))
    except ValueError as error:
        problems.append(str(error))
    if problems:
        raise ValueError(f"the saved retriever in {folder} is incomplete: " + "; ".join(problems))


def _missing_code(folder: Path, config_name: str) -> list[str]:
    """What is wrong with the `auto_map` in `config_name`: an entry transformers cannot resolve, one that points at
    another repository's code (a checkpoint carries its own), or a code file it names that is not in `folder`."""
    try:
        auto_map = json.loads((folder / config_name).read_text(encoding="utf-8")).get("auto_map", {})
    except (OSError, ValueError, AttributeError):
        return []  # reported above
    problem = auto_map_problem(auto_map, config_name)
    if problem:
        return [problem]
    references = [value for values in auto_map.values() for value in (values if isinstance(values, list) else [values])]
    elsewhere = [reference for reference in references if isinstance(reference, str) and "--" in reference]
    if elsewhere:
        return [f"the auto_map of {config_name} points at code in another repository ({elsewhere[0]!r}): a retriever "
                "checkpoint carries its own code files, named '<module file>.<class>'"]
    modules = {reference.split(".")[0] for reference in references if isinstance(reference, str)}
    return [f"{module}.py (in the auto_map of {config_name}) is missing" for module in sorted(modules)
            if not (folder / f"{module}.py").is_file()]
