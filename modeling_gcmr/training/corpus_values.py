"""Checks of one corpus cell: an image reference, an embedding, captions, a key. Each gives a reason or None.

load_corpus (data.py) runs them on every row and reports every reason at once. A reason names the column and,
for a list, the entry; the row, file and line are added by the caller.
"""
from __future__ import annotations

import collections
import io
import json
import math
import numbers
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def image_ref(
    value: Any, column: str, image_dir: Path | None, confine_to: Path | None
) -> tuple[dict | None, str | None]:
    """The cell's image as an undecoded `datasets.Image` value `{"bytes", "path"}` (None: no image), and what is
    wrong with it before the file is opened. Relative paths are taken from `image_dir`; with `confine_to`, a path
    that resolves (symlinks followed) outside that folder is refused."""
    if isinstance(value, dict) and set(value) <= {"bytes", "path"} and not value.get("bytes"):
        value = value.get("path")
    if value is None or value == "":
        return None, None
    if isinstance(value, (str, os.PathLike)):
        return _path_ref(os.fspath(value), column, image_dir, confine_to)
    if isinstance(value, dict) and set(value) <= {"bytes", "path"} and isinstance(value["bytes"], (bytes, bytearray)):
        return {"bytes": bytes(value["bytes"]), "path": value.get("path")}, None
    if image_dir is None:
        if isinstance(value, (Image.Image, np.ndarray)):
            return datasets.Image().encode_example(value), None
        expected = "a path, a PIL image or a {'bytes', 'path'} dict"
    else:
        expected = "an image file path"
    return None, f"column {column!r} must hold {expected}, got {_shown(value)}"


def _path_ref(
    text: str, column: str, image_dir: Path | None, confine_to: Path | None
) -> tuple[dict | None, str | None]:
    if "://" in text:
        return None, f"column {column!r}: {text!r} is a URL; only local image files are read (download it first)"
    path = Path(text).expanduser()
    if not path.is_absolute() and image_dir is not None:
        path = image_dir / path
    ref = {"bytes": None, "path": str(path)}
    if confine_to is None:
        return ref, None
    resolved, inside = resolve_within(path, confine_to)
    if resolved is None:
        return ref, f"column {column!r}: image path {text!r} is a symlink loop"
    if not inside:
        return ref, (
            f"column {column!r}: image path {text!r} is outside the corpus folder {str(confine_to)!r} (it resolves "
            f"to {str(resolved)!r}); pass allow_paths_outside_corpus=True (--allow_paths_outside_corpus) if you "
            "trust this corpus"
        )
    return ref, None


def resolve_within(path: Path, folder: Path) -> tuple[Path | None, bool]:
    """(`path` resolved, symlinks followed; whether that is inside `folder`, a resolved path). (None, False) for a
    symlink loop. The one confinement of image paths: the corpus loader and the search page (examples/app.py)."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # Python < 3.13 raises RuntimeError on a symlink loop
        return None, False
    return resolved, resolved.is_relative_to(folder)


def image_problem(ref: dict | None, verify: bool) -> str | None:
    """What is wrong with the image file (or bytes) of `ref`; with `verify`, every pixel is decoded."""
    if ref is None:
        return "no image"
    path = ref.get("path")
    if not ref.get("bytes"):
        if os.path.isdir(path):
            return "image path is a directory, not an image file"
        if not os.path.exists(path):
            return "broken symlink or symlink loop" if os.path.islink(path) else "missing image file"
        if not os.path.isfile(path):
            return "image path is not a regular file (a FIFO or a device?)"
    if not verify:
        return None
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # An image over the limit is a bad row (below): PIL's own warning about it would only repeat that.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(ref["bytes"]) if ref.get("bytes") else path) as image:
                pixels = max(1, image.width) * max(1, image.height)
                if limit is not None and pixels > limit:
                    return _too_many_pixels(pixels, limit)
                image.load()  # decodes every pixel: open() alone only reads the header and misses truncation
    except Image.DecompressionBombError as error:  # PIL refuses to open images over twice the limit
        found = re.search(r"\((\d+) pixels\)", str(error))
        return _too_many_pixels(int(found.group(1)) if found else None, limit)
    except (OSError, SyntaxError, ValueError) as error:
        return f"unreadable or truncated image ({type(error).__name__}: {error})"
    return None


def _too_many_pixels(pixels: int | None, limit: int) -> str:
    size = f"{pixels} pixels" if pixels is not None else "more pixels than twice the limit"
    return (
        f"image has {size}, over PIL's decompression-bomb limit of {limit} pixels (PIL.Image.MAX_IMAGE_PIXELS); "
        f"if you trust this file, raise the limit before loading: "
        f"PIL.Image.MAX_IMAGE_PIXELS = {pixels or 2 * limit + 1}"
    )


def embedding_vector(value: Any, column: str) -> tuple[list | None, str | None]:
    """The row's embedding as a list of numbers that fit float32, or why it is not one."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)  # a CSV cell can only hold a list as JSON text
        except json.JSONDecodeError as error:
            return None, f"column {column!r}: {_short(repr(value))} is not a valid JSON list of numbers ({error.msg})"
    elif value is not None and not isinstance(value, (list, tuple, str)) and hasattr(value, "tolist"):
        value = value.tolist()  # numpy arrays, torch tensors
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return None, "missing image embedding"
    if not isinstance(value, (list, tuple)):
        return None, f"column {column!r} must hold a list of numbers, got {_shown(value)}"
    for index, entry in enumerate(value):
        if type(entry) is not float and (isinstance(entry, bool) or not isinstance(entry, numbers.Real)):
            return None, f"column {column!r}: entry {index} is {_shown(entry)}, expected a number"
        if entry != entry:
            return None, f"column {column!r}: entry {index} is NaN"
        if not -_FLOAT32_MAX <= entry <= _FLOAT32_MAX:
            shown = _short(repr(entry))
            if entry in (math.inf, -math.inf):
                return None, f"column {column!r}: entry {index} is {shown}"
            return None, (
                f"column {column!r}: entry {index} is {shown}, which does not fit float32 (largest {_FLOAT32_MAX:.7g})"
            )
    return list(value), None


