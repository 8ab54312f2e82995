"""ImageIdTokenizer: identifiers both ways for every id type, query encoding, save/load, remote code, bad files."""
import json
import os

import numpy as np
import pytest
import torch
from subprocess_utils import run_without_package
from tokenizers import (
    Tokenizer,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import AutoTokenizer

from modeling_gcmr import GcmrConfig
from tokenization_gcmr import (
    IdentifierTable,
    IdentifierTableError,
    ImageIdTokenizer,
    build_identifiers,
    table_from_sequences,
    train_text_tokenizer,
)
from tokenization_gcmr.identifier_table import TABLE_HEADER_NAME, TABLE_WEIGHTS_NAME

NUM_IMAGES = 48
QUERIES = ["a red circle left of a blue square", "17 tiny green stars above a white ring", "a PINK cross"]


@pytest.fixture(scope="module")
def corpus(caption_corpus):
    keys = [f"img_{index:03d}" for index in range(NUM_IMAGES)]
    embeddings = np.random.default_rng(0).normal(size=(NUM_IMAGES, 8)).astype(np.float32)
    return keys, embeddings, caption_corpus[:NUM_IMAGES]


ID_TYPE_OPTIONS = {
    "numeric": {},
    "string": {"text_tokenizer": True},
    "semantic": {"text_tokenizer": True, "max_length": 3},
    "structured": {"branching": 3, "leaf_size": 5},
    "atomic": {},
    "coarse_fine": {"num_coarse": 3, "num_levels": 2, "codebook_size": 4},
}


def build_table(id_type, corpus, text_tokenizer):
    keys, embeddings, captions = corpus
    options = dict(ID_TYPE_OPTIONS[id_type])
    if options.pop("text_tokenizer", False):
        options["text_tokenizer"] = text_tokenizer
    return build_identifiers(keys, id_type=id_type, embeddings=embeddings, captions=captions, seed=0, **options)


def trie_paths(trie):
    paths, stack = set(), [(0, ())]
    while stack:
        node, prefix = stack.pop()
        for edge in range(trie.offsets[node], trie.offsets[node + 1]):
            child = int(trie.child_nodes[edge])
            token = int(trie.child_tokens[edge])
            if child < 0:
                paths.add(prefix + (token,))
            else:
                stack.append((child, prefix + (token,)))
    return paths


@pytest.mark.parametrize("id_type", sorted(ID_TYPE_OPTIONS))
def test_every_id_type_round_trips_through_the_tokenizer(id_type, corpus, text_tokenizer, make_id_tokenizer):
    table = build_table(id_type, corpus, text_tokenizer)
    tokenizer = make_id_tokenizer(table)
    keys = list(tokenizer.keys)
    assert keys == corpus[0]
    for key in keys:
        ids = tokenizer.identifier_ids(key)
        assert 1 <= len(ids) <= tokenizer.max_identifier_length
        assert tokenizer.eos_token_id not in ids
        assert tokenizer.key_for(ids) == key
    labels = tokenizer.encode_identifiers(keys)
    assert all(label[-1] == tokenizer.eos_token_id for label in labels)
    # The trie accepts exactly the identifiers (each + EOS), nothing else.
    assert trie_paths(tokenizer.prefix_trie) == {tuple(label) for label in labels}
    # Batched decoding output: a leading decoder-start (pad), EOS, then padding.
    width = max(map(len, labels)) + 2
    batch = torch.full((len(labels), width), tokenizer.pad_token_id)
    for row, label in enumerate(labels):
        batch[row, 1 : 1 + len(label)] = torch.tensor(label)
    assert tokenizer.keys_for(batch) == keys
    # Text units keep their text ids; new units get ids after the text vocabulary, in one contiguous range.
    assert tokenizer.identifier_token_ids.tolist() == list(range(tokenizer.num_text_tokens, len(tokenizer)))
    for row, label in enumerate(labels):
        units = table.codes[row][table.codes[row] >= 0]
        assert [token < tokenizer.num_text_tokens for token in label[:-1]] == table.unit_is_text[units].tolist()
        assert tokenizer.convert_ids_to_tokens(label[:-1]) == [table.units[unit] for unit in units]


@pytest.fixture(scope="module")
def prefix_table():
    # Identifiers that prefix each other, as semantic ids can.
    return table_from_sequences(
        ["k0", "k1", "k2", "k3"], [[0, 1], [0, 2], [1], [1, 0, 2]], ["<c_0>", "<c_1>", "<f1_0>"], id_type="coarse_fine"
    )


def test_key_for_rejects_non_identifiers(prefix_table, make_id_tokenizer):
    tokenizer = make_id_tokenizer(prefix_table)
    c0, c1, f0 = (tokenizer.convert_tokens_to_ids(unit) for unit in ("<c_0>", "<c_1>", "<f1_0>"))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert tokenizer.key_for([c1]) == "k2"
    assert tokenizer.key_for([c1, eos]) == "k2"
    assert tokenizer.key_for(np.array([pad, c1, c0, f0, eos, pad, pad])) == "k3"
    assert tokenizer.key_for(torch.tensor([c0, c1, eos, -100, -100])) == "k0"  # label padding
    for not_an_id in ([c0], [c1, c0], [c0, f0, f0], [c1, eos, c0], [c0, pad, c1], [c0, -100, c1], [], [eos], [pad, pad], [5, 6]):
        assert tokenizer.key_for(not_an_id) is None, not_an_id
    assert tokenizer.keys_for([[c0, c1], [c0], [c0, f0, eos]]) == ["k0", None, "k1"]
    with pytest.raises(KeyError, match="'missing_key'"):
        tokenizer.identifier_ids("missing_key")


def test_query_encoding_matches_the_text_tokenizer(prefix_table, text_tokenizer, make_id_tokenizer):
    tokenizer = make_id_tokenizer(prefix_table)
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token) == ("<pad>", "</s>", "<unk>")
    assert len(tokenizer) == len(text_tokenizer) + 3 == tokenizer.vocab_size
    kwargs = {"padding": True, "truncation": True, "max_length": 7, "return_tensors": "pt"}
    mine, theirs = tokenizer(QUERIES, **kwargs), text_tokenizer(QUERIES, **kwargs)
    assert torch.equal(mine["input_ids"], theirs["input_ids"])
    assert torch.equal(mine["attention_mask"], theirs["attention_mask"])
    assert mine["input_ids"][0, -1].item() == tokenizer.eos_token_id  # truncation keeps the appended </s>
    for query in QUERIES:
        ids = tokenizer(query)["input_ids"]
        assert ids == text_tokenizer(query)["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text_tokenizer.decode(ids, skip_special_tokens=True)
    assert tokenizer("a red", "a blue")["input_ids"] == text_tokenizer("a red", "a blue")["input_ids"]
    k3 = tokenizer.identifier_ids("k3")
    assert tokenizer.decode(k3) == "<c_1> <c_0> <f1_0>"
    assert tokenizer.decode(tokenizer("a red circle")["input_ids"][:-1] + k3) == "a red circle <c_1> <c_0> <f1_0>"


def bert_style_tokenizer(captions):
    """A BERT-like tokenizers.Tokenizer: [CLS] ... [SEP], no EOS token (EOS falls back to SEP)."""
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend.train_from_iterator(captions, trainers.WordPieceTrainer(vocab_size=150, special_tokens=specials))
    backend.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    return backend


def test_bert_style_text_tokenizer(caption_corpus, prefix_table):
    backend = bert_style_tokenizer(caption_corpus)
    tokenizer = ImageIdTokenizer(backend, prefix_table)
    assert (tokenizer.cls_token, tokenizer.sep_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "[CLS]", "[SEP]", "[SEP]", "[PAD]",
    )
    for query in QUERIES:
        assert tokenizer(query)["input_ids"] == backend.encode(query).ids
    assert tokenizer("a red", "a blue")["input_ids"] == backend.encode("a red", "a blue").ids
    mask = tokenizer("a red", return_special_tokens_mask=True)["special_tokens_mask"]
    assert mask == [1, 0, 0, 1]
    assert tokenizer.encode_identifiers(["k2"]) == [[tokenizer.convert_tokens_to_ids("<c_1>"), 3]]


def test_table_from_another_text_tokenizer_is_refused(text_tokenizer):
    foreign = table_from_sequences(["a", "b"], [[0], [1]], ["red", "zzqx"], id_type="string", unit_is_text=np.array([True, True]))
    with pytest.raises(IdentifierTableError, match="different text tokenizer: unit 'zzqx' missing"):
        ImageIdTokenizer(text_tokenizer, foreign)
    clash = table_from_sequences(["a"], [[0]], ["red"], id_type="atomic")
    with pytest.raises(IdentifierTableError, match="unit 'red' is already a token of the text vocabulary"):
        ImageIdTokenizer(text_tokenizer, clash)
    with pytest.raises(TypeError, match="text_tokenizer must be"):
        ImageIdTokenizer(object(), foreign)


@pytest.fixture
def saved(tmp_path, corpus, text_tokenizer, make_id_tokenizer):
    tokenizer = make_id_tokenizer(build_table("coarse_fine", corpus, text_tokenizer))
    folder = tmp_path / "checkpoint"
    tokenizer.save_pretrained(folder)
    return tokenizer, str(folder)


def assert_same_tokenizer(loaded, original):
    assert type(loaded).__name__ == "ImageIdTokenizer"
    assert loaded.keys == original.keys
    assert [loaded.identifier_ids(k) for k in original.keys] == [original.identifier_ids(k) for k in original.keys]
    assert loaded(QUERIES)["input_ids"] == original(QUERIES)["input_ids"]
    assert loaded.identifier_signature == original.identifier_signature
    assert (loaded.pad_token_id, loaded.eos_token_id, len(loaded)) == (original.pad_token_id, original.eos_token_id, len(original))
    for name, array in original.prefix_trie.arrays().items():
        np.testing.assert_array_equal(loaded.prefix_trie.arrays()[name], array)


def test_save_and_load_round_trip(saved):
    tokenizer, folder = saved
    files = set(os.listdir(folder))
    assert {"tokenizer_config.json", "text_tokenizer.json", TABLE_HEADER_NAME, TABLE_WEIGHTS_NAME} <= files
    assert {"tokenization_gcmr.py", "prefix_trie.py", "identifier_table.py"} <= files  # the Hub code, flat
    assert not [name for name in files if name.startswith(".tmp")]
    with open(os.path.join(folder, "tokenizer_config.json")) as handle:
        config = json.load(handle)
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_gcmr.ImageIdTokenizer"
    assert_same_tokenizer(ImageIdTokenizer.from_pretrained(folder), tokenizer)
    # Importing tokenization_gcmr registered the class: no remote code needed in this process.
    assert_same_tokenizer(AutoTokenizer.from_pretrained(folder), tokenizer)
    # Saving again over the same folder works and changes nothing.
    before = {name: open(os.path.join(folder, name), "rb").read() for name in (TABLE_HEADER_NAME, "text_tokenizer.json")}
    tokenizer.save_pretrained(folder)
    assert before == {name: open(os.path.join(folder, name), "rb").read() for name in before}


def test_a_failed_save_leaves_the_previous_checkpoint_intact(saved, monkeypatch, prefix_table, make_id_tokenizer):
    tokenizer, folder = saved
    other = make_id_tokenizer(prefix_table)

    def disk_full(self, directory):
        raise OSError("No space left on device")

    monkeypatch.setattr(IdentifierTable, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        other.save_pretrained(folder)
    monkeypatch.undo()
    assert not [name for name in os.listdir(folder) if name.startswith(".tmp")]
    assert_same_tokenizer(ImageIdTokenizer.from_pretrained(folder), tokenizer)


def test_remote_code_loads_without_the_package(saved, tmp_path):
    """Both layouts: a tokenizer-only folder (tokenizer_config auto_map) and a checkpoint with config.json."""
    tokenizer, folder = saved
    checkpoint = str(tmp_path / "with_config")
    GcmrConfig().save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    assert_same_tokenizer(AutoTokenizer.from_pretrained(checkpoint), tokenizer)  # registered for GcmrConfig
    code = f"""
    import json
    from transformers import AutoTokenizer
    try:
        AutoTokenizer.from_pretrained({folder!r}, trust_remote_code=False)
        refused = False
    except ValueError:
        refused = True
    results = {{"refused": refused}}
    for name, path in (("tokenizer_only", {folder!r}), ("checkpoint", {checkpoint!r})):
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        keys = list(tok.keys)
        results[name] = {{
            "module": type(tok).__module__,
            "queries": tok({QUERIES!r})["input_ids"],
            "identifiers": [tok.identifier_ids(k) for k in keys],
            "keys_back": tok.keys_for(tok.encode_identifiers(keys)),
            "signature": tok.identifier_signature,
        }}
    print(json.dumps(results))
    """
    out = run_without_package(code, cwd=str(tmp_path))
    assert out["refused"]
    for name in ("tokenizer_only", "checkpoint"):
        result = out[name]
        assert result["module"].startswith("transformers_modules."), name
        assert result["queries"] == tokenizer(QUERIES)["input_ids"]
        assert result["identifiers"] == [tokenizer.identifier_ids(k) for k in tokenizer.keys]
        assert result["keys_back"] == list(tokenizer.keys)
        assert result["signature"] == tokenizer.identifier_signature


def truncate(path):
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])


