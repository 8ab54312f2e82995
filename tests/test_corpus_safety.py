"""Corpus loading never reads outside the corpus, never crashes inside a library, and names what is wrong.

Real files in temp dirs: escaping image paths, decompression bombs, empty and non-UTF-8 metadata, mixed types,
embeddings that do not fit float32, malformed JSON/CSV. Every bad row is reported with its file and line.
"""
import csv
import io
import json
import struct
import zlib

import datasets
import pytest
from PIL import Image
from transformers import HfArgumentParser

from modeling_gcmr.training.data import CorpusArguments, CorpusValidationError, load_corpus


def _png(path, colour=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), colour).save(path)
    return path


def _png_claiming(path, width, height):
    """A valid PNG header claiming width x height 1-bit pixels, followed by almost no pixel data."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )
    return path


def _write(path, rows):
    """`rows` (dicts) as the file type of `path`: JSON lines, a JSON list, or a CSV with JSON text for lists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        names = list(dict.fromkeys(name for row in rows for name in row))
        text = io.StringIO()
        writer = csv.DictWriter(text, names)
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()} for row in rows)
        path.write_text(text.getvalue())
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


FORMATS = ["c.jsonl", "c.json", "c.csv", "metadata.jsonl", "metadata.csv"]


def _corpus(folder, file, rows):
    """Write `rows` (`image` = path) as `file` in `folder`; return what load_corpus takes (the folder for metadata)."""
    if file.startswith("metadata"):
        _write(folder / file, [{"file_name": r.pop("image"), **r} for r in rows])
        return folder
    return _write(folder / file, rows)


@pytest.fixture
def outside(tmp_path, monkeypatch):
    """A corpus folder, an image next to it (outside), and a home folder with an image."""
    home = tmp_path / "home"
    _png(home / "h.png")
    monkeypatch.setenv("HOME", str(home))
    return {"corpus": tmp_path / "corpus", "private": _png(tmp_path / "private.png")}


@pytest.mark.parametrize("file", FORMATS)
def test_image_paths_outside_the_corpus_folder_are_bad_rows(outside, file):
    corpus, private = outside["corpus"], outside["private"]
    _png(corpus / "ok.png")
    _png(corpus / "sub" / "inner.png")
    (corpus / "link.png").symlink_to(private)
    (corpus / "inner_link.png").symlink_to(corpus / "sub" / "inner.png")  # a link that stays inside is fine
    escaping = ["../private.png", str(private), "~/h.png", "link.png", "sub/../../private.png"]
    rows = [{"image": p, "caption": f"c{i}", "image_key": f"k{i}"} for i, p in enumerate(["ok.png", *escaping])]
    rows.append({"image": "inner_link.png", "caption": "inner", "image_key": "inner"})
    source = _corpus(corpus, file, rows)

    with pytest.raises(CorpusValidationError) as info:
        load_corpus(source)
    problems = info.value.problems
    assert [p.row for p in problems] == [1, 2, 3, 4, 5]
    column = "file_name" if file.startswith("metadata") else "image"
    for problem, written in zip(problems, escaping):
        assert f"column {column!r}" in problem.reason and repr(written) in problem.reason, problem
        assert "outside the corpus folder" in problem.reason and "allow_paths_outside_corpus" in problem.reason
        assert problem.location.startswith(file) and problem.key == f"k{problem.row}"
    # Row 1 is the second record: line 2 of JSON lines, item 1 of a JSON list, line 3 of a CSV (after its header).
    expected = {".jsonl": "line 2", ".json": "item 1", ".csv": "line 3"}[file[file.rindex("."):]]
    assert problems[0].location == f"{file} {expected}"

    with pytest.warns(UserWarning, match="skipped 5 of 7 rows") as record:
        kept = load_corpus(source, skip_bad_rows=True)
    assert kept["image_key"] == ["k0", "inner"]
    assert [str(w.message) for w in record if "~/h.png" in str(w.message) and "link.png" in str(w.message)]
    trusted = load_corpus(source, allow_paths_outside_corpus=True)
    assert trusted["image_key"] == [r["image_key"] for r in rows] and len(trusted) == 7


