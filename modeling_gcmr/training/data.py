"""Load an image-caption corpus into one normalised `datasets.Dataset`, validating every row up front.

API (stable; the training code and the examples build on it):

    load_corpus(source, *, split=None, image_column="image", caption_column=None, key_column="image_key",
                embeds_column="image_embeds", image_embed_dim=None, skip_bad_rows=False,
                verify_images=True, allow_paths_outside_corpus=False) -> datasets.Dataset
    split_captions(corpus, num_query_captions=1) -> CaptionSplit(train, queries, gold)
    CorpusValidationError(ValueError) with `.problems: list[BadRow]`;
    BadRow(row, key, path, reason, location=None)     # location: 'metadata.jsonl line 4' for files

`source` is one of
  * a folder: an `imagefolder` with `metadata.jsonl` (or `.csv`, `.parquet`; the Hub convention: a
    `file_name` column next to the images; sub-folders such as `train/` and `test/` become splits);
  * a `.jsonl`/`.json`/`.csv` file whose image column (`image`, or `file_name`) holds paths relative
    to the file; in a CSV, a `captions` or `image_embeds` cell may hold a JSON list;
  * an in-memory `datasets.Dataset`/`DatasetDict` or a list of dicts (images as PIL images, `datasets`
    Image values, or paths);
  * a Hub dataset name (only when not offline: with `HF_HUB_OFFLINE=1` that is a clear error).
Local files are read by corpus_files.py (UTF-8, line by line) and each cell is checked by corpus_values.py.
Image paths of a corpus file or folder must stay inside its folder, symlinks followed, unless
`allow_paths_outside_corpus=True`; in-memory sources have no folder and their paths are taken as given.

The returned dataset has exactly these columns:
  * `image_key` (str, unique). Taken from `key_column` when present (strings or integers; a repeated key is a
    bad row). Otherwise derived from the image file: its stem when that stem is unique in the corpus, else its
    path relative to the corpus folder without the suffix (`train/cat`), else with it (`train/cat.png`).
    Images without a file name (in-memory bytes) and rows without images get `image_000042` (the row
    number).
  * `captions` (list[str], stripped, at least one), from `captions` or `caption`; either may hold a string
    (one caption) or a list of strings, row by row.
  * `image` (`datasets.Image()`: decodes to PIL) and/or `image_embeds` (float32 list, one width).
  * `split` (str), only when the source had several splits and `split=None` merged them, or when the
    source had a `split` column.

Every bad row (an unreadable line, missing file, path outside the corpus, unreadable or truncated image,
image over PIL's decompression-bomb limit, duplicate or mistyped key, empty, missing or mistyped caption,
embedding of the wrong width, with a non-number, NaN/inf, or a value float32 cannot hold) is reported at once
in one `CorpusValidationError` naming the row (0-based, in the selected split), file and line, key, path and
reason. With `skip_bad_rows=True` these rows are dropped instead and a warning says how many and which; never
silently. A file that cannot be read at all (not UTF-8, not JSON, empty, no metadata) raises `ValueError`
naming it, and the line where that applies.
"""
from __future__ import annotations

import collections
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from .corpus_files import (
    DEFAULT_SPLIT,
    TABLE_SUFFIXES,
    CorpusTable,
    read_corpus_file,
    read_imagefolder,
    table_of_records,
)
from .corpus_values import (
    check_keys,
    embedding_vector,
    embedding_width_problems,
    image_problem,
    image_ref,
    parse_captions,
)

# In error messages, list at most this many bad rows; the exception object still holds all of them.
_MAX_LISTED = 50


