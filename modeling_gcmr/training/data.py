"""Load an image-caption corpus into one normalised `datasets.Dataset`, validating every row up front.

API (stable; the training code and the examples build on it):

    load_corpus(source, *, split=None, image_column="image", caption_column=None, key_column="image_key",
                embeds_column="image_embeds", image_embed_dim=None, skip_bad_rows=False,
                verify_images=True) -> datasets.Dataset
    split_captions(corpus, num_query_captions=1) -> CaptionSplit(train, queries, gold)
    CorpusValidationError(ValueError) with `.problems: list[BadRow]`; BadRow(row, key, path, reason)

`source` is one of
  * a folder: an `imagefolder` with `metadata.jsonl` (the Hub convention: a `file_name` column next to
    the images; sub-folders such as `train/` and `test/` become splits);
  * a `.jsonl`/`.json`/`.csv` file whose image column (`image`, or `file_name`) holds paths relative
    to the file; in a CSV, a `captions` cell may hold a JSON list of strings;
  * an in-memory `datasets.Dataset`/`DatasetDict` or a list of dicts (images as PIL images, `datasets`
    Image values, or paths);
  * a Hub dataset name (only when not offline: with `HF_HUB_OFFLINE=1` that is a clear error).

The returned dataset has exactly these columns:
  * `image_key` (str, unique). Taken from `key_column` when present (a repeated key is a bad row).
    Otherwise derived from the image file: its stem when that stem is unique in the corpus, else its path
    relative to the corpus folder without the suffix (`train/cat`), else with it (`train/cat.png`).
    Images without a file name (in-memory bytes) and rows without images get `image_000042` (the row
    number).
  * `captions` (list[str], stripped, at least one), from `captions` (list) or `caption` (str).
  * `image` (`datasets.Image()`: decodes to PIL) and/or `image_embeds` (float32 list, one width).
  * `split` (str), only when the source had several splits and `split=None` merged them, or when the
    source had a `split` column.

Every bad row (missing file, unreadable or truncated image, duplicate key, empty or missing caption,
embedding of the wrong width or with NaN/inf) is reported at once in one `CorpusValidationError`
naming the row (0-based, in the selected split), key, path and reason. With `skip_bad_rows=True` these
rows are dropped instead and a warning says how many and which; never silently.
"""
from __future__ import annotations

import collections
import io
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

_TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv"}
# In error messages, list at most this many bad rows; the exception object still holds all of them.
_MAX_LISTED = 50


@dataclass(frozen=True)
class BadRow:
    """One row that failed validation: its 0-based row number, key, image path and the reason."""

    row: int
    key: str | None
    path: str | None
    reason: str

    def __str__(self) -> str:
        where = f"row {self.row}"
        if self.key is not None:
            where += f" (key {self.key!r}"
            where += f", path {self.path!r})" if self.path else ")"
        elif self.path:
            where += f" (path {self.path!r})"
        return f"{where}: {self.reason}"


class CorpusValidationError(ValueError):
    """Raised by `load_corpus` when rows are bad; `.problems` lists every one of them."""

    def __init__(self, source: str, problems: Sequence[BadRow]):
        self.problems = list(problems)
        listed = "\n".join(f"  {p}" for p in self.problems[:_MAX_LISTED])
        more = len(self.problems) - _MAX_LISTED
        if more > 0:
            listed += f"\n  ... and {more} more"
        super().__init__(
            f"{len(self.problems)} bad row(s) in corpus {source}:\n{listed}\n"
            "Fix them, or pass skip_bad_rows=True (--skip_bad_rows) to drop them."
        )


@dataclass
class CaptionSplit:
    """Captions split for retrieval: `train` keeps the training captions, `queries[i]` is held out for `gold[i]`."""

    train: datasets.Dataset
    queries: list[str]
    gold: list[str]