def test_csv_locations_count_the_lines_of_quoted_cells(outside):
    corpus = outside["corpus"]
    _png(corpus / "ok.png")
    (corpus / "c.csv").write_text('image,caption\nok.png,"two\nlines"\n../private.png,b\n')
    with pytest.raises(CorpusValidationError) as info:
        load_corpus(corpus / "c.csv")
    assert [(p.row, p.location) for p in info.value.problems] == [(1, "c.csv line 4")]
    assert "row 1 (c.csv line 4, key 'private'" in str(info.value)


def test_corpus_arguments_pass_the_opt_in(outside):
    corpus = outside["corpus"]
    _png(corpus / "ok.png")
    rows = [{"image": "ok.png", "caption": "a"}, {"image": "../private.png", "caption": "b"}]
    path = _write(corpus / "c.jsonl", rows)
    (args,) = HfArgumentParser(CorpusArguments).parse_args_into_dataclasses(["--corpus", str(path)])
    assert args.allow_paths_outside_corpus is False
    with pytest.raises(CorpusValidationError, match="outside the corpus folder"):
        args.load()
    (args,) = HfArgumentParser(CorpusArguments).parse_args_into_dataclasses(
        ["--corpus", str(path), "--allow_paths_outside_corpus"]
    )
    assert args.load()["image_key"] == ["ok", "private"]
    help_text = CorpusArguments.__dataclass_fields__["allow_paths_outside_corpus"].metadata["help"]
    assert "outside" in help_text and "symlink" in help_text


@pytest.mark.parametrize("width, height", [(20000, 20000), (10000, 10000)])
def test_decompression_bomb_is_a_bad_row(tmp_path, width, height):
    limit = Image.MAX_IMAGE_PIXELS
    _png(tmp_path / "ok.png")
    _png_claiming(tmp_path / "bomb.png", width, height)
    path = _write(tmp_path / "c.jsonl", [{"image": "ok.png", "caption": "a"}, {"image": "bomb.png", "caption": "b"}])
    with pytest.raises(CorpusValidationError) as info:
        load_corpus(path)
    (problem,) = info.value.problems
    assert problem.row == 1 and problem.path.endswith("bomb.png")
    assert f"{width * height} pixels" in problem.reason and str(limit) in problem.reason
    assert "PIL.Image.MAX_IMAGE_PIXELS" in problem.reason
    with pytest.warns(UserWarning, match="skipped 1 of 2 rows"):
        assert load_corpus(path, skip_bad_rows=True)["image_key"] == ["ok"]
    assert Image.MAX_IMAGE_PIXELS == limit  # the global limit is the user's to change, not ours


def test_raising_the_pixel_limit_lets_a_trusted_large_image_through(tmp_path, monkeypatch):
    _png_claiming(tmp_path / "big.png", 20000, 20000)
    path = _write(tmp_path / "c.jsonl", [{"image": "big.png", "caption": "a"}])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20000 * 20000)  # what the message tells a user to do
    with pytest.raises(CorpusValidationError) as info:
        load_corpus(path)
    # The header passes now; the pixel data of this made-up file is what fails.
    assert "truncated" in info.value.problems[0].reason and "pixels" not in info.value.problems[0].reason


