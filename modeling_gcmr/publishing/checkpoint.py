"""Save a retriever (model + tokenizer + model card) as one checkpoint folder, and push it to the Hub in one commit.

`save_pretrained` of the model and of the tokenizer copy the Hub code files (configuration, modeling, tokenization
and their siblings) next to the weights, so the folder loads with `trust_remote_code=True` where this package is not
installed. The card is written as README.md explicitly: the Hub's own `push_to_hub` would otherwise write its
template README. The folder is built next to its target, checked, and swapped in atomically
(`atomic_write_gcmr.replacing_folder`): a kill at any moment leaves the old checkpoint or the new one.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi, ModelCard
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer

from tokenization_gcmr.identifier_table import IdentifierTable

from ..atomic_write_gcmr import replacing_folder
from ..configuration_gcmr import auto_map_problem

REQUIRED_FILES = ("config.json", "tokenizer_config.json", "text_tokenizer.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def save_retriever(model, tokenizer, folder: str | os.PathLike, card: ModelCard | None = None) -> Path:
    """Write `model`, `tokenizer`, their code and `card` (as README.md) into `folder`, as one atomic step.

    Everything is written into a staging folder next to `folder`, checked (every file present and readable, the code
    non-empty), then swapped in with one atomic exchange: a crash or a kill at any moment leaves `folder` holding the
    complete old checkpoint or the complete new one, never a mix, and the next save removes what a killed one left.
    An existing `folder` is replaced as a whole.

    Raises:
        ValueError: the model was sized for another identifier vocabulary than the tokenizer's, `folder` is a file,
            or the saved checkpoint did not check out (then `folder` is untouched).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cannot save a retriever to {folder}: it exists and is not a directory")
    _check_pair(model, tokenizer)
    with replacing_folder(folder) as staging:
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
