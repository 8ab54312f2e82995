"""Read a local corpus (a `.jsonl`/`.json`/`.csv` file or an imagefolder) into plain rows, line by line.

`load_corpus` (data.py) validates what this module reads. The files are parsed here rather than by `datasets`
so that every problem names its file and line, and so that rows may differ in type where that is unambiguous
(an integer key in one row and a string key in the next; a caption string in one row and a list in the next),
which `pyarrow`'s column inference refuses. CSV cells stay text (`007` stays `007`).

    read_corpus_file(path) -> CorpusTable       # .jsonl, .json (a list of records, or JSON lines), .csv
    read_imagefolder(folder) -> CorpusTable     # images + metadata.jsonl/.csv/.parquet; sub-folders are splits

A file that cannot be read as a whole (not UTF-8, not JSON, a JSON object instead of records, no rows) raises
`ValueError` naming the file and line. A single unreadable row (an invalid JSON line, a CSV line with the wrong
number of cells) is recorded in `CorpusTable.problems` and reported by `load_corpus` with every other bad row.
"""
from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

TABLE_SUFFIXES = (".jsonl", ".json", ".csv")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
# A single-split source is the `train` split, as in `datasets`.
DEFAULT_SPLIT = "train"


@dataclass
class CorpusTable:
    """A corpus's rows, column by column, with where each row came from.

    `columns[name][row]` is None where a row lacks the column. For local files, `locations[row]` says where the
    row was read ('metadata.jsonl line 4'), `image_dirs[row]` is the folder its relative image paths are
    relative to and `root` the corpus folder image paths must stay inside; in-memory sources have none of them.
    `problems` holds the rows that could not be read at all (their columns are all None).
    """

    columns: Mapping[str, Sequence]
    num_rows: int
    locations: list[str] | None = None
    image_dirs: list[Path] | None = None
    root: Path | None = None
    splits: list[str] = field(default_factory=lambda: [DEFAULT_SPLIT])
    problems: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.num_rows

    def location(self, row: int) -> str | None:
        return self.locations[row] if self.locations is not None else None

    def image_dir(self, row: int) -> Path | None:
        return self.image_dirs[row] if self.image_dirs is not None else None

    def select(self, rows: list[int]) -> CorpusTable:
        """The table restricted to `rows` (in that order), renumbering the unreadable-row problems."""
        position = {row: index for index, row in enumerate(rows)}
        return CorpusTable(
            columns={name: [values[r] for r in rows] for name, values in self.columns.items()},
            num_rows=len(rows),
            locations=None if self.locations is None else [self.locations[r] for r in rows],
            image_dirs=None if self.image_dirs is None else [self.image_dirs[r] for r in rows],
            root=self.root,
            splits=self.splits,
            problems={position[r]: reason for r, reason in self.problems.items() if r in position},
        )

    def select_split(self, split: str | None, name: str) -> CorpusTable:
        """The rows of `split`: a sub-folder of an imagefolder, else the rows whose `split` column says so."""
        if split is None:
            return self
        if len(self.splits) > 1 or "split" not in self.columns:
            if split not in self.splits:
                raise ValueError(f"corpus {name} has no split {split!r}; it has {sorted(self.splits)}")
            if len(self.splits) == 1:
                return self
        labels = [str(label) for label in self.columns["split"]]
        # Unreadable rows have no split: they stay in every selection, to be reported.
        rows = [row for row, label in enumerate(labels) if label == split or row in self.problems]
        if all(row in self.problems for row in rows):
            held = sorted({label for row, label in enumerate(labels) if row not in self.problems})
            raise ValueError(f"corpus {name} has no split {split!r}; its split column holds {held}")
        return self.select(rows)


def table_of_records(records: Sequence[dict], **fields: Any) -> CorpusTable:
    """A table of dict rows; its columns are every key any row has, in first-seen order."""
    names = list(dict.fromkeys(name for record in records for name in record))
    columns = {name: [record.get(name) for record in records] for name in names}
    return CorpusTable(columns=columns, num_rows=len(records), **fields)


def read_corpus_file(path: Path) -> CorpusTable:
    """Rows of one `.jsonl`, `.json` or `.csv` corpus file; image paths are relative to its folder."""
    rows, locations, problems = _read_rows(path, path.name)
    if not rows:
        raise ValueError(f"corpus file {str(path)!r} holds no rows")
    folder = path.resolve().parent
    return table_of_records(rows, locations=locations, problems=problems, image_dirs=[folder] * len(rows), root=folder)


