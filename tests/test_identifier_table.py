"""IdentifierTable: validation, content hash, the safetensors + JSON files and every way they can be wrong."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tokenization_gcmr import identifier_table
from tokenization_gcmr.builders.identifiers import build_identifiers
from tokenization_gcmr.identifier_table import (
    FORMAT_VERSION,
    TABLE_HEADER_NAME,
    TABLE_WEIGHTS_NAME,
    IdentifierTable,
    IdentifierTableError,
    table_from_sequences,
)


@pytest.fixture()
def table() -> IdentifierTable:
    embeddings = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    return build_identifiers([f"img/{i}.jpg" for i in range(40)], "coarse_fine", embeddings=embeddings, num_coarse=3, codebook_size=4)


def test_round_trip_keeps_every_field(table, tmp_path):
    table.save(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [TABLE_HEADER_NAME, TABLE_WEIGHTS_NAME]
    loaded = IdentifierTable.load(str(tmp_path))
    assert loaded.keys == table.keys and loaded.units == table.units and loaded.id_type == "coarse_fine"
    assert np.array_equal(loaded.codes, table.codes) and loaded.codes.dtype == np.int32
    assert np.array_equal(loaded.unit_is_text, table.unit_is_text)
    np.testing.assert_array_equal(loaded.unit_vectors, table.unit_vectors)  # NaN rows compare equal here
    assert loaded.options == table.options and loaded.content_hash == table.content_hash
    header = json.loads((tmp_path / TABLE_HEADER_NAME).read_text())
    assert header["format_version"] == FORMAT_VERSION and header["num_identifiers"] == 40
    assert header["content_hash"] == table.content_hash


def test_round_trip_without_unit_vectors_and_text_units(tmp_path):
    text = table_from_sequences(["a", "b"], [[0, 1], [1]], ["▁red", "▁circle"], unit_is_text=np.ones(2, bool), id_type="semantic")
    text.save(str(tmp_path))
    loaded = IdentifierTable.load(str(tmp_path))
    assert loaded.unit_vectors is None and loaded.unit_is_text.all() and loaded.units == ("▁red", "▁circle")
    assert loaded.codes.tolist() == [[0, 1], [1, -1]] and loaded.lengths().tolist() == [2, 1]
    assert loaded.new_units() == [] and loaded.max_length == 2


def test_content_hash_sees_every_field(table):
    def changed(**fields):
        values = dict(keys=table.keys, codes=table.codes, units=table.units, unit_is_text=table.unit_is_text,
                      id_type=table.id_type, options=table.options, unit_vectors=table.unit_vectors)
        values.update(fields)
        return IdentifierTable(**values).content_hash

    assert changed() == table.content_hash
    assert changed(keys=table.keys[::-1]) != table.content_hash
    assert changed(codes=table.codes[::-1]) != table.content_hash
    assert changed(id_type="structured") != table.content_hash
    assert changed(options={**table.options, "seed": 1}) != table.content_hash
    assert changed(unit_vectors=None) != table.content_hash
    assert changed(unit_vectors=table.unit_vectors + 1) != table.content_hash
    flipped = table.unit_is_text.copy()
    flipped[0] = True
    assert changed(unit_is_text=flipped) != table.content_hash


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(codes=np.zeros(2, np.int32)), "codes must be 2-D"),
        (dict(codes=np.zeros((3, 1), np.int32)), "3 code rows for 2 keys"),
        (dict(keys=("a", "a")), "keys are not unique: 'a'"),
        (dict(keys=("a", 2)), "keys must be strings"),
        (dict(units=("<x>", "<x>")), "units are not unique"),
        (dict(unit_is_text=np.zeros(3, bool)), r"unit_is_text has shape \(3,\), expected \(2,\)"),
        (dict(codes=np.array([[0], [2]])), r"codes must lie in \[-1, 2\)"),
        (dict(codes=np.array([[0, 1], [-1, 1]])), "every identifier needs at least one token"),
        (dict(codes=np.zeros((2, 0), np.int32)), "every identifier needs at least one token"),
        (dict(codes=np.array([[0, -1, 1], [1, 0, 0]])), "right-padded"),
        (dict(codes=np.array([[0, 1], [0, 1]])), r"identifiers are not unique: row 1 \('b'\)"),
        (dict(unit_vectors=np.zeros((3, 4))), r"unit_vectors has shape \(3, 4\), expected \(2, D\)"),
        (dict(unit_vectors=np.zeros(2)), "unit_vectors has shape"),
    ],
)
def test_inconsistent_tables_are_rejected(fields, message):
    values = dict(keys=("a", "b"), codes=np.array([[0], [1]]), units=("<x>", "<y>"), unit_is_text=np.zeros(2, bool), id_type="atomic")
    values.update(fields)
    with pytest.raises(IdentifierTableError, match=message):
        IdentifierTable(**values)


@pytest.mark.parametrize("missing", [TABLE_HEADER_NAME, TABLE_WEIGHTS_NAME])
def test_missing_file_is_named(table, tmp_path, missing):
    table.save(str(tmp_path))
    os.remove(tmp_path / missing)
    with pytest.raises(IdentifierTableError, match=f"identifier table file is missing: .*{missing}"):
        IdentifierTable.load(str(tmp_path))


def test_truncated_files_are_named(table, tmp_path):
    table.save(str(tmp_path))
    weights = (tmp_path / TABLE_WEIGHTS_NAME).read_bytes()
    (tmp_path / TABLE_WEIGHTS_NAME).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(IdentifierTableError, match=f"{TABLE_WEIGHTS_NAME} cannot be read"):
        IdentifierTable.load(str(tmp_path))
    table.save(str(tmp_path))
    header = (tmp_path / TABLE_HEADER_NAME).read_bytes()
    (tmp_path / TABLE_HEADER_NAME).write_bytes(header[: len(header) // 2])
    with pytest.raises(IdentifierTableError, match=f"{TABLE_HEADER_NAME} is not valid JSON"):
        IdentifierTable.load(str(tmp_path))


def rewrite_header(directory, **changes):
    path = directory / TABLE_HEADER_NAME
    header = json.loads(path.read_text())
    for name, value in changes.items():
        if value is None:
            del header[name]
        else:
            header[name] = value
    path.write_text(json.dumps(header))


@pytest.mark.parametrize("version", [FORMAT_VERSION + 2, "1", None])
def test_other_format_version_is_refused(table, tmp_path, version):
    table.save(str(tmp_path))
    rewrite_header(tmp_path, format_version=version)
    with pytest.raises(IdentifierTableError, match=f"has format_version {version!r}; this version of gcmr reads "
                                                   rf"\({FORMAT_VERSION}, {FORMAT_VERSION + 1}\)"):
        IdentifierTable.load(str(tmp_path))


def test_an_unedited_table_claiming_the_edited_format_is_refused(table, tmp_path):
    table.save(str(tmp_path))
    rewrite_header(tmp_path, format_version=FORMAT_VERSION + 1)
    with pytest.raises(IdentifierTableError, match="format_version 2 is for edited tables"):
        IdentifierTable.load(str(tmp_path))


def test_header_and_weights_from_different_tables(table, tmp_path):
    table.save(str(tmp_path / "one"))
    other = build_identifiers(list(table.keys), "coarse_fine", embeddings=np.ones((40, 6), np.float32), num_coarse=3, codebook_size=4)
    other.save(str(tmp_path / "two"))
    os.replace(tmp_path / "two" / TABLE_WEIGHTS_NAME, tmp_path / "one" / TABLE_WEIGHTS_NAME)
    with pytest.raises(IdentifierTableError, match="do not agree|content hash mismatch"):
        IdentifierTable.load(str(tmp_path / "one"))


def test_edited_header_fails_the_hash(table, tmp_path):
    table.save(str(tmp_path))
    rewrite_header(tmp_path, keys=["renamed", *table.keys[1:]])
    with pytest.raises(IdentifierTableError, match="content hash mismatch"):
        IdentifierTable.load(str(tmp_path))


@pytest.mark.parametrize("field", ["id_type", "options", "keys", "units", "content_hash"])
def test_header_missing_a_field(table, tmp_path, field):
    table.save(str(tmp_path))
    rewrite_header(tmp_path, **{field: None})
    with pytest.raises(IdentifierTableError, match=f"lacks the field '{field}'"):
        IdentifierTable.load(str(tmp_path))


def test_header_that_is_not_an_object(table, tmp_path):
    table.save(str(tmp_path))
    (tmp_path / TABLE_HEADER_NAME).write_text("[1, 2]")
    with pytest.raises(IdentifierTableError, match="must hold a JSON object"):
        IdentifierTable.load(str(tmp_path))


def test_failed_save_leaves_the_previous_table_intact(table, tmp_path, monkeypatch):
    table.save(str(tmp_path))
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    def write_half_then_fail(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(identifier_table, "save_file", write_half_then_fail)
    other = build_identifiers(list(table.keys), "atomic")
    with pytest.raises(OSError, match="disk full"):
        other.save(str(tmp_path))
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
    assert IdentifierTable.load(str(tmp_path)).content_hash == table.content_hash