def load_corpus(
    source: str | os.PathLike | datasets.Dataset | datasets.DatasetDict | list[dict],
    *,
    split: str | None = None,
    image_column: str = "image",
    caption_column: str | None = None,
    key_column: str = "image_key",
    embeds_column: str = "image_embeds",
    image_embed_dim: int | None = None,
    skip_bad_rows: bool = False,
    verify_images: bool = True,
) -> datasets.Dataset:
    """Load and validate an image-caption corpus; see the module docstring for sources and columns.

    Args:
        source: folder, `.jsonl`/`.json`/`.csv` file, in-memory dataset or list of dicts, or a Hub dataset name.
        split: the split to keep. `None` keeps all, adding a `split` column when there are several.
        image_column: column with the images (or image paths). In files, `file_name` is used when it is absent.
        caption_column: `None` picks `captions`, else `caption`.
        key_column: column with explicit image keys; derived from file names when absent.
        embeds_column: column with precomputed image features.
        image_embed_dim: expected feature width; `None` takes the most common width in the corpus.
        skip_bad_rows: drop bad rows with a warning instead of raising `CorpusValidationError`.
        verify_images: decode every image fully with PIL (finds truncated files); `False` only checks existence.
    """
    raw, base_dir, name = _load_raw(source, split)
    if split is not None and "split" in raw.column_names:
        raw = raw.filter(lambda s: s == split, input_columns="split")
    columns = raw.column_names
    if image_column not in columns and base_dir is not None and "file_name" in columns:
        image_column = "file_name"
    has_images, has_embeds = image_column in columns, embeds_column in columns
    if not (has_images or has_embeds):
        raise ValueError(
            f"corpus {name} has neither an image column {image_column!r} nor an embeddings column "
            f"{embeds_column!r}; its columns are {columns}"
        )
    if caption_column is None:
        caption_column = "captions" if "captions" in columns else "caption"
    if caption_column not in columns:
        raise ValueError(
            f"corpus {name} has no caption column ('captions' list or 'caption' string); its columns are {columns}"
        )

    n = len(raw)
    problems: dict[int, list[str]] = collections.defaultdict(list)
    images = _image_refs(raw, image_column, base_dir) if has_images else [None] * n
    paths = [ref["path"] if ref else None for ref in images]
    if has_images:
        for row, ref in enumerate(images):
            reason = _image_problem(ref, verify_images)
            if reason:
                problems[row].append(reason)
    embeds = raw[embeds_column] if has_embeds else None
    if embeds is not None:
        for row, reason in _embedding_problems(embeds, image_embed_dim).items():
            problems[row].append(reason)
    captions = []
    for row, value in enumerate(raw[caption_column]):
        parsed, reason = _parse_captions(value)
        captions.append(parsed)
        if reason:
            problems[row].append(reason)
    # Derived keys can only repeat when one file is listed twice, which is a duplicate row as well.
    keys, key_problems = _check_keys(raw[key_column] if key_column in columns else _derived_keys(paths, base_dir))
    for row, reason in key_problems.items():
        problems[row].append(reason)

    bad = [BadRow(row, keys[row], paths[row], "; ".join(problems[row])) for row in sorted(problems)]
    if bad and not skip_bad_rows:
        raise CorpusValidationError(name, bad)
    if bad:
        listed = "\n".join(f"  {p}" for p in bad[:_MAX_LISTED])
        warnings.warn(f"skipped {len(bad)} of {n} rows of corpus {name} (skip_bad_rows=True):\n{listed}", stacklevel=2)
    good = [row for row in range(n) if row not in problems]
    if not good:
        raise ValueError(f"corpus {name} has no valid rows (all {n} are bad)")

    data: dict[str, list] = {"image_key": [keys[r] for r in good], "captions": [captions[r] for r in good]}
    features = {"image_key": datasets.Value("string"), "captions": datasets.Sequence(datasets.Value("string"))}
    if has_images:
        data["image"] = [images[r] for r in good]
        features["image"] = datasets.Image()
    if embeds is not None:
        data["image_embeds"] = [embeds[r] for r in good]
        features["image_embeds"] = datasets.Sequence(datasets.Value("float32"))
    if "split" in columns:
        data["split"] = [str(s) for s in (raw["split"][r] for r in good)]
        features["split"] = datasets.Value("string")
    return datasets.Dataset.from_dict(data, features=datasets.Features(features))