def embedding_width_problems(vectors: list[list | None], expected_dim: int | None) -> dict[int, str]:
    """{row: reason} for vectors of another width than `expected_dim` (None: the most common width)."""
    if expected_dim is None:
        counts = collections.Counter(len(v) for v in vectors if v is not None)
        expected_dim = counts.most_common(1)[0][0] if counts else None
    return {
        row: f"image embedding has width {len(vector)}, expected {expected_dim}"
        for row, vector in enumerate(vectors)
        if vector is not None and len(vector) != expected_dim
    }


def parse_captions(value: Any, column: str) -> tuple[list[str], str | None]:
    """The cell's captions, stripped: a string is one caption, a list (or JSON list text) several."""
    if isinstance(value, str) and value.strip().startswith("[") and value.strip().endswith("]"):
        try:
            value = json.loads(value)  # a CSV cell can only hold a caption list as JSON text
        except json.JSONDecodeError as error:
            return [], (
                f"column {column!r}: {_short(repr(value))} looks like a list but is not valid JSON ({error.msg}); "
                'write a list as ["one", "two"], and a single caption in square brackets as ["[caption]"]'
            )
    if value is None:
        return [], "missing caption"
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return [], f"column {column!r} must hold a string or a list of strings, got {_shown(value)}"
    if not value:
        return [], "missing caption (empty list)"
    for index, caption in enumerate(value):
        if not isinstance(caption, str):
            return [], f"column {column!r}: caption {index} is {_shown(caption)}, expected a string"
    captions = [c.strip() for c in value]
    empty = [i for i, c in enumerate(captions) if not c]
    if empty:
        return captions, f"empty caption (caption index {', '.join(map(str, empty))})"
    return captions, None


def check_keys(
    values: Sequence, column: str, unreadable: Mapping[int, str]
) -> tuple[list[str | None], dict[int, str]]:
    """(each row's key as a string, or None; {row: reason}) for non-empty unique string or integer keys."""
    keys: list[str | None] = []
    problems: dict[int, str] = {}
    first_row: dict[str, int] = {}
    for row, value in enumerate(values):
        keys.append(None)
        if row in unreadable:
            continue
        if value is None or (isinstance(value, str) and not value.strip()):
            problems[row] = f"missing or empty image key ({value!r})"
            continue
        if isinstance(value, bool) or not isinstance(value, (str, numbers.Integral)):
            problems[row] = f"column {column!r} must hold a string or an integer, got {_shown(value)}"
            continue
        key = keys[row] = str(value).strip()
        if key in first_row:
            problems[row] = f"duplicate image key {key!r} (first at row {first_row[key]})"
        else:
            first_row[key] = row
    return keys, problems


def _shown(value: Any) -> str:
    return f"{_short(repr(value))} ({type(value).__name__})"


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