def other_version(path):
    with open(path) as handle:
        header = json.load(handle)
    header["format_version"] = 99
    with open(path, "w") as handle:
        json.dump(header, handle)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda folder: os.remove(os.path.join(folder, TABLE_HEADER_NAME)), r"identifier table file is missing: .*identifier_table\.json"),
        (lambda folder: os.remove(os.path.join(folder, TABLE_WEIGHTS_NAME)), r"identifier table file is missing: .*identifier_table\.safetensors"),
        (lambda folder: truncate(os.path.join(folder, TABLE_HEADER_NAME)), r"identifier_table\.json is not valid JSON \(truncated\?\)"),
        (lambda folder: truncate(os.path.join(folder, TABLE_WEIGHTS_NAME)), r"identifier_table\.safetensors cannot be read"),
        (lambda folder: other_version(os.path.join(folder, TABLE_HEADER_NAME)), r"format_version 99"),
    ],
    ids=["header-missing", "weights-missing", "header-truncated", "weights-truncated", "other-version"],
)
def test_damaged_tables_fail_with_a_clear_error(saved, damage, message):
    _, folder = saved
    damage(folder)
    with pytest.raises(IdentifierTableError, match=message):
        ImageIdTokenizer.from_pretrained(folder)
    with pytest.raises(IdentifierTableError, match=message):
        AutoTokenizer.from_pretrained(folder)