@dataclass(frozen=True)
class BadRow:
    """One row that failed validation: its 0-based row number, key, image path, the reason, and (for files) where
    it was read, such as 'metadata.jsonl line 4'."""

    row: int
    key: str | None
    path: str | None
    reason: str
    location: str | None = None

    def __str__(self) -> str:
        details = [self.location] if self.location else []
        if self.key is not None:
            details.append(f"key {self.key!r}")
        if self.path:
            details.append(f"path {self.path!r}")
        where = f"row {self.row}" + (f" ({', '.join(details)})" if details else "")
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
    allow_paths_outside_corpus: bool = False,
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
        verify_images: decode every image fully with PIL (finds truncated files and images over PIL's
            decompression-bomb limit); `False` only checks that the files exist.
        allow_paths_outside_corpus: read image paths of a corpus file or folder that lead outside its folder
            (`..`, absolute paths, `~`, symlinks pointing out). By default such a row is bad.
    """
    positive = isinstance(image_embed_dim, int) and not isinstance(image_embed_dim, bool) and image_embed_dim > 0
    if image_embed_dim is not None and not positive:
        raise ValueError(f"image_embed_dim must be a positive integer, got {image_embed_dim!r}")
    raw, name = _load_raw(source, split)
    if not len(raw):
        raise ValueError(f"corpus {name} holds no rows")
    if len(raw.problems) == len(raw):  # not one row could be read: there are no columns to check
        unreadable_rows = [BadRow(r, None, None, why, raw.location(r)) for r, why in raw.problems.items()]
        raise CorpusValidationError(name, unreadable_rows)
    columns = list(raw.columns)
    if image_column not in columns and raw.root is not None and "file_name" in columns:
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
    confine_to = None if allow_paths_outside_corpus else raw.root
    rows = _checked_rows(raw, image_column if has_images else None, embeds_column if has_embeds else None,
                         caption_column, key_column, image_embed_dim, verify_images, confine_to)
    images, paths, vectors, captions, keys, problems = rows
    bad = [BadRow(r, keys[r], paths[r], "; ".join(problems[r]), raw.location(r)) for r in sorted(problems)]
    if bad and not skip_bad_rows:
        raise CorpusValidationError(name, bad)
    if bad:
        listed = "\n".join(f"  {p}" for p in bad[:_MAX_LISTED])
        warnings.warn(f"skipped {len(bad)} of {n} rows of corpus {name} (skip_bad_rows=True):\n{listed}", stacklevel=2)
    good = [row for row in range(n) if row not in problems]
    if not good:
        raise ValueError(f"corpus {name} has no valid rows (all {n} are bad)")

    return _normalised_dataset(raw, good, keys, captions, images if has_images else None,
                               vectors if has_embeds else None)


def _checked_rows(raw: CorpusTable, image_column: str | None, embeds_column: str | None, caption_column: str,
                  key_column: str, image_embed_dim: int | None, verify_images: bool, confine_to: Path | None):
    """Every row's image reference, path, embedding, captions and key, and every row's problems (row -> reasons).

    A column that is None is absent from the corpus.
    """
    n = len(raw)
    unreadable = raw.problems
    problems: dict[int, list[str]] = collections.defaultdict(list)
    for row, reason in unreadable.items():
        problems[row].append(reason)
    readable = [row for row in range(n) if row not in unreadable]
    images: list[dict | None] = [None] * n
    if image_column is not None:
        values = raw.columns[image_column]
        for row in readable:
            images[row], reason = image_ref(values[row], image_column, raw.image_dir(row), confine_to)
            reason = reason or image_problem(images[row], verify_images)
            if reason:
                problems[row].append(reason)
    paths = [ref["path"] if ref else None for ref in images]
    vectors: list[list | None] = [None] * n
    if embeds_column is not None:
        values = raw.columns[embeds_column]
        for row in readable:
            vectors[row], reason = embedding_vector(values[row], embeds_column)
            if reason:
                problems[row].append(reason)
        for row, reason in embedding_width_problems(vectors, image_embed_dim).items():
            problems[row].append(reason)
    captions: list[list[str]] = [[] for _ in range(n)]
    for row in readable:
        captions[row], reason = parse_captions(raw.columns[caption_column][row], caption_column)
        if reason == "missing caption":
            reason = _missing_caption(raw, row, caption_column)
        if reason:
            problems[row].append(reason)
    # Derived keys can only repeat when one file is listed twice, which is a duplicate row as well.
    key_values = raw.columns[key_column] if key_column in raw.columns else _derived_keys(paths, raw.root)
    keys, key_problems = check_keys(key_values, key_column, unreadable)
    for row, reason in key_problems.items():
        problems[row].append(reason)

    return images, paths, vectors, captions, keys, problems


def _normalised_dataset(raw: CorpusTable, good: list[int], keys: list, captions: list, images: list | None,
                        vectors: list | None) -> datasets.Dataset:
    """The good rows in the package's columns: image_key, captions, image and/or image_embeds, split."""
    data: dict[str, list] = {"image_key": [keys[r] for r in good], "captions": [captions[r] for r in good]}
    features = {"image_key": datasets.Value("string"), "captions": datasets.Sequence(datasets.Value("string"))}
    if images is not None:
        data["image"] = [images[r] for r in good]
        features["image"] = datasets.Image()
    if vectors is not None:
        data["image_embeds"] = [vectors[r] for r in good]
        features["image_embeds"] = datasets.Sequence(datasets.Value("float32"))
    if "split" in raw.columns:
        data["split"] = [str(raw.columns["split"][r]) for r in good]
        features["split"] = datasets.Value("string")
    return datasets.Dataset.from_dict(data, features=datasets.Features(features))