@dataclass
class CorpusArguments:
    """Where the example scripts take their corpus from (HfArgumentParser fields shared by them)."""

    corpus: str | None = field(
        default=None,
        metadata={"help": "An imagefolder, or a .jsonl/.json/.csv file (see load_corpus). Default: the synthetic corpus."},
    )
    corpus_split: str | None = field(default=None, metadata={"help": "Keep only this split of the corpus."})
    skip_bad_rows: bool = field(default=False, metadata={"help": "Drop invalid corpus rows (with a warning) instead of failing."})
    synthetic_num_images: int = field(default=200, metadata={"help": "Images of the synthetic corpus."})
    synthetic_image_size: int = field(default=32, metadata={"help": "Side of the synthetic images in pixels."})
    synthetic_captions_per_image: int = field(default=3, metadata={"help": "Captions per synthetic image."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the synthetic corpus."})
    num_query_captions: int = field(default=1, metadata={"help": "Captions per image held out as evaluation queries."})

    def load(self) -> datasets.Dataset:
        """The validated corpus: `--corpus` through `load_corpus`, or the built-in synthetic one."""
        if self.corpus is not None:
            return load_corpus(self.corpus, split=self.corpus_split, skip_bad_rows=self.skip_bad_rows)
        from .synthetic import make_synthetic_corpus

        return load_corpus(
            make_synthetic_corpus(
                self.synthetic_num_images,
                image_size=self.synthetic_image_size,
                captions_per_image=self.synthetic_captions_per_image,
                seed=self.synthetic_seed,
            )
        )


def split_captions(corpus: datasets.Dataset, num_query_captions: int = 1) -> CaptionSplit:
    """Hold out the last `num_query_captions` captions of each image as evaluation queries.

    Images with no more captions than that keep all of them for training and give no query, so every image is
    still trained on. The synthetic corpus shuffles its caption templates per image, so "last" is not biased.
    """
    if num_query_captions < 1:
        raise ValueError(f"num_query_captions must be >= 1, got {num_query_captions}")
    queries, gold, train_captions = [], [], []
    for key, caps in zip(corpus["image_key"], corpus["captions"]):
        if len(caps) > num_query_captions:
            train_captions.append(list(caps[:-num_query_captions]))
            queries.extend(caps[-num_query_captions:])
            gold.extend([key] * num_query_captions)
        else:
            train_captions.append(list(caps))
    train = corpus.remove_columns("captions").add_column(
        "captions", train_captions, feature=datasets.Sequence(datasets.Value("string"))
    )
    return CaptionSplit(train=train, queries=queries, gold=gold)


def _load_raw(source: Any, split: str | None) -> tuple[datasets.Dataset, Path | None, str]:
    """Return (one dataset, the folder image paths are relative to, a name for messages)."""
    if isinstance(source, list):
        return datasets.Dataset.from_list(source), None, "<list of dicts>"
    if isinstance(source, datasets.Dataset):
        return source, None, "<in-memory Dataset>"
    if isinstance(source, datasets.DatasetDict):
        return _select_split(source, split, "<in-memory DatasetDict>"), None, "<in-memory DatasetDict>"
    path = Path(source)
    name = repr(str(source))
    if path.is_dir():
        loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
        return _select_split(loaded, split, name), path.resolve(), name
    if path.is_file():
        builder = _TABLE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"corpus file {name} must be .jsonl, .json or .csv, not {path.suffix!r}")
        loaded = datasets.load_dataset(builder, data_files=str(path))
        return _select_split(loaded, split, name), path.resolve().parent, name
    # A Hub id is `name` or `owner/name`; anything else that does not exist is a mistyped local path.
    text = str(source)
    if path.suffix.lower() in _TABLE_BUILDERS or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"corpus {name} does not exist (expected a folder or a .jsonl/.json/.csv file)")
    from huggingface_hub import is_offline_mode

    if is_offline_mode():
        raise ValueError(
            f"corpus {name} is not a local folder or file, and Hub datasets cannot be loaded offline "
            "(HF_HUB_OFFLINE is set); pass a local imagefolder, .jsonl/.csv file or datasets.Dataset"
        )
    loaded = datasets.load_dataset(str(source))
    return _select_split(loaded, split, name), None, name


def _select_split(loaded: datasets.DatasetDict, split: str | None, name: str) -> datasets.Dataset:
    if split is not None:
        if split not in loaded:
            raise ValueError(f"corpus {name} has no split {split!r}; it has {sorted(loaded)}")
        return loaded[split]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    parts = []
    for split_name, part in loaded.items():
        if "split" in part.column_names:
            part = part.remove_columns("split")
        parts.append(part.add_column("split", [split_name] * len(part)))
    return datasets.concatenate_datasets(parts)


