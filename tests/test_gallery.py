"""The HTML result cards and the self-contained gallery page: every image inlined and readable, gold framed."""
import base64
import io
import os
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from modeling_gcmr.evaluation.gallery import (
    MISSING_IMAGE_TEXT,
    THUMBNAIL_SIDE,
    render_hits,
    thumbnail_data_uri,
    write_gallery,
)

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "grey": (128, 128, 128)}


class Figures(HTMLParser):
    """The page's result cards: per card its key, rank, css classes, image src (or None) and text."""

    def __init__(self):
        super().__init__()
        self.cards, self.headings, self._heading = [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self.cards.append({"key": attrs["data-key"], "rank": int(attrs["data-rank"]),
                               "classes": attrs["class"].split(), "src": None, "text": ""})
        elif tag == "img" and self.cards:
            self.cards[-1]["src"] = attrs["src"]
        elif tag == "h2":
            self._heading = ""

    def handle_endtag(self, tag):
        if tag == "h2":
            self.headings.append(self._heading)
            self._heading = None

    def handle_data(self, data):
        if self._heading is not None:
            self._heading += data
        elif self.cards:
            self.cards[-1]["text"] += data


def parse(html_text):
    parser = Figures()
    parser.feed(html_text)
    return parser


def decode(uri):
    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")


@pytest.fixture
def images(tmp_path):
    """Plain-colour 200x100 images: as PIL images, and one as a file path (both forms are accepted)."""
    by_key = {key: Image.new("RGB", (200, 100), colour) for key, colour in COLOURS.items()}
    by_key["grey"].save(tmp_path / "grey.png")
    by_key["grey"] = str(tmp_path / "grey.png")
    return by_key


def test_thumbnail_is_a_shrunk_png_of_the_image(images):
    thumbnail = decode(thumbnail_data_uri(images["red"]))
    assert thumbnail.size == (THUMBNAIL_SIDE, THUMBNAIL_SIDE // 2)  # aspect ratio kept
    assert thumbnail.getpixel((10, 10)) == COLOURS["red"]
    assert decode(thumbnail_data_uri(images["grey"], max_side=16)).size == (16, 8)
    with pytest.raises(ValueError, match="cannot read image file"):
        thumbnail_data_uri(os.devnull, key="nothing")


def test_render_hits_shows_rank_key_score_identifier_and_frames_gold(images):
    hits = [("green", -0.5), ("red", -1.25), ("gone", -2.0)]
    thumbnails = {key: thumbnail_data_uri(images[key]) for key in ("green", "red")}
    cards = parse(render_hits(hits, thumbnails, gold="red",
                              identifiers={"green": ["<c_1>", "<f1_0>"], "red": ["<c_0>", "<f1_3>"]})).cards
    assert [(card["key"], card["rank"]) for card in cards] == [("green", 1), ("red", 2), ("gone", 3)]
    assert decode(cards[0]["src"]).getpixel((5, 5)) == COLOURS["green"]
    assert "score -0.500" in cards[0]["text"] and "<c_1>" in cards[0]["text"] and "<f1_0>" in cards[0]["text"]
    assert "gcmr-gold" in cards[1]["classes"] and "correct" in cards[1]["text"]
    assert "gcmr-gold" not in cards[0]["classes"]
    assert cards[2]["src"] is None and MISSING_IMAGE_TEXT in cards[2]["text"]


def test_render_hits_escapes_keys_and_tokens():
    page = render_hits([("<b>x</b>", 0.0)], {}, identifiers={"<b>x</b>": ["<s&t>"]})
    assert "<b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page and "&lt;s&amp;t&gt;" in page


def test_gallery_inlines_every_image_and_puts_systems_side_by_side(tmp_path, images):
    queries = ["a red thing", "a <grey> thing"]
    generative = [[("red", -0.1), ("blue", -0.9), ("green", -1.0)], [{"image_key": "blue", "score": -0.3}]]
    dense = [[("blue", 0.8), ("red", 0.7)], [("grey", 0.9), ("red", 0.2)]]
    path = write_gallery(tmp_path / "out" / "gallery.html", queries, {"generative": generative, "dense": dense},
                         images, gold=["red", "grey"], top_k=2)
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    parsed = parse(page)
    assert parsed.headings[1].startswith("2. a <grey> thing")  # escaped in the file, readable in the page
    # top_k=2 per system and query: the third generative hit of query 1 is cut.
    assert [card["key"] for card in parsed.cards] == ["red", "blue", "blue", "red", "blue", "grey", "red"]
    for card in parsed.cards:  # every image is inlined and decodes to the image of its key
        pixel = decode(card["src"]).getpixel((3, 3))
        assert pixel == COLOURS[card["key"]]
    gold_cards = [(card["key"], card["rank"]) for card in parsed.cards if "gcmr-gold" in card["classes"]]
    assert gold_cards == [("red", 1), ("red", 2), ("grey", 1)]
    assert not [name for name in os.listdir(path.parent) if name != "gallery.html"]  # no temp file left


def test_gallery_shows_a_placeholder_for_an_image_it_does_not_have(tmp_path, images):
    path = write_gallery(tmp_path / "g.html", ["q"], {"generative": [[("red", 0.0), ("unknown", -1.0)]]}, images)
    cards = parse(path.read_text(encoding="utf-8")).cards
    assert cards[0]["src"] and cards[1]["src"] is None and MISSING_IMAGE_TEXT in cards[1]["text"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(queries=[]), "at least one query"),
    (dict(systems={}), "at least one system"),
    (dict(systems={"generative": []}), "system 'generative' has 0 hit lists for 1 queries"),
    (dict(gold=["red", "blue"]), "2 gold entries for 1 queries"),
    (dict(top_k=0), "top_k must be >= 1"),
])
def test_gallery_rejects_bad_input_and_writes_nothing(tmp_path, images, kwargs, message):
    arguments = dict(queries=["q"], systems={"generative": [[("red", 0.0)]]}, images_by_key=images, gold=None, top_k=5)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        write_gallery(tmp_path / "g.html", **arguments)
    assert not (tmp_path / "g.html").exists()


def test_thumbnail_accepts_arrays():
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[..., 2] = 255
    assert decode(thumbnail_data_uri(array)).getpixel((0, 0)) == (0, 0, 255)
