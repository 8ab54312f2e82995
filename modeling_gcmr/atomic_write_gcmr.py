"""Checkpoint files of the modeling side: atomic writes, staged saves, an atomic folder swap, and clear load errors.

A Hub file (`modeling_gcmr.py` imports it, so it travels in every checkpoint): it imports only the standard library,
safetensors and its sibling `config_sizes_gcmr`. The tokenization side keeps its own, smaller copy of the write
helpers in `tokenization_gcmr/identifier_table.py`, because the two packages of a checkpoint never share a file.

- `atomic_write` / `atomic_save_to`: one file under a temporary name, renamed into place (results, plots, corpora,
  embeddings): a reader never sees half a file.
- `save_staged`: transformers' `save_pretrained` writes in place and copies the code files with a plain copy, so a
  kill leaves 0-byte or truncated files. Staged, every file is complete before `os.replace` moves it in.
- `replacing_folder`: a whole folder (a retriever checkpoint) is built next to its target and swapped in with
  renameat2(RENAME_EXCHANGE), so the target holds the complete old or the complete new folder at every instant.
  Where the exchange is missing, the old folder is renamed aside first; `recover_interrupted_save` puts it back if
  the process dies before the new one is renamed in. The entries of the old folder that the caller's `keep` names
  (the user's own files) are hard-linked into the new one before the swap, so the swap never loses them; the
  current directory, a folder holding it, the home folder and the root are never replaced.
- Staging, backup and trash folders are named `.<target>.gcmr-<kind>-<pid>-<8 hex>` (inside a folder:
  `.gcmr-staging-<pid>-<8 hex>`): the next save removes exactly those whose process is gone, nothing else.
- Every file gets the mode the umask gives a new file (`tempfile` makes 0600 files and 0700 folders).
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import sys
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from safetensors import SafetensorError, safe_open

from .config_sizes_gcmr import check_against_weights

MIXED_SAVES_HINT = (
    "If both were loaded from one folder, it holds a model and a tokenizer from different saves (a save interrupted "
    "between model.save_pretrained and tokenizer.save_pretrained?): save them again together with "
    "modeling_gcmr.save_retriever(model, tokenizer, folder), which replaces a checkpoint atomically."
)
_LEFTOVER = re.compile(r"^\.(?:(?P<target>.+)\.)?gcmr-(?P<kind>staging|old|trash)-(?P<pid>[0-9]+)-[0-9a-f]{8}$")
_SHARD = re.compile(r"^(?P<stem>.+)-\d{5}-of-\d{5}\.safetensors$")


# Out of space (ENOSPC), past a file-size limit (EFBIG) or over a quota (EDQUOT); safetensors reports them as text.
_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_DISK_FULL_TEXT = re.compile(r"os error (?:%s)\b" % "|".join(str(code) for code in _DISK_FULL))


class DiskFullError(OSError):
    """A save ran out of disk space (or past a file-size limit or quota); the target folder is unchanged."""

    def __init__(self, code: int, folder: Path, detail: str) -> None:
        super().__init__(code, f"{os.strerror(code)} while saving to {folder} ({detail}); nothing of this save was "
                         f"kept and {folder} is as it was before: free some space and save again")
        self.detail = detail


@contextmanager
def _naming_a_full_disk(folder: Path) -> Iterator[None]:
    """Re-raise a write that failed for lack of space as a DiskFullError naming `folder` (the outermost one)."""
    try:
        yield
    except (OSError, SafetensorError) as error:
        code = getattr(error, "errno", None)
        found = _DISK_FULL_TEXT.search(str(error))
        if code not in _DISK_FULL and not found:
            raise
        code = code if code in _DISK_FULL else int(found.group(0).split()[-1])
        detail = error.detail if isinstance(error, DiskFullError) else f"{type(error).__name__}: {error}"
        raise DiskFullError(code, folder, detail) from error


# -------------------------------------------------------------------------------------------------- permissions
def _umask() -> int:
    # /proc first: os.umask(x) to read it would briefly change it for every other thread.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_shareable(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file (0666) or folder (0777) created by `tempfile` the usual permissions under the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _seal(folder: Path) -> None:
    """Umask permissions on `folder` and everything in it, and every file flushed to disk before it is renamed."""
    for root, folders, files in os.walk(folder):
        make_shareable(root, directory=True)
        for name in folders:
            make_shareable(os.path.join(root, name), directory=True)
        for name in files:
            path = os.path.join(root, name)
            make_shareable(path)
            _fsync(path)
    _fsync(folder)


def _fsync(path: str | os.PathLike) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder; its entries are then flushed by the file system
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# ------------------------------------------------------------------------------------------------- single files
def atomic_save_to(path: str | os.PathLike, save: Callable[[str], Any]) -> Path:
    """Call `save(temporary_path)` next to `path`, then rename the finished file into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(descriptor)
    try:
        save(temporary)
        make_shareable(temporary)
        _fsync(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


def atomic_write(path: str | os.PathLike, write: Callable, mode: str = "w") -> Path:
    """Call `write(handle)` on a temporary file next to `path`, then rename it into place."""

    def save(temporary: str) -> None:
        with open(temporary, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            write(handle)

    return atomic_save_to(path, save)


# ------------------------------------------------------------------------------- leftovers of interrupted saves
def _leftover_path(folder: Path, kind: str, inside: bool = False) -> Path:
    tag = f"gcmr-{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return folder / f".{tag}" if inside else folder.parent / f".{folder.name}.{tag}"


def _is_running(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another save of this process (a thread): not ours to remove
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_save_leftover(name: str) -> bool:
    """Whether `name` is a staging, backup or trash folder of a save (of any process, finished or not)."""
    return _LEFTOVER.match(name) is not None


def _leftovers(folder: Path, kinds: tuple[str, ...]) -> list[Path]:
    """Our staging/backup/trash folders of saves into `folder` (beside it, and inside it) whose process is gone."""
    found = []
    for place, target in ((folder.parent, folder.name), (folder, None)):
        try:
            names = os.listdir(place)
        except OSError:
            continue
        for name in names:
            match = _LEFTOVER.match(name)
            if match and match["target"] == target and match["kind"] in kinds and not _is_running(int(match["pid"])):
                found.append(place / name)
    return found


def recover_interrupted_save(folder: str | os.PathLike) -> bool:
    """Put back the previous checkpoint when a save was killed between moving `folder` aside and moving the new one in.

    Only happens where renameat2 is missing (the swap then takes two renames). Returns whether a folder was restored.
    """
    folder = Path(folder)
    if os.path.lexists(folder) or not folder.parent.is_dir():
        return False
    backups = _leftovers(folder, ("old",))
    if not backups:
        return False
    try:
        os.rename(max(backups, key=lambda path: path.stat().st_ctime), folder)
    except OSError:  # another process restored or saved it first
        return False
    return True


def clean_up_interrupted_saves(folder: str | os.PathLike) -> None:
    """Restore an interrupted swap, then remove the staging, backup and trash folders of saves that were killed."""
    folder = Path(folder)
    recover_interrupted_save(folder)
    for path in _leftovers(folder, ("staging", "old", "trash")):
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- folder swap
def _load_exchange() -> Callable[[bytes, bytes], int] | None:
    """renameat2(RENAME_EXCHANGE) on Linux, renamex_np(RENAME_SWAP) on macOS: swap two paths in one step."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        function = libc.renameat2
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        at_fdcwd, rename_exchange = -100, 2
        return lambda first, second: function(at_fdcwd, first, at_fdcwd, second, rename_exchange)
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        function = libc.renamex_np
        function.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        rename_swap = 2
        return lambda first, second: function(first, second, rename_swap)
    return None


_swap_paths = _load_exchange()


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths atomically; False where the system or the file system cannot."""
    if _swap_paths is None:
        return False
    if _swap_paths(os.fsencode(first), os.fsencode(second)) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), os.fspath(second))


def swap_into_place(staging: Path, folder: Path, keep: Callable[[str], bool] | None = None) -> None:
    """Make the finished `staging` folder the new `folder`; an existing `folder` is replaced as a whole.

    At every instant `folder` is the complete old or the complete new one (with the two-rename fallback, a killed
    save leaves only the old one, aside, for `recover_interrupted_save`). The old folder's own mode is kept, and so
    is each of its entries whose name `keep` accepts and `staging` lacks (hard-linked across, else copied).
    """
    _seal(staging)
    if not os.path.lexists(folder):
        os.rename(staging, folder)
    else:
        os.chmod(staging, folder.stat().st_mode & 0o7777)
        if keep is not None:
            _carry_over(folder, staging, keep)
        if _exchange(staging, folder):
            shutil.rmtree(staging, ignore_errors=True)  # it holds the old folder now
        else:
            backup = _leftover_path(folder, "old")
            os.rename(folder, backup)
            try:
                os.rename(staging, folder)
            except BaseException:
                os.rename(backup, folder)
                raise
            trash = _leftover_path(folder, "trash")  # a half-removed backup must never be restored
            os.rename(backup, trash)
            shutil.rmtree(trash, ignore_errors=True)
    _fsync(folder.parent)


def _carry_over(folder: Path, staging: Path, keep: Callable[[str], bool]) -> None:
    """Put the old folder's kept entries into `staging` as they are (after `_seal`: their modes stay the user's).

    Hard links share the files instead of copying them (a `.git` or a Trainer's checkpoints cost nothing); where
    the file system refuses a link, the file is copied. Symlinks are copied as symlinks.
    """
    for name in sorted(os.listdir(folder)):
        source, target = folder / name, staging / name
        if is_save_leftover(name) or os.path.lexists(target) or not keep(name):
            continue
        if source.is_dir() and not source.is_symlink():
            shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(source, target, follow_symlinks=False)
    _fsync(staging)


def _link_or_copy(source: str | os.PathLike, target: str | os.PathLike, *, follow_symlinks: bool = True) -> None:
    if os.path.islink(source):
        os.symlink(os.readlink(source), target)
        return
    try:
        os.link(source, target, follow_symlinks=follow_symlinks)
    except OSError:  # no hard links on this file system, or a file of another user (protected_hardlinks)
        shutil.copy2(source, target, follow_symlinks=follow_symlinks)


def check_replaceable_location(folder: Path, shown: str | os.PathLike | None = None) -> None:
    """Refuse to replace `folder` (a resolved path) when it is or holds the current directory, the home folder or
    the root: a swap would move the process's (or the user's) working tree away. `shown` is the path as given."""
    described = f"{shown} (-> {folder})" if shown is not None and os.fspath(shown) != str(folder) else str(folder)
    try:
        working = Path(os.getcwd()).resolve()
    except OSError:  # the current directory was removed: nothing to protect
        working = None
    if working is not None and (folder == working or working.is_relative_to(folder)):
        what = "the current directory" if folder == working else f"a folder holding the current directory {working}"
        raise ValueError(f"refusing to replace {described}: it is {what}, and saving replaces the whole folder; "
                         "save into a new subfolder instead, e.g. 'my_retriever'")
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError):  # no home folder known
        home = None
    what = ("the file system root" if folder.parent == folder else "your home folder" if folder == home
            else "a folder holding your home folder" if home is not None and home.is_relative_to(folder) else None)
    if what is not None:
        raise ValueError(f"refusing to replace {described}: it is {what}, and saving replaces the whole folder; "
                         "save into a new subfolder instead, e.g. 'my_retriever'")