def _image_refs(raw: datasets.Dataset, column: str, base_dir: Path | None) -> list[dict | None]:
    """Every row's image as a `{"bytes", "path"}` dict (the undecoded `datasets.Image` form), or None.

    PIL images in a list of dicts arrive here already encoded: `Dataset.from_list` stores them as `datasets.Image`.
    """
    if isinstance(raw.features[column], datasets.Image):
        values = raw.cast_column(column, datasets.Image(decode=False))[column]
    else:
        values = raw[column]
    refs = []
    for value in values:
        if isinstance(value, (str, os.PathLike)):
            path = Path(value).expanduser()
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            value = {"bytes": None, "path": str(path)}
        refs.append(value if value and (value.get("bytes") or value.get("path")) else None)
    return refs


def _image_problem(ref: dict | None, verify: bool) -> str | None:
    if ref is None:
        return "no image"
    if not ref.get("bytes") and not os.path.isfile(ref["path"]):
        return "missing image file"
    if not verify:
        return None
    try:
        with Image.open(io.BytesIO(ref["bytes"]) if ref.get("bytes") else ref["path"]) as image:
            image.load()  # decodes every pixel: open() alone only reads the header and misses truncation
    except (OSError, SyntaxError, ValueError) as error:
        return f"unreadable or truncated image ({type(error).__name__}: {error})"
    return None


def _embedding_problems(embeds: list, expected_dim: int | None) -> dict[int, str]:
    widths = [len(e) if isinstance(e, (list, tuple)) else None for e in embeds]
    if expected_dim is None:
        counts = collections.Counter(w for w in widths if w)
        expected_dim = counts.most_common(1)[0][0] if counts else None
    problems = {}
    for row, (vector, width) in enumerate(zip(embeds, widths)):
        if width is None or width == 0:
            problems[row] = "missing image embedding"
        elif width != expected_dim:
            problems[row] = f"image embedding has width {width}, expected {expected_dim}"
        elif not all(isinstance(x, (int, float)) and math.isfinite(x) for x in vector):
            problems[row] = "image embedding contains NaN, inf or a non-number"
    return problems


def _parse_captions(value: Any) -> tuple[list[str], str | None]:
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)  # a CSV cell can only hold a caption list as JSON text
        except json.JSONDecodeError:
            pass
    if value is None:
        return [], "missing caption"
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        return [], "missing caption" if not value else f"caption must be a string or a list of strings, got {value!r}"
    if not all(isinstance(c, str) for c in value):
        return [], f"captions must be strings, got {value!r}"
    captions = [c.strip() for c in value]
    empty = [i for i, c in enumerate(captions) if not c]
    if empty:
        return captions, f"empty caption (caption index {', '.join(map(str, empty))})"
    return captions, None


def _check_keys(values: list) -> tuple[list[str | None], dict[int, str]]:
    keys: list[str | None] = []
    problems: dict[int, str] = {}
    first_row: dict[str, int] = {}
    for row, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
            keys.append(None)
            problems[row] = f"missing or empty image key ({value!r})"
            continue
        key = str(value).strip()
        keys.append(key)
        if key in first_row:
            problems[row] = f"duplicate image key {key!r} (first at row {first_row[key]})"
        else:
            first_row[key] = row
    return keys, problems


def _derived_keys(paths: list[str | None], base_dir: Path | None) -> list[str]:
    real = [p for p in paths if p]
    if base_dir is None and real:
        base_dir = Path(os.path.commonpath([os.path.dirname(p) for p in real]))
    stems = collections.Counter(Path(p).stem for p in real)
    relative = {p: Path(os.path.relpath(p, base_dir)).as_posix() for p in real}
    no_suffix = collections.Counter(str(Path(r).with_suffix("")) for r in relative.values())
    keys = []
    for row, path in enumerate(paths):
        if not path:
            keys.append(f"image_{row:06d}")
        elif stems[Path(path).stem] == 1:
            keys.append(Path(path).stem)
        elif no_suffix[str(Path(relative[path]).with_suffix(""))] == 1:
            keys.append(str(Path(relative[path]).with_suffix("")))
        else:
            keys.append(relative[path])
    return keys