def test_table_files_from_another_table_are_refused(saved, tmp_path, prefix_table):
    _, folder = saved
    prefix_table.save(str(tmp_path / "other"))
    os.replace(tmp_path / "other" / TABLE_WEIGHTS_NAME, os.path.join(folder, TABLE_WEIGHTS_NAME))
    with pytest.raises(IdentifierTableError, match="do not agree|content hash mismatch"):
        ImageIdTokenizer.from_pretrained(folder)


def test_missing_text_tokenizer_file_is_named(saved):
    _, folder = saved
    os.remove(os.path.join(folder, "text_tokenizer.json"))
    with pytest.raises(ValueError, match=r"text tokenizer file is missing: .*text_tokenizer\.json"):
        ImageIdTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("model", ["wordpiece", "unigram"])
def test_trained_text_tokenizer_follows_t5_conventions(model, caption_corpus):
    tokenizer = train_text_tokenizer(caption_corpus + [q.lower() for q in QUERIES] * 20, vocab_size=120, model=model)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert 10 < len(tokenizer) <= 120
    ids = tokenizer("A Red Circle")["input_ids"]
    assert ids[-1] == 1 and 2 not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red circle"
    with pytest.raises(ValueError, match="model must be"):
        train_text_tokenizer(caption_corpus, model="bpe")


