"""The search page (examples/app.py): a real server process queried with gradio_client, and its searcher in process.

The keys the page returns must be exactly those of `retrieve()` on the same checkpoint, before and after requests
that the page refuses with a message.
"""
import importlib.util
import json
import shutil
import struct
import sys
import urllib.request
import zlib
from pathlib import Path

import pytest
import torch
from app_server import APP, MISSING_KEYS, NUM_IMAGES, AppServer, saved_collection, tiny_retriever
from PIL import Image
from transformers import AutoModel, AutoTokenizer

from modeling_gcmr.training.collator import build_image_processor
from modeling_gcmr.training.synthetic import make_synthetic_corpus, write_imagefolder

gradio_client = pytest.importorskip("gradio_client", reason="the app extra is not installed: pip install -e '.[app]'")

QUERIES = ["a red circle to the left of a blue square", "a green cross above a pink diamond", "yellow triangle"]


def load_app_module():
    spec = importlib.util.spec_from_file_location("gcmr_search_app", APP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def app():
    return load_app_module()


@pytest.fixture(scope="module")
def collection(tmp_path_factory, text_tokenizer):
    return saved_collection(tmp_path_factory.mktemp("app"), text_tokenizer)


@pytest.fixture(scope="module")
def reference(collection):
    """The checkpoint loaded the way the app loads it, to compute the expected results in this process."""
    checkpoint, _ = collection
    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    return model, AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)


@pytest.fixture(scope="module")
def server(collection, tmp_path_factory, monkeypatch_module):
    """The app as a Space runs it: `app.py` copied next to `retriever/` and `images/`, started without arguments."""
    checkpoint, images = collection
    space_app = shutil.copy(APP, checkpoint.parent / "app.py")
    temp = tmp_path_factory.mktemp("gradio")
    monkeypatch_module.setenv("GRADIO_TEMP_DIR", str(temp))  # the server's upload cache
    server = AppServer(Path(space_app), [], temp / "server.log")
    yield server
    output = server.stop()
    # Gradio logs the requests its own input checks refuse; a search of this app must never fail unexpectedly.
    assert "gcmr.app: search failed" not in output, output


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server.url, verbose=False, download_files=False)


def expected_text(reference, query, top_k):
    model, tokenizer = reference
    return model.retrieve([query], tokenizer, top_k=top_k)[0]


def assert_same_hits(table, expected, tokenizer):
    """The page's result table against retrieve(): keys exactly, scores to rounding, identifiers token for token."""
    assert table["headers"] == ["rank", "image_key", "score", "identifier"]
    rows = table["data"]
    assert [row[1] for row in rows] == [key for key, _ in expected]
    assert [row[0] for row in rows] == list(range(1, len(expected) + 1))
    assert [row[2] for row in rows] == pytest.approx([score for _, score in expected], abs=1e-3)
    for _, key, _, identifier in rows:
        assert identifier.split() == tokenizer.convert_ids_to_tokens(tokenizer.identifier_ids(key))


def test_text_search_returns_the_keys_of_retrieve(client, reference):
    tokenizer = reference[1]
    for query, top_k in zip(QUERIES, (1, 5, NUM_IMAGES)):
        html, table, status = client.predict(query, top_k, api_name="/search")
        expected = expected_text(reference, query, top_k)
        assert_same_hits(table, expected, tokenizer)
        assert status.startswith(f"{len(expected)} results")
        # The cards, in the same order; a thumbnail for each image the folder has, a placeholder for the others.
        for rank, (key, _) in enumerate(expected, start=1):
            start = html.index(f'data-key="{key}" data-rank="{rank}"')
            card = html[start: html.index("</figure>", start)]
            assert ('class="gcmr-thumb" src="data:image/png;base64,' in card) == (key not in MISSING_KEYS)
            assert "&lt;c_" in card  # the identifier's coarse token, escaped


@pytest.mark.parametrize("query, message", [
    ("", "The search box is empty"),
    ("   \n ", "The search box is empty"),
    ("x" * 10_000, "The query has 10,000 characters; the limit is 1,000"),
])
def test_a_bad_query_gets_a_message_and_the_server_keeps_serving(client, server, reference, query, message):
    html, table, status = client.predict(query, 5, api_name="/search")
    assert message in status and html == "" and table["data"] == []
    assert server.alive()
    assert_same_hits(client.predict(QUERIES[0], 5, api_name="/search")[1], expected_text(reference, QUERIES[0], 5),
                     reference[1])


