"""Save a retriever (model + tokenizer + model card) as one checkpoint folder, and push it to the Hub in one commit.

`save_pretrained` of the model and of the tokenizer copy the Hub code files (configuration, modeling, tokenization
and their siblings) next to the weights, so the folder loads with `trust_remote_code=True` where this package is not
installed. The card is written as README.md explicitly: the Hub's own `push_to_hub` would otherwise write its
template README.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi, ModelCard

REQUIRED_FILES = ("config.json", "tokenizer_config.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def save_retriever(model, tokenizer, folder: str | os.PathLike, card: ModelCard | None = None) -> Path:
    """Write `model`, `tokenizer` and `card` (as README.md) into `folder`, atomically.

    Everything is written into a temporary sibling folder first and moved into place only once complete, so a crash
    never leaves a half-written checkpoint at `folder`. An existing `folder` is replaced as a whole.

    Raises:
        ValueError: the model was sized for another identifier vocabulary than the tokenizer's, or `folder` is a file.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cannot save a retriever to {folder}: it exists and is not a directory")
    _check_pair(model, tokenizer)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    staging = folder.parent / f".{folder.name}.tmp-{tag}"
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if card is not None:
            card.save(staging / "README.md")
        _check_complete(staging)
        _swap_into_place(staging, folder, folder.parent / f".{folder.name}.old-{tag}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
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


def _check_complete(folder: Path) -> None:
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise ValueError(f"the saved retriever in {folder} is incomplete, missing: {', '.join(missing)}")


def _swap_into_place(staging: Path, folder: Path, backup: Path) -> None:
    """Rename `staging` to `folder`; an existing `folder` is moved aside first and removed after the swap."""
    had_old = folder.exists()
    if had_old:
        os.replace(folder, backup)
    try:
        os.replace(staging, folder)
    except OSError:
        if had_old:
            os.replace(backup, folder)
        raise
    if had_old:
        shutil.rmtree(backup, ignore_errors=True)
