"""Corpus loading and validation on real files: every kind of bad row, every kind of source."""
import json
import warnings

import datasets
import pytest
from PIL import Image

from modeling_gcmr.training.data import (
    CorpusValidationError,
    load_corpus,
    split_captions,
)


def _png(path, colour=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def broken_folder(tmp_path):
    """An imagefolder with one good image and one of each bad-row case."""
    folder = tmp_path / "corpus"
    _png(folder / "good.png")
    full = _png(folder / "truncated.png", (0, 255, 0)).read_bytes()
    (folder / "truncated.png").write_bytes(full[: len(full) // 2])
    (folder / "text.jpg").write_text("this is not a JPEG")
    _png(folder / "blank.png", (0, 0, 255))
    _png(folder / "dup.png", (9, 9, 9))
    _write_jsonl(
        folder / "metadata.jsonl",
        [
            {"file_name": "good.png", "image_key": "k0", "captions": ["a red square"]},
            {"file_name": "truncated.png", "image_key": "k1", "captions": ["a green square"]},
            {"file_name": "text.jpg", "image_key": "k2", "captions": ["a text file"]},
            {"file_name": "missing.png", "image_key": "k3", "captions": ["nothing"]},
            {"file_name": "blank.png", "image_key": "k4", "captions": ["  "]},
            {"file_name": "dup.png", "image_key": "k0", "captions": ["a grey square"]},
        ],
    )
    return folder


def test_every_bad_row_is_reported_at_once(broken_folder):
    with pytest.raises(CorpusValidationError) as info:
        load_corpus(broken_folder)
    problems = {p.row: p for p in info.value.problems}
    assert sorted(problems) == [1, 2, 3, 4, 5]
    assert "truncated" in problems[1].reason and problems[1].path.endswith("truncated.png")
    assert "unreadable" in problems[2].reason and problems[2].path.endswith("text.jpg")
    assert problems[3].reason == "missing image file" and problems[3].key == "k3"
    assert "empty caption" in problems[4].reason
    assert "duplicate image key 'k0' (first at row 0)" in problems[5].reason
    message = str(info.value)
    assert "5 bad row(s)" in message and "missing.png" in message and "--skip_bad_rows" in message
    assert isinstance(info.value, ValueError)


def test_skip_bad_rows_drops_them_with_a_warning(broken_folder):
    with pytest.warns(UserWarning, match=r"skipped 5 of 6 rows") as record:
        corpus = load_corpus(broken_folder, skip_bad_rows=True)
    assert "text.jpg" in str(record[0].message) and "k3" in str(record[0].message)
    assert corpus["image_key"] == ["k0"]
    assert corpus[0]["image"].size == (8, 8)
    assert corpus.column_names == ["image_key", "captions", "image"]


def test_verify_images_false_still_finds_missing_files(broken_folder):
    with pytest.raises(CorpusValidationError) as info:
        load_corpus(broken_folder, verify_images=False)
    assert sorted(p.row for p in info.value.problems) == [3, 4, 5]


def test_jsonl_with_relative_paths_and_derived_keys(tmp_path):
    _png(tmp_path / "imgs" / "a" / "cat.png")
    _png(tmp_path / "imgs" / "b" / "cat.png")
    _png(tmp_path / "imgs" / "dog.jpg")
    path = _write_jsonl(
        tmp_path / "corpus.jsonl",
        [
            {"image": "imgs/a/cat.png", "caption": "a cat"},
            {"image": "imgs/b/cat.png", "caption": "another cat"},
            {"image": "imgs/dog.jpg", "captions": ["a dog", "a good dog"]},
        ],
    )
    with pytest.raises(CorpusValidationError, match="missing caption"):
        load_corpus(path)  # the third row has `captions`, but the column picked is `caption`
    path = _write_jsonl(
        tmp_path / "corpus.jsonl",
        [
            {"image": "imgs/a/cat.png", "captions": ["a cat"]},
            {"image": "imgs/b/cat.png", "captions": ["another cat"]},
            {"image": "imgs/dog.jpg", "captions": ["a dog", "a good dog"]},
        ],
    )
    corpus = load_corpus(path)
    # Colliding stems fall back to the path below the corpus file's folder, without the suffix.
    assert corpus["image_key"] == ["imgs/a/cat", "imgs/b/cat", "dog"]
    assert corpus["captions"][2] == ["a dog", "a good dog"]


def test_same_file_listed_twice_is_a_duplicate(tmp_path):
    _png(tmp_path / "x.png")
    path = _write_jsonl(tmp_path / "c.jsonl", [{"image": "x.png", "caption": "a"}, {"image": "x.png", "caption": "b"}])
    with pytest.raises(CorpusValidationError, match="row 1.*duplicate image key 'x'"):
        load_corpus(path)


def test_csv_with_caption_lists_as_json(tmp_path):
    _png(tmp_path / "p.png")
    (tmp_path / "c.csv").write_text('image,captions,image_key\np.png,"[""one"", ""two""]",7\n')
    corpus = load_corpus(tmp_path / "c.csv")
    assert corpus["image_key"] == ["7"] and corpus["captions"] == [["one", "two"]]


def test_in_memory_sources_and_embeddings():
    rows = [
        {"image_embeds": [0.0, 1.0], "caption": "a", "image_key": "x"},
        {"image_embeds": [1.0, float("nan")], "caption": "b", "image_key": "y"},
        {"image_embeds": [1.0, 2.0, 3.0], "caption": "c", "image_key": "z"},
        {"image_embeds": [2.0, 2.0], "caption": None, "image_key": "w"},
    ]
    with pytest.raises(CorpusValidationError) as info:
        load_corpus(rows)
    reasons = {p.key: p.reason for p in info.value.problems}
    assert set(reasons) == {"y", "z", "w"}
    assert "NaN" in reasons["y"] and "width 3, expected 2" in reasons["z"] and reasons["w"] == "missing caption"
    with pytest.raises(CorpusValidationError, match="width 2, expected 3"):
        load_corpus(rows[:1], image_embed_dim=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        corpus = load_corpus(datasets.Dataset.from_list(rows), skip_bad_rows=True)
    assert corpus["image_key"] == ["x"] and corpus["image_embeds"] == [[0.0, 1.0]]


def test_pil_images_in_memory_get_row_keys():
    corpus = load_corpus([{"image": Image.new("RGB", (4, 4)), "caption": "black"}] * 2)
    assert corpus["image_key"] == ["image_000000", "image_000001"]
    assert corpus[1]["image"].size == (4, 4)


def test_splits_from_subfolders(tmp_path):
    for split, name in (("train", "a"), ("test", "b")):
        _png(tmp_path / split / f"{name}.png")
        _write_jsonl(tmp_path / split / "metadata.jsonl", [{"file_name": f"{name}.png", "caption": name}])
    merged = load_corpus(tmp_path)
    assert sorted(zip(merged["split"], merged["image_key"])) == [("test", "b"), ("train", "a")]
    assert load_corpus(tmp_path, split="test")["image_key"] == ["b"]
    with pytest.raises(ValueError, match="no split 'validation'; it has \\['test', 'train'\\]"):
        load_corpus(tmp_path, split="validation")


def test_bad_sources_have_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="offline"):
        load_corpus("someone/some-dataset")
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(ValueError, match=r"must be \.jsonl, \.json or \.csv"):
        load_corpus(tmp_path / "c.txt")
    with pytest.raises(ValueError, match="no caption column"):
        load_corpus([{"image_embeds": [1.0], "text": "a"}])


def test_split_captions_holds_out_the_last_caption():
    corpus = load_corpus(
        [
            {"image_embeds": [1.0], "captions": ["a", "b", "c"], "image_key": "x"},
            {"image_embeds": [2.0], "captions": ["d"], "image_key": "y"},
        ]
    )
    split = split_captions(corpus)
    assert split.queries == ["c"] and split.gold == ["x"]
    assert split.train["captions"] == [["a", "b"], ["d"]]