def test_bad_uploads_and_values_get_a_message_and_the_server_keeps_serving(client, server, reference, tmp_path):
    fake = tmp_path / "holiday.png"
    fake.write_text("this is text, not a PNG")
    _, table, status = client.predict(gradio_client.handle_file(str(fake)), 3, api_name="/search_upload")
    assert "'holiday.png' is not an image file that can be read" in status and table["data"] == []
    notes = tmp_path / "notes.txt"
    notes.write_text("text")
    with pytest.raises(gradio_client.exceptions.AppError, match="Invalid file type"):
        client.predict(gradio_client.handle_file(str(notes)), 3, api_name="/search_upload")
    # The picker offers the images the folder has; Gradio refuses any other value.
    with pytest.raises(gradio_client.exceptions.AppError, match="not in the list of choices"):
        client.predict(MISSING_KEYS[0], 3, api_name="/search_collection_image")
    assert server.alive()
    assert_same_hits(client.predict(QUERIES[1], 4, api_name="/search")[1], expected_text(reference, QUERIES[1], 4),
                     reference[1])


@pytest.mark.parametrize("top_k", [2.5, "abc", 0])
def test_top_k_is_judged_by_retrieves_own_check_with_a_message(client, server, reference, top_k):
    """2.5 was rounded to 2 by Gradio's slider where retrieve() refuses it; "abc" got Gradio's generic error."""
    model, tokenizer = reference
    with pytest.raises(ValueError) as refused:
        model.retrieve([QUERIES[0]], tokenizer, top_k=top_k)
    html, table, status = client.predict(QUERIES[0], top_k, api_name="/search")
    assert str(refused.value) in status and "top_k must be a positive int" in status
    assert html == "" and table["data"] == []
    _, table, status = client.predict(QUERIES[0], NUM_IMAGES + 1, api_name="/search")
    assert f"top_k must be a whole number from 1 to {NUM_IMAGES} (the page's limit), got {NUM_IMAGES + 1}" in status
    assert server.alive()
    assert_same_hits(client.predict(QUERIES[0], 3, api_name="/search")[1], expected_text(reference, QUERIES[0], 3),
                     tokenizer)


def test_image_search_goes_through_the_vision_tower(client, reference, collection):
    model, tokenizer = reference
    _, images = collection
    key = "syn_00001"
    with Image.open(images / f"{key}.png") as image:
        pixels = build_image_processor(model.config.vision_config)(images=[image.convert("RGB")],
                                                                  return_tensors="pt")["pixel_values"]
    expected = model.retrieve(tokenizer=tokenizer, top_k=4, pixel_values=pixels)[0]
    uploaded = client.predict(gradio_client.handle_file(str(images / f"{key}.png")), 4, api_name="/search_upload")
    assert_same_hits(uploaded[1], expected, tokenizer)
    picked = client.predict(key, 4, api_name="/search_collection_image")
    assert_same_hits(picked[1], expected, tokenizer)


def test_the_page_is_offline_and_names_the_images_the_folder_lacks(server, collection):
    with urllib.request.urlopen(server.url + "config", timeout=10) as response:
        config = json.load(response)
    assert config["analytics_enabled"] is False
    assert not [sheet for sheet in config["stylesheets"] if sheet.startswith(("http:", "https:", "//"))]
    notice = next(c["props"]["value"] for c in config["components"] if c["props"].get("elem_id") == "missing-images")
    assert f"{len(MISSING_KEYS)} of the {NUM_IMAGES} images" in notice
    assert all(key in notice for key in MISSING_KEYS)
    # Started without arguments, the app found retriever/ and images/ next to itself, and listens on loopback.
    assert f"Running on local URL:  http://127.0.0.1:{server.port}" in server.output()
    assert f"{collection[0]} ({NUM_IMAGES} images, {NUM_IMAGES - len(MISSING_KEYS)} with a file)" in server.output()


# In process: the stored-features path, the image index, the start-up errors.

def test_stored_image_features_search_collection_images(app, text_tokenizer, tmp_path):
    corpus = make_synthetic_corpus(8, captions_per_image=2, seed=5)
    model, tokenizer = tiny_retriever(text_tokenizer, corpus, vision=False)
    features = dict(zip(corpus["image_key"], corpus["image_embeds"]))
    model.store_image_features(torch.tensor([features[key] for key in tokenizer.keys]))
    images = app.index_images(write_imagefolder(corpus, tmp_path / "images"), tokenizer.keys)
    searcher = app.Searcher(model, tokenizer, images)
    assert searcher.searches_images and not searcher.takes_uploads
    key = tokenizer.keys[3]
    expected = model.retrieve(tokenizer=tokenizer, top_k=3, image_embeds=model.stored_image_features[3:4])[0]
    assert searcher.collection_image(key, 3) == expected
    html, rows, status = app.respond(searcher, searcher.upload, str(tmp_path / "images" / f"{key}.png"), 3)
    assert "no vision tower" in status and rows == []
    names = [d["api_name"] for d in app.build_page(searcher).config["dependencies"]]
    assert "search_collection_image" in names and "search_upload" not in names


