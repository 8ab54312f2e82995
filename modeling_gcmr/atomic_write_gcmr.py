"""Atomic writes for the toolkit's own files (results, plots, corpora): temp name in the target folder, then rename.

`tempfile` creates files 0600 and folders 0700; they get the permissions the process's umask gives any
new file, so results and corpora written here can be shared like the rest.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_shareable(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file (0666) or folder (0777) created by `tempfile` the usual permissions under the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write(path: str | os.PathLike, write: Callable, mode: str = "w") -> Path:
    """Call `write(handle)` on a temporary file next to `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            write(handle)
        make_shareable(temp)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    return path