def read_imagefolder(folder: Path) -> CorpusTable:
    """Rows of every metadata file of an imagefolder, with a `split` column when it has several splits.

    The split layout (sub-folders such as `train/` and `test/`) is the one `datasets` infers for `imagefolder`;
    `file_name` is relative to the folder of its metadata file. Images that no metadata row lists are ignored
    (as `datasets` does) and named in a warning.
    """
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    shown = repr(str(folder))
    try:
        data_files = datasets.load_dataset_builder("imagefolder", data_dir=str(folder)).config.data_files
    except datasets.data_files.EmptyDatasetError:
        raise ValueError(
            f"corpus folder {shown} holds no images and no metadata file; expected images plus a metadata.jsonl "
            'with one line per image, such as {"file_name": "cat.png", "captions": ["a cat"]}'
        ) from None
    root = folder.resolve()
    rows: list[dict] = []
    locations: list[str] = []
    problems: dict[int, str] = {}
    image_dirs: list[Path] = []
    split_of_row: list[str] = []
    unlisted: list[str] = []
    for split, files in data_files.items():
        metadata = sorted(Path(f) for f in files if Path(f).name in METADATA_FILES)
        # Compared by real path: a listed symlink counts for the image it points to.
        images = {os.path.realpath(f): f for f in files if Path(f).suffix.lower() in ImageFolder.EXTENSIONS}
        if not metadata:
            raise ValueError(
                f"corpus folder {shown}: split {str(split)!r} has {len(images)} image(s) but no metadata file "
                f"({', '.join(METADATA_FILES)}) giving their captions, such as a metadata.jsonl with lines like "
                '{"file_name": "cat.png", "captions": ["a cat"]}; with split sub-folders, each needs its own'
            )
        if len({m.suffix for m in metadata}) > 1:
            raise ValueError(
                f"corpus folder {shown} mixes metadata formats ({', '.join(sorted(str(m) for m in metadata))}); "
                "keep one format"
            )
        for metadata_file in metadata:
            shown_file = Path(os.path.relpath(metadata_file, folder.absolute())).as_posix()
            file_rows, file_locations, file_problems = _read_rows(metadata_file, shown_file)
            if not file_rows:
                raise ValueError(f"metadata file {str(metadata_file)!r} is empty: it lists no images")
            if not any("file_name" in r for r in file_rows):
                columns = sorted({name for r in file_rows for name in r})
                raise ValueError(
                    f"metadata file {str(metadata_file)!r} has no 'file_name' column (the image file, relative to "
                    f"the metadata file); its columns are {columns}"
                )
            problems.update({len(rows) + row: reason for row, reason in file_problems.items()})
            for record in file_rows:
                name = record.get("file_name")
                if isinstance(name, str):
                    images.pop(os.path.realpath(metadata_file.parent / name), None)
            rows += file_rows
            locations += file_locations
            image_dirs += [metadata_file.parent.resolve()] * len(file_rows)
            split_of_row += [str(split)] * len(file_rows)
        unlisted += sorted(images.values())
    if unlisted:
        names = ", ".join(os.path.relpath(p, folder) for p in unlisted[:10]) + (" ..." if len(unlisted) > 10 else "")
        warnings.warn(
            f"{len(unlisted)} image(s) in corpus folder {shown} are listed in no metadata file and are ignored: "
            f"{names}",
            stacklevel=3,
        )
    table = table_of_records(rows, locations=locations, problems=problems, image_dirs=image_dirs, root=root)
    table.splits = [str(s) for s in data_files]
    if len(data_files) > 1:
        table.columns["split"] = split_of_row
    return table