def test_collection_keys_without_a_usable_image_get_a_message(app, reference, collection):
    model, tokenizer = reference
    checkpoint, images = collection
    searcher = app.Searcher(model, tokenizer, app.index_images(images, tokenizer.keys))
    with pytest.raises(app.SearchError, match="'no_such_key' is not an image key of this checkpoint"):
        searcher.collection_image("no_such_key", 3)
    with pytest.raises(app.SearchError, match=f"The image of '{MISSING_KEYS[0]}' is not in"):
        searcher.collection_image(MISSING_KEYS[0], 3)
    with pytest.raises(app.SearchError, match=r"top_k must be a whole number from 1 to 12 \(the page's limit\)"):
        searcher.text(QUERIES[0], 13)
    damaged = app.ImageCollection(images, {"syn_00001": checkpoint / "config.json"}, [])
    with pytest.raises(app.SearchError, match="The image file of 'syn_00001' .* cannot be read"):
        app.Searcher(model, tokenizer, damaged).collection_image("syn_00001", 3)
    assert app.Searcher(model, tokenizer, damaged).thumbnail("syn_00001") is None  # a placeholder, not a crash


def test_an_unexpected_failure_becomes_a_message(app, reference, collection):
    model, tokenizer = reference
    searcher = app.Searcher(model, tokenizer, app.index_images(collection[1], tokenizer.keys))

    def broken(query, top_k):
        raise RuntimeError("out of memory")

    html, rows, status = app.respond(searcher, broken, QUERIES[0], 3)
    assert (html, rows) == ("", [])
    assert status == "**The search failed** (RuntimeError: out of memory). The server is still running."


def test_a_checkpoint_without_images_gets_no_image_tab(app, text_tokenizer, tmp_path):
    corpus = make_synthetic_corpus(6, captions_per_image=1, seed=6)
    model, tokenizer = tiny_retriever(text_tokenizer, corpus, vision=False)
    images = app.index_images(write_imagefolder(corpus, tmp_path / "images"), tokenizer.keys)
    searcher = app.Searcher(model, tokenizer, images)
    assert not searcher.searches_images
    names = [d["api_name"] for d in app.build_page(searcher).config["dependencies"]]
    assert "search" in names and "search_collection_image" not in names


def test_index_images_reads_metadata_keys_and_file_names(app, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "photo_a.png")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "beach.jpg")
    (tmp_path / "readme.txt").write_text("not an image")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "photo_a.png", "image_key": "alice"}\nnot json\n')
    collection = app.index_images(tmp_path, ["alice", "beach", "zebra"])
    assert collection.paths == {"alice": tmp_path / "photo_a.png", "beach": tmp_path / "sub" / "beach.jpg"}
    assert collection.missing == ["zebra"]
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        app.index_images(tmp_path / "nowhere", ["alice"])


def test_the_app_refuses_to_start_on_a_folder_that_does_not_exist(app, collection, tmp_path):
    checkpoint, _ = collection
    with pytest.raises(SystemExit, match="cannot start the search page: --images .* is not a folder"):
        app.main(["--retriever", str(checkpoint), "--images", str(tmp_path / "typo")])


def test_the_server_listens_on_loopback_unless_in_a_space(app, monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert app.server_name(None) == "127.0.0.1"
    monkeypatch.setenv("SPACE_ID", "you/gcmr-search")
    assert app.server_name(None) == "0.0.0.0"
    assert app.server_name("127.0.0.1") == "127.0.0.1"


def _write_png(path: Path, width: int, height: int) -> Path:
    """An image of `width` x `height` pixels that costs little to write (1 bit a pixel, all black, compressed)."""
    Image.new("1", (width, height)).save(path)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_an_upload_over_the_size_limit_gets_advice_not_a_memory_error(app, reference, collection, tmp_path):
    model, tokenizer = reference
    searcher = app.Searcher(model, tokenizer, app.index_images(collection[1], tokenizer.keys))
    huge = _write_png(tmp_path / "poster.png", 12000, 12000)  # 17 KB on disk, 432 MB as RGB
    html, rows, status = app.respond(searcher, searcher.upload, str(huge), 3)
    assert (html, rows) == ("", [])
    assert "'poster.png' is 12000 x 12000 pixels (144,000,000); the page reads images of up to 64,000,000" in status
    assert "shrink it" in status and "MemoryError" not in status
    # Over twice PIL's own limit PIL refuses to open it at all: still the same advice.
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
                     + _png_chunk(b"IDAT", zlib.compress(b"")) + _png_chunk(b"IEND", b""))  # claims 30000 x 30000
    _, _, status = app.respond(searcher, searcher.upload, str(bomb), 3)
    assert "'bomb.png' is too large to open; the page reads images of up to 64,000,000 pixels" in status, status
    assert "shrink it" in status