@contextmanager
def replacing_folder(folder: str | os.PathLike, keep: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield an empty staging folder next to `folder`; when the block ends without an error it becomes `folder`.

    A kill at any moment leaves the old `folder` or the new one, never a mix; the next call removes what a killed
    one left behind. The old folder's entries that `keep(name)` accepts and the new one lacks are kept. A symlink
    is followed: the folder it points to is replaced, the link stays. The current directory, a folder holding it,
    the home folder and the root are refused (`check_replaceable_location`).
    """
    given = folder
    folder = Path(os.path.realpath(folder))  # through a symlink: the swap replaces the folder it points to
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"cannot save to {folder}: it exists and is not a directory")
    check_replaceable_location(folder, given)
    folder.parent.mkdir(parents=True, exist_ok=True)
    clean_up_interrupted_saves(folder)
    staging = _leftover_path(folder, "staging")
    staging.mkdir()
    try:
        with _naming_a_full_disk(folder):
            yield staging
            swap_into_place(staging, folder, keep)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ------------------------------------------------------------------------------------------- staged save_pretrained
def _move_order(name: str) -> tuple[int, str]:
    # Code first, weights next, the configs last: a kill within the microseconds of the moves then leaves new weights
    # with the old config, which the load reports when their sizes differ.
    if name.endswith(".py"):
        return 0, name
    if name.endswith(".safetensors"):
        return 1, name
    return (3 if name.endswith("config.json") else 2), name


def save_staged(save: Callable[..., Any], save_directory: str | os.PathLike, *args: Any,
                push: Callable[..., Any] | None = None, **kwargs: Any) -> Any:
    """Run `save(staging, *args, **kwargs)` (a `save_pretrained`) in a staging folder, then move each file in.

    No file of `save_directory` is ever 0 bytes or truncated: each is complete before `os.replace` moves it in.
    Shards of an earlier save that the new one does not have are removed, as transformers does. With
    `push_to_hub=True` the folder is then pushed with `push(repo_id, ...)`.
    """
    directory = Path(save_directory)
    if directory.is_file():
        raise NotADirectoryError(f"{directory} is a file; save_pretrained needs a folder")
    push_to_hub = kwargs.pop("push_to_hub", False)
    hub_options = {name: kwargs.pop(name) for name in ("repo_id", "commit_message", "private", "create_pr")
                   if name in kwargs}
    clean_up_interrupted_saves(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = _leftover_path(directory, "staging", inside=True)
    staging.mkdir()
    try:
        with _naming_a_full_disk(directory):
            result = save(staging, *args, **kwargs)
            _seal(staging)
        names = sorted(os.listdir(staging), key=_move_order)
        for name in names:
            os.replace(staging / name, directory / name)
        for name in os.listdir(directory):
            shard = _SHARD.match(name)
            if shard and name not in names and any(
                new.startswith(shard["stem"]) and new.endswith(".safetensors") for new in names
            ):
                os.remove(directory / name)
        _fsync(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if push_to_hub and push is not None:
        repo_id = hub_options.pop("repo_id", directory.absolute().name)
        push(repo_id, token=kwargs.get("token"), **hub_options)
    return result


# ---------------------------------------------------------------------------------------------------- loading
def load_checked(
    load: Callable[..., Any], model_class: type, path: str | os.PathLike, *args: Any, **kwargs: Any
) -> Any:
    """`from_pretrained` with the package's own errors for a missing, damaged or mixed-up checkpoint folder."""
    local = isinstance(path, (str, os.PathLike))
    if local and not os.path.exists(path):
        recover_interrupted_save(path)
    folder = None
    if local and os.path.isdir(path):
        folder = os.path.join(path, kwargs["subfolder"]) if kwargs.get("subfolder") else os.fspath(path)
    if folder is not None and kwargs.get("config") is None and not os.path.isfile(os.path.join(folder, "config.json")):
        raise OSError(
            f"config.json is missing from {folder}: without it transformers would build a default model and load the "
            "weights into the wrong shapes. The checkpoint was not saved completely: save it again, with "
            "save_retriever(model, tokenizer, folder) for model and tokenizer together"
        )
    if folder is not None and not kwargs.get("ignore_mismatched_sizes"):
        # Before anything is built: the config's sizes against the weights file's shapes (config_sizes_gcmr.py).
        check_against_weights(model_class, folder, kwargs.get("config"))
    try:
        return load(path, *args, **kwargs)
    except SafetensorError as error:
        raise OSError(
            f"cannot read the weights of {path}: {_damaged_safetensors(folder) or 'a .safetensors file'} is "
            f"truncated or corrupt ({error}); save or download the checkpoint again"
        ) from error


def _damaged_safetensors(folder: str | None) -> str:
    """The unreadable .safetensors files of a local folder, comma separated ('' if none or not a folder)."""
    if folder is None or not os.path.isdir(folder):
        return ""
    damaged = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(folder, name), framework="pt") as handle:
                    handle.keys()
            except SafetensorError:
                damaged.append(os.path.join(folder, name))
    return ", ".join(damaged)


__all__ = [
    "MIXED_SAVES_HINT",
    "atomic_save_to",
    "atomic_write",
    "check_replaceable_location",
    "clean_up_interrupted_saves",
    "is_save_leftover",
    "load_checked",
    "make_shareable",
    "recover_interrupted_save",
    "replacing_folder",
    "save_staged",
    "swap_into_place",
]