def _read_rows(path: Path, shown: str) -> tuple[list[dict], list[str], dict[int, str]]:
    """(records, their locations like 'c.jsonl line 4', {row: why it could not be read})."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path, shown)
    if suffix == ".parquet":
        return _read_parquet(path, shown)
    # `datasets` reads either JSON form from either suffix: a .json file of JSON lines, a .jsonl file holding one
    # (pretty-printed) list. The suffix only says which form to try first.
    if suffix == ".json":
        text = "".join(line for _, line in _lines(path))
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            if error.msg != "Extra data":
                raise ValueError(
                    f"corpus file {str(path)!r} is not valid JSON: {error.msg} at line {error.lineno}, column "
                    f"{error.colno}"
                ) from None
            return _read_json_lines(path, shown)
        return _records_of_document(document, path, shown)
    records, locations, problems = _read_json_lines(path, shown)
    if 0 in problems:
        try:
            document = json.loads("".join(line for _, line in _lines(path)))
        except json.JSONDecodeError:
            return records, locations, problems
        return _records_of_document(document, path, shown)
    return records, locations, problems


def _read_json_lines(path: Path, shown: str) -> tuple[list[dict], list[str], dict[int, str]]:
    records, locations, problems = [], [], {}
    for number, line in _lines(path):
        if not line.strip():
            continue
        location = f"{shown} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            problems[len(records)] = f"the line is not valid JSON ({error.msg} at column {error.colno})"
            record = {}
        else:
            if not isinstance(record, dict):
                problems[len(records)] = (
                    f"the line holds a JSON {_json_kind(record)}, expected an object such as "
                    '{"image": "cat.png", "captions": ["a cat"]}'
                )
                record = {}
        records.append(record)
        locations.append(location)
    return records, locations, problems


def _records_of_document(document: Any, path: Path, shown: str) -> tuple[list[dict], list[str], dict[int, str]]:
    if not isinstance(document, list):
        hint = ""
        if isinstance(document, dict):
            nested = [k for k, v in document.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
            under = f"; the records seem to be under {nested[0]!r}" if nested else ""
            hint = f" (keys {sorted(document)[:10]}{under})"
        raise ValueError(
            f"corpus file {str(path)!r} holds a JSON {_json_kind(document)}{hint}; expected a list of records "
            '[{"image": "cat.png", "captions": ["a cat"]}, ...], or one record per line in a .jsonl file'
        )
    records, locations, problems = [], [], {}
    for index, item in enumerate(document):
        location = f"{shown} item {index}"
        if not isinstance(item, dict):
            problems[index] = f"the item is a JSON {_json_kind(item)}, expected an object"
            item = {}
        records.append(item)
        locations.append(location)
    return records, locations, problems


def _read_csv(path: Path, shown: str) -> tuple[list[dict], list[str], dict[int, str]]:
    reader = csv.reader(line for _, line in _lines(path))
    try:
        return _csv_records(reader, path, shown)
    except csv.Error as error:  # a NUL byte, a cell over csv.field_size_limit(), ...
        raise ValueError(
            f"corpus file {str(path)!r} is not readable as CSV at line {reader.line_num}: {error} (long embeddings "
            "fit better in a .jsonl file)"
        ) from None


def _csv_records(reader: Any, path: Path, shown: str) -> tuple[list[dict], list[str], dict[int, str]]:
    header = next(reader, None)
    if not header:
        return [], [], {}
    if len(header) == 1 and any(mark in header[0] for mark in ";\t|"):
        raise ValueError(
            f"corpus file {str(path)!r}: the CSV header has one column {header[0]!r}; separate columns with commas"
        )
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise ValueError(f"corpus file {str(path)!r}: the CSV header repeats column(s) {repeated}")
    records, locations, problems = [], [], {}
    first_line = reader.line_num + 1
    for cells in reader:
        location = f"{shown} line {first_line}"
        first_line = reader.line_num + 1
        if not cells:
            continue
        if len(cells) != len(header):
            problems[len(records)] = f"the line has {len(cells)} cells, the header has {len(header)} ({header})"
            cells = []
        # An empty cell is a missing value, as in pandas.
        records.append({name: cell for name, cell in zip(header, cells) if cell != ""})
        locations.append(location)
    return records, locations, problems


def _read_parquet(path: Path, shown: str) -> tuple[list[dict], list[str], dict[int, str]]:
    import pyarrow
    import pyarrow.parquet

    try:
        records = pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as error:
        raise ValueError(f"metadata file {str(path)!r} is not a readable Parquet file ({error})") from None
    return records, [f"{shown} row {index}" for index in range(len(records))], {}


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text with its line ending) of a UTF-8 file; a leading byte-order mark is dropped.

    Decoded line by line, so that a file in another encoding is refused at the exact line and column.
    """
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                column = len(raw[: error.start].decode("utf-8", errors="replace")) + 1
                raise ValueError(
                    f"corpus file {str(path)!r} is not UTF-8 text: line {number}, column {column} holds the byte "
                    f"0x{raw[error.start]:02x} ({error.reason}); save the file as UTF-8 (for example "
                    f"`iconv -f latin1 -t utf-8 {path.name}`)"
                ) from None
            yield number, text


def _json_kind(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")