def test_image_paths_are_confined_to_the_images_folder_as_the_corpus_loader_confines_them(app, reference,
                                                                                          collection, tmp_path):
    model, tokenizer = reference
    key_out, key_abs, key_link = tokenizer.keys[:3]
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "outside").mkdir()
    _write_png(tmp_path / "outside" / "secret.png", 8, 8)
    (images / "linked.png").symlink_to(tmp_path / "outside" / "secret.png")
    rows = [{"image_key": key_out, "file_name": "../outside/secret.png"},
            {"image_key": key_abs, "file_name": "/etc/passwd"},
            {"image_key": key_link, "file_name": "linked.png"}]
    (images / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    index = app.index_images(images, tokenizer.keys)
    assert not {key_out, key_abs, key_link} & set(index.paths)
    assert {key_out, key_abs, key_link} <= set(index.missing)
    assert any("line 1 file_name '../outside/secret.png'" in place for place in index.outside), index.outside
    assert any("line 2 file_name '/etc/passwd'" in place for place in index.outside), index.outside
    assert any(place.startswith("file: ") and place.endswith("linked.png") for place in index.outside)
    searcher = app.Searcher(model, tokenizer, index)
    assert all(searcher.thumbnail(key) is None for key in (key_out, key_abs, key_link))  # nothing inlined
    html, _, _ = app.respond(searcher, searcher.text, QUERIES[0], len(tokenizer.keys))
    assert "data:image/png" not in html  # no result of this folder has an image inside it
    notice = next(c["props"]["value"] for c in app.build_page(searcher).config["components"]
                  if c["props"].get("elem_id") == "outside-images")
    # linked.png counts twice: as a file of the folder and as line 3.
    assert "4 image path(s) lead outside" in notice and "--allow_paths_outside_images" in notice
    # The corpus loader refuses the same path with the same helper.
    from modeling_gcmr.training.corpus_values import image_ref

    _, problem = image_ref("../outside/secret.png", "file_name", images, images.resolve())
    assert "outside the corpus folder" in problem
    # Trusted, they are shown.
    trusted = app.index_images(images, tokenizer.keys, allow_outside=True)
    assert trusted.paths[key_out] == images / "../outside/secret.png" and trusted.outside == []


def test_removed_images_are_not_offered_and_top_k_counts_the_live_ones(app, text_tokenizer, tmp_path):
    corpus = make_synthetic_corpus(8, captions_per_image=2, seed=5)
    model, tokenizer = tiny_retriever(text_tokenizer, corpus, vision=False)
    features = dict(zip(corpus["image_key"], corpus["image_embeds"]))
    model.store_image_features(torch.tensor([features[key] for key in tokenizer.keys]))
    removed = list(tokenizer.keys[:3])
    model.remove_images(removed, tokenizer)
    live = [key for key in tokenizer.keys if key not in removed]
    searcher = app.Searcher(model, tokenizer, app.index_images(write_imagefolder(corpus, tmp_path / "images"),
                                                               tokenizer.current_keys), max_top_k=20)
    assert searcher.max_top_k == len(live) == 5
    components = {c["props"].get("elem_id"): c["props"] for c in app.build_page(searcher).config["components"]}
    offered = [choice[0] if isinstance(choice, (list, tuple)) else choice
               for choice in components["collection-key"]["choices"]]
    assert offered == sorted(live)
    assert components["top-k"]["maximum"] == len(live)
    with pytest.raises(app.SearchError, match=f"'{removed[0]}' was removed from the collection"):
        searcher.collection_image(removed[0], 3)
    hits = searcher.collection_image(live[0], 5)
    assert len(hits) == 5 and not {key for key, _ in hits} & set(removed)


def test_the_app_serves_in_bfloat16_when_asked_and_ranks_as_float32(app, collection, reference):
    checkpoint, images = collection
    model, tokenizer = app.load_retriever(str(checkpoint), "bfloat16")
    assert model.dtype == torch.bfloat16 and reference[0].dtype == torch.float32
    searcher = app.Searcher(model.eval(), tokenizer, app.index_images(images, tokenizer.keys))
    html, rows, status = app.respond(searcher, searcher.text, QUERIES[0], 3)
    assert status.startswith("3 results")
    # rounding may swap two near-equal scores; the keys are the float32 top 5's and the scores agree to rounding
    expected = dict(expected_text(reference, QUERIES[0], 5))
    assert {row[1] for row in rows} <= set(expected)
    assert [row[2] for row in rows] == pytest.approx([expected[row[1]] for row in rows], abs=2e-2, rel=2e-2)
    with pytest.raises(ValueError, match="--dtype must be one of float32, bfloat16, float16, got 'half'"):
        app.load_retriever(str(checkpoint), "half")