def _missing_caption(raw: CorpusTable, row: int, column: str) -> str:
    """Why a row has no caption; a row that holds the other caption column (a typo between rows) is told so."""
    other = {"captions": "caption", "caption": "captions"}.get(column)
    if other in raw.columns and raw.columns[other][row] is not None:
        return f"missing caption in column {column!r} (this row has {other!r}; use one caption column for all rows)"
    return "missing caption"


@dataclass
class CorpusArguments:
    """Where the example scripts take their corpus from (HfArgumentParser fields shared by them)."""

    corpus: str | None = field(
        default=None,
        metadata={"help": "An imagefolder, or a .jsonl/.json/.csv file (see load_corpus). Default: the synthetic corpus."},
    )
    corpus_split: str | None = field(default=None, metadata={"help": "Keep only this split of the corpus."})
    skip_bad_rows: bool = field(default=False, metadata={"help": "Drop invalid corpus rows (with a warning) instead of failing."})
    allow_paths_outside_corpus: bool = field(
        default=False,
        metadata={
            "help": "Read image paths that lead outside the corpus file's folder or the imagefolder ('..', absolute "
            "paths, '~', symlinks pointing out). By default such rows are bad: only for corpora you trust."
        },
    )
    synthetic_num_images: int = field(default=200, metadata={"help": "Images of the synthetic corpus."})
    synthetic_image_size: int = field(default=32, metadata={"help": "Side of the synthetic images in pixels."})
    synthetic_captions_per_image: int = field(default=3, metadata={"help": "Captions per synthetic image."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the synthetic corpus."})
    num_query_captions: int = field(default=1, metadata={"help": "Captions per image held out as evaluation queries."})

    def load(self) -> datasets.Dataset:
        """The validated corpus: `--corpus` through `load_corpus`, or the built-in synthetic one."""
        if self.corpus is not None:
            return load_corpus(
                self.corpus,
                split=self.corpus_split,
                skip_bad_rows=self.skip_bad_rows,
                allow_paths_outside_corpus=self.allow_paths_outside_corpus,
            )
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
    """Hold out the last `num_query_captions` captions of each image as evaluation queries (0: train on all).

    Images with no more captions than that keep all of them for training and give no query, so every image is
    still trained on. The synthetic corpus shuffles its caption templates per image, so "last" is not biased.
    """
    if isinstance(num_query_captions, bool) or not isinstance(num_query_captions, int) or num_query_captions < 0:
        raise ValueError(f"num_query_captions must be an int >= 0, got {num_query_captions!r}")
    queries, gold, train_captions = [], [], []
    for key, caps in zip(corpus["image_key"], corpus["captions"]):
        if num_query_captions and len(caps) > num_query_captions:
            train_captions.append(list(caps[:-num_query_captions]))
            queries.extend(caps[-num_query_captions:])
            gold.extend([key] * num_query_captions)
        else:
            train_captions.append(list(caps))
    train = corpus.remove_columns("captions").add_column(
        "captions", train_captions, feature=datasets.Sequence(datasets.Value("string"))
    )
    return CaptionSplit(train=train, queries=queries, gold=gold)


def _load_raw(source: Any, split: str | None) -> tuple[CorpusTable, str]:
    """Return (the rows of the selected split, a name for messages)."""
    if isinstance(source, list):
        name = "<list of dicts>"
        return _table_of_list(source).select_split(split, name), name
    if isinstance(source, datasets.Dataset):
        name = "<in-memory Dataset>"
        return _table_of_dataset(source, split, name), name
    if isinstance(source, datasets.DatasetDict):
        name = "<in-memory DatasetDict>"
        return _table_of_dataset(_select_split(source, split, name), None, name), name
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            "load_corpus: source must be a folder or file path, a datasets.Dataset or DatasetDict, or a list of "
            f"dicts; got {type(source).__name__}"
        )
    path = Path(source)
    name = repr(str(source))
    if path.is_dir():
        return read_imagefolder(path).select_split(split, name), name
    if path.is_file():
        if path.suffix.lower() not in TABLE_SUFFIXES:
            raise ValueError(f"corpus file {name} must be .jsonl, .json or .csv, not {path.suffix!r}")
        return read_corpus_file(path).select_split(split, name), name
    # A Hub id is `name` or `owner/name`; anything else that does not exist is a mistyped local path.
    text = str(source)
    if path.suffix.lower() in TABLE_SUFFIXES or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"corpus {name} does not exist (expected a folder or a .jsonl/.json/.csv file)")
    from huggingface_hub import is_offline_mode

    if is_offline_mode():
        raise ValueError(
            f"corpus {name} is not a local folder or file, and Hub datasets cannot be loaded offline "
            "(HF_HUB_OFFLINE is set); pass a local imagefolder, .jsonl/.csv file or datasets.Dataset"
        )
    return _table_of_dataset(_select_split(datasets.load_dataset(text), split, name), None, name), name