def test_empty_metadata_and_folders_without_images(tmp_path):
    _png(tmp_path / "a" / "x.png")
    (tmp_path / "a" / "metadata.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"metadata file '.*a/metadata.jsonl' is empty"):
        load_corpus(tmp_path / "a")
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match=r"corpus folder '.*b' holds no images and no metadata file"):
        load_corpus(tmp_path / "b")
    _png(tmp_path / "c" / "x.png")
    with pytest.raises(ValueError, match=r"split 'train' has 1 image\(s\) but no metadata file"):
        load_corpus(tmp_path / "c")
    (tmp_path / "d.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"corpus file '.*d.jsonl' holds no rows"):
        load_corpus(tmp_path / "d.jsonl")
    (tmp_path / "e.csv").write_text("image,caption\n")
    with pytest.raises(ValueError, match=r"corpus file '.*e.csv' holds no rows"):
        load_corpus(tmp_path / "e.csv")


@pytest.mark.parametrize("file", ["c.jsonl", "c.csv", "metadata.jsonl", "metadata.csv"])
def test_non_utf8_metadata_names_the_file_and_line(tmp_path, file):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    column = "file_name" if file.startswith("metadata") else "image"
    if file.endswith(".csv"):
        text = f"{column},caption\na.png,a\nb.png,un caf\u00e9\n"
    else:
        text = f'{{"{column}": "a.png", "caption": "a"}}\n{{"{column}": "b.png", "caption": "un caf\u00e9"}}\n'
    (tmp_path / file).write_bytes(text.encode("latin-1"))
    source = tmp_path if file.startswith("metadata") else tmp_path / file
    line = 3 if file.endswith(".csv") else 2
    with pytest.raises(ValueError, match=rf"'.*{file}' is not UTF-8 text: line {line}, column \d+ holds the byte 0xe9"):
        load_corpus(source)


def test_mixed_key_and_caption_types_are_read(tmp_path):
    rows = [
        {"image_embeds": [1.0], "captions": ["a", "b"], "image_key": 1},
        {"image_embeds": [2.0], "captions": "c", "image_key": "two"},
        {"image_embeds": [3.0], "caption": "d", "captions": None, "image_key": 3},
    ]
    expected_captions = [["a", "b"], ["c"]]
    for source in (_write(tmp_path / "c.jsonl", rows[:2]), rows[:2], _write(tmp_path / "c.json", rows[:2])):
        corpus = load_corpus(source)
        assert corpus["image_key"] == ["1", "two"] and corpus["captions"] == expected_captions
    with pytest.raises(CorpusValidationError) as info:
        load_corpus(rows)
    assert "missing caption in column 'captions' (this row has 'caption'" in info.value.problems[0].reason
    # The same through an imagefolder's metadata.
    _png(tmp_path / "f" / "x.png")
    _png(tmp_path / "f" / "y.png")
    _write(tmp_path / "f" / "metadata.jsonl", [{"file_name": "x.png", "image_key": 7, "captions": "a"},
                                               {"file_name": "y.png", "image_key": "y", "captions": ["b", "c"]}])
    corpus = load_corpus(tmp_path / "f")
    assert corpus["image_key"] == ["7", "y"] and corpus["captions"] == [["a"], ["b", "c"]]


def test_wrong_key_and_caption_types_name_row_and_column(tmp_path):
    rows = [
        {"image_embeds": [1.0], "captions": ["a", 3], "image_key": "x"},
        {"image_embeds": [1.0], "captions": {"en": "a"}, "image_key": "y"},
        {"image_embeds": [1.0], "captions": [["a"]], "image_key": "z"},
        {"image_embeds": [1.0], "captions": ["a"], "image_key": 1.5},
        {"image_embeds": [1.0], "captions": ["a"], "image_key": ["k"]},
        {"image_embeds": [1.0], "captions": ["a"], "image_key": True},
    ]
    with pytest.raises(CorpusValidationError) as info:
        load_corpus(_write(tmp_path / "c.jsonl", rows))
    reasons = {p.row: p.reason for p in info.value.problems}
    assert "column 'captions': caption 1 is 3 (int), expected a string" in reasons[0]
    assert "column 'captions' must hold a string or a list of strings, got {'en': 'a'} (dict)" in reasons[1]
    assert "caption 0 is ['a'] (list)" in reasons[2]
    for row, shown in ((3, "1.5 (float)"), (4, "['k'] (list)"), (5, "True (bool)")):
        assert f"column 'image_key' must hold a string or an integer, got {shown}" in reasons[row]
    assert info.value.problems[0].location == "c.jsonl line 1"


@pytest.mark.parametrize(
    "vector, reason",
    [
        ([1e39, 0.0], "entry 0 is 1e+39, which does not fit float32"),
        ([0.0, -1e39], "entry 1 is -1e+39, which does not fit float32"),
        ([float("inf"), 0.0], "entry 0 is inf"),
        ([0.0, float("nan")], "entry 1 is NaN"),
        (["0.5", 0.0], "entry 0 is '0.5' (str), expected a number"),
        ([True, 0.0], "entry 0 is True (bool), expected a number"),
        ([None, 0.0], "entry 0 is None (NoneType), expected a number"),
        ([10**400, 0.0], "which does not fit float32"),
        ("0.5 0.5", "must hold a list of numbers, got '0.5 0.5' (str)"),
        ("[0.5, ", "is not a valid JSON list"),
    ],
)
def test_embeddings_that_do_not_fit_float32_are_bad_rows(tmp_path, vector, reason):
    rows = [
        {"image_embeds": [1.0, 2.0], "caption": "a", "image_key": "x"},
        {"image_embeds": vector, "caption": "b", "image_key": "y"},
    ]
    for source in (rows, _write(tmp_path / "c.jsonl", rows)):
        with pytest.raises(CorpusValidationError) as info:
            load_corpus(source)
        (problem,) = info.value.problems
        assert problem.row == 1 and problem.key == "y" and "column 'image_embeds'" in problem.reason
        assert reason in problem.reason, problem.reason


def test_embeddings_as_arrays_and_csv_json_text(tmp_path):
    import numpy as np

    corpus = load_corpus([{"image_embeds": np.array([1.5, 2.0], dtype=np.float32), "caption": "a"}])
    assert corpus["image_embeds"] == [[1.5, 2.0]]
    (tmp_path / "c.csv").write_text('image_embeds,caption,image_key\n"[1.0, 2.5]",a,007\n"[3, 4]",b,7\n')
    corpus = load_corpus(tmp_path / "c.csv")
    assert corpus["image_key"] == ["007", "7"] and corpus["image_embeds"] == [[1.0, 2.5], [3.0, 4.0]]


def test_malformed_json_files(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"data": [{"image_embeds": [1.0], "caption": "a"}]}))
    nested = r"holds a JSON object \(keys \['data'\]; the records seem to be under 'data'\); expected a list of records"
    with pytest.raises(ValueError, match=nested):
        load_corpus(tmp_path / "a.json")
    broken = '[{"image_embeds": [1.0], "caption": "a"},\n {"image_embeds": [2.0] "caption": "b"}]'
    (tmp_path / "b.json").write_text(broken)
    with pytest.raises(ValueError, match=r"'.*b.json' is not valid JSON: Expecting ',' delimiter at line 2, column 25"):
        load_corpus(tmp_path / "b.json")
    (tmp_path / "c.json").write_text(json.dumps([{"image_embeds": [1.0], "caption": "a"}, "x.png"]))
    with pytest.raises(CorpusValidationError, match=r"row 1 \(c.json item 1\): the item is a JSON string"):
        load_corpus(tmp_path / "c.json")
    # As `datasets` does: a .json file of JSON lines is read as JSON lines, and a .jsonl file holding a
    # pretty-printed list as that list.
    _write(tmp_path / "d.jsonl", [{"image_embeds": [1.0], "caption": "a"}, {"image_embeds": [2.0], "caption": "b"}])
    (tmp_path / "d.jsonl").rename(tmp_path / "d.json")
    assert len(load_corpus(tmp_path / "d.json")) == 2
    (tmp_path / "e.jsonl").write_text(json.dumps([{"image_embeds": [1.0], "caption": "a"}], indent=2))
    assert load_corpus(tmp_path / "e.jsonl")["captions"] == [["a"]]
    (tmp_path / "f.jsonl").write_text(json.dumps({"image_embeds": [1.0], "caption": "a"}, indent=2))
    with pytest.raises(ValueError, match=r"'.*f.jsonl' holds a JSON object \(keys \['caption', 'image_embeds'\]\)"):
        load_corpus(tmp_path / "f.jsonl")


