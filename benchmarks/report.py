"""Shared by the benchmark scripts: what machine ran them, and writing their own section of a docs page."""
from __future__ import annotations

import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    """The device, the software versions and how loaded the machine was when this was called."""
    cpu = platform.processor() or platform.machine()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"{device}, {cpu}, {platform.system()} {platform.release()}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}; load average {load}")


def _head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# Read when a benchmark starts (it imports this module first), so that a commit landing while it runs does not
# change the revision its results name.
_STARTED_AT = _head()


def git_revision() -> str:
    """The commit checked out when this process started."""
    return _STARTED_AT


def write_section(path: Path, name: str, section: str, header: str) -> None:
    """Insert or replace the section `name` of a docs page (other sections are kept); atomic, world-readable."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text(encoding="utf-8") if path.exists() else header
    block = f"{start}\n{section}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(temp, 0o644)  # mkstemp makes 0600; a docs page is world-readable like any checked-in file
    os.replace(temp, path)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