def _table_of_list(items: list) -> CorpusTable:
    problems = {
        index: f"item {index} of the list is a {type(item).__name__}, expected a dict of columns"
        for index, item in enumerate(items)
        if not isinstance(item, dict)
    }
    return table_of_records([{} if index in problems else item for index, item in enumerate(items)], problems=problems)


class _DatasetColumns(Mapping):
    """A Dataset's columns as Python lists, each read when first asked for (image columns undecoded)."""

    def __init__(self, dataset: datasets.Dataset):
        self._dataset = dataset
        self._read: dict[str, list] = {}

    def __getitem__(self, name: str) -> list:
        if name not in self._read:
            dataset = self._dataset
            if isinstance(dataset.features[name], datasets.Image):
                dataset = dataset.cast_column(name, datasets.Image(decode=False))
            self._read[name] = list(dataset[name])
        return self._read[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dataset.column_names)

    def __len__(self) -> int:
        return len(self._dataset.column_names)


def _table_of_dataset(dataset: datasets.Dataset, split: str | None, name: str) -> CorpusTable:
    """The rows of a Dataset; `split` selects by its `split` column (without one, the dataset is split 'train')."""
    if split is not None and "split" in dataset.column_names:
        selected = dataset.filter(lambda label: str(label) == split, input_columns="split")
        if not len(selected):
            held = sorted({str(label) for label in dataset["split"]})
            raise ValueError(f"corpus {name} has no split {split!r}; its split column holds {held}")
        dataset = selected
    elif split not in (None, DEFAULT_SPLIT):
        raise ValueError(f"corpus {name} has no split {split!r}; it has ['{DEFAULT_SPLIT}']")
    return CorpusTable(columns=_DatasetColumns(dataset), num_rows=len(dataset))


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