def test_unreadable_json_lines_are_bad_rows_with_the_rest(tmp_path):
    (tmp_path / "c.jsonl").write_text(
        '{"image_embeds": [1.0], "caption": "a", "image_key": "x"}\n'
        '{"image_embeds": [2.0], "caption": "b" "image_key": "y"}\n'
        "\n"
        '["z", [3.0], "c"]\n'
        '{"image_embeds": [4.0], "caption": "", "image_key": "w"}\n'
    )
    with pytest.raises(CorpusValidationError) as info:
        load_corpus(tmp_path / "c.jsonl")
    found = [(p.row, p.location, p.reason) for p in info.value.problems]
    assert found[0] == (1, "c.jsonl line 2", "the line is not valid JSON (Expecting ',' delimiter at column 40)")
    assert found[1][:2] == (2, "c.jsonl line 4") and "holds a JSON list, expected an object" in found[1][2]
    assert found[2][:2] == (3, "c.jsonl line 5") and "empty caption" in found[2][2]
    with pytest.warns(UserWarning, match="skipped 3 of 4 rows"):
        assert load_corpus(tmp_path / "c.jsonl", skip_bad_rows=True)["image_key"] == ["x"]


def test_malformed_csv_rows(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    _png(tmp_path / "c.png")
    (tmp_path / "c.csv").write_text('image,captions\na.png,"[one, two]"\nb.png,b,extra\nc.png,"[""[blurry]""]"\n')
    with pytest.raises(CorpusValidationError) as info:
        load_corpus(tmp_path / "c.csv")
    reasons = {p.row: p.reason for p in info.value.problems}
    assert sorted(reasons) == [0, 1]
    assert "'[one, two]' looks like a list but is not valid JSON" in reasons[0] and '["one", "two"]' in reasons[0]
    assert reasons[1] == "the line has 3 cells, the header has 2 (['image', 'captions'])"
    assert "row 1 (c.csv line 3): the line has 3 cells" in str(info.value)
    with pytest.warns(UserWarning):
        assert load_corpus(tmp_path / "c.csv", skip_bad_rows=True)["captions"] == [["[blurry]"]]
    (tmp_path / "d.csv").write_text("image,caption,image\na.png,a,b.png\n")
    with pytest.raises(ValueError, match=r"the CSV header repeats column\(s\) \['image'\]"):
        load_corpus(tmp_path / "d.csv")
    (tmp_path / "e.csv").write_text("image;caption\na.png;a\n")  # a spreadsheet's export in some locales
    with pytest.raises(ValueError, match=r"the CSV header has one column 'image;caption'; separate columns with comma"):
        load_corpus(tmp_path / "e.csv")


def test_image_values_that_are_not_image_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    rows = [
        {"image": 5, "caption": "a number", "image_key": "n"},
        {"image": "sub", "caption": "a folder", "image_key": "d"},
        {"image": "loop.png", "caption": "a loop", "image_key": "l"},
        {"image": "https://example.com/a.png", "caption": "a URL", "image_key": "u"},
        {"image": {"bytes": "abc", "path": None}, "caption": "text bytes", "image_key": "b"},
    ]
    with pytest.raises(CorpusValidationError) as info:
        load_corpus(_write(tmp_path / "c.jsonl", rows))
    reasons = {p.key: p.reason for p in info.value.problems}
    assert "column 'image' must hold an image file path, got 5 (int)" in reasons["n"]
    assert "is a directory, not an image file" in reasons["d"]
    assert "symlink loop" in reasons["l"]
    assert "is a URL; only local image files are read" in reasons["u"]
    assert "column 'image' must hold an image file path, got {'bytes': 'abc', 'path': None} (dict)" in reasons["b"]
    with pytest.raises(CorpusValidationError, match="must hold a path, a PIL image or"):
        load_corpus([{"image": 5, "caption": "a"}])


def test_bad_in_memory_sources(tmp_path):
    with pytest.raises(CorpusValidationError, match=r"row 1: item 1 of the list is a str, expected a dict"):
        load_corpus([{"image_embeds": [1.0], "caption": "a"}, "b.png"])
    with pytest.raises(ValueError, match="corpus <list of dicts> holds no rows"):
        load_corpus([])
    with pytest.raises(TypeError, match=r"source must be a folder or file path, a datasets.Dataset"):
        load_corpus(None)
    with pytest.raises(ValueError, match="image_embed_dim must be a positive integer, got 0"):
        load_corpus([{"image_embeds": [1.0], "caption": "a"}], image_embed_dim=0)


def test_split_column_of_a_file_selects_rows(tmp_path):
    rows = [
        {"image_embeds": [1.0], "caption": "a", "split": "test"},
        {"image_embeds": [2.0], "caption": "b", "split": 1},
        {"image_embeds": [3.0], "caption": "c", "split": "train"},
    ]
    path = _write(tmp_path / "c.jsonl", rows)
    assert load_corpus(path, split="test")["image_embeds"] == [[1.0]]
    assert load_corpus(path, split="1")["image_embeds"] == [[2.0]]
    with pytest.raises(ValueError, match=r"has no split 'validation'; its split column holds \['1', 'test', 'train'\]"):
        load_corpus(path, split="validation")
    plain = _write(tmp_path / "d.jsonl", [{"image_embeds": [1.0], "caption": "a"}])
    assert len(load_corpus(plain, split="train")) == 1
    with pytest.raises(ValueError, match=r"has no split 'test'; it has \['train'\]"):
        load_corpus(plain, split="test")
    # In memory, the same rules: a split column selects rows; without one, the corpus is the split 'train'.
    for source in (rows, datasets.Dataset.from_list([{**r, "split": str(r["split"])} for r in rows])):
        assert load_corpus(source, split="test")["image_embeds"] == [[1.0]]
        with pytest.raises(ValueError, match=r"no split 'validation'; its split column holds \['1', 'test', 'train'\]"):
            load_corpus(source, split="validation")
    one_row = [{"image_embeds": [1.0], "caption": "a"}]
    for source in (one_row, datasets.Dataset.from_list(one_row)):
        assert len(load_corpus(source, split="train")) == 1
        with pytest.raises(ValueError, match=r"has no split 'test'; it has \['train'\]"):
            load_corpus(source, split="test")


def test_imagefolder_metadata_problems(tmp_path):
    _png(tmp_path / "a" / "x.png")
    _png(tmp_path / "a" / "unlisted.png")
    _write(tmp_path / "a" / "metadata.jsonl", [{"file_name": "x.png", "caption": "a"}])
    with pytest.warns(UserWarning, match=r"1 image\(s\) in corpus folder .* are listed in no metadata file and are "
                                         r"ignored: unlisted.png"):
        assert load_corpus(tmp_path / "a")["image_key"] == ["x"]
    _png(tmp_path / "b" / "x.png")
    _write(tmp_path / "b" / "metadata.jsonl", [{"image": "x.png", "caption": "a"}])
    with pytest.raises(ValueError, match=r"has no 'file_name' column .*; its columns are \['caption', 'image'\]"):
        load_corpus(tmp_path / "b")
    _png(tmp_path / "c" / "x.png")
    _write(tmp_path / "c" / "metadata.jsonl", [{"file_name": "x.png", "caption": "a"}])
    _write(tmp_path / "c" / "metadata.csv", [{"file_name": "x.png", "caption": "a"}])
    with pytest.raises(ValueError, match="mixes metadata formats"):
        load_corpus(tmp_path / "c")


def test_an_in_memory_dataset_is_not_confined(tmp_path):
    """In-memory sources have no corpus folder: their paths are taken as given (the caller built them)."""
    image = _png(tmp_path / "elsewhere" / "x.png")
    corpus = load_corpus(datasets.Dataset.from_list([{"image": str(image), "caption": "a"}]))
    assert corpus["image_key"] == ["x"]