def test_identifier_signature_tracks_table_and_text_vocabulary(prefix_table, caption_corpus, corpus, text_tokenizer, make_id_tokenizer):
    tokenizer = make_id_tokenizer(prefix_table)
    assert tokenizer.identifier_signature == make_id_tokenizer(prefix_table).identifier_signature
    other_table = make_id_tokenizer(build_table("atomic", corpus, text_tokenizer))
    other_text = ImageIdTokenizer(bert_style_tokenizer(caption_corpus), prefix_table)
    signatures = {tokenizer.identifier_signature, other_table.identifier_signature, other_text.identifier_signature}
    assert len(signatures) == 3 and all(len(s) == 64 for s in signatures)


def test_trained_wordpiece_vocabulary_is_the_same_in_every_process(caption_corpus, tmp_path):
    """Distributed ranks each train the vocabulary; tokenizers' own WordPiece trainer differs run to run."""
    import json
    import subprocess
    import sys

    corpus_file = tmp_path / "captions.json"
    corpus_file.write_text(json.dumps(caption_corpus))
    code = (
        "import json, sys; from tokenization_gcmr.builders.text_vocabulary import train_text_tokenizer; "
        f"texts = json.load(open({str(corpus_file)!r})); "
        "print(json.dumps(sorted(train_text_tokenizer(texts, vocab_size=150).get_vocab().items())))"
    )
    vocabularies = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(3)
    ]
    assert vocabularies[0] == vocabularies[1] == vocabularies[2]
    in_process = train_text_tokenizer(caption_corpus, vocab_size=150)
    assert json.loads(vocabularies[0]) == [list(item) for item in sorted(in_process.get_vocab().items())]
    # Words outside the vocabulary are spelled with character pieces, never lost to <unk>.
    assert in_process.unk_token_id not in in_process("a circlesquarered bluecircle")["input_ids"]


def test_saved_files_get_the_usual_permissions(tmp_path, make_id_tokenizer, prefix_table):
    """Atomic writes go through tempfile (0600); a checkpoint must still be readable like any new file."""
    mask = os.umask(0o022)
    try:
        make_id_tokenizer(prefix_table).save_pretrained(str(tmp_path))
    finally:
        os.umask(mask)
    modes = {path.name: path.stat().st_mode & 0o777 for path in tmp_path.iterdir() if path.is_file()}
    assert {"text_tokenizer.json", "identifier_table.json", "identifier_table.safetensors"} <= set(modes)
    assert set(modes.values()) == {0o644}, modes
