"""A second built-in corpus, of glyphs: one coloured letter or digit on a coloured background per image.

    make_glyph_corpus(num_images, image_size=32, captions_per_image=3, seed=0) -> datasets.Dataset

Where the shapes corpus (`synthetic.py`) ships features that name every attribute, a glyph's `image_embeds` hold
only its colours (the mean glyph and background colour, RGB in [0, 1], with seeded noise): which character it is
lives in the pixels and the captions alone. Identifiers built from these features group images by colour, and a
model must read the rest from the image through its vision tower; that is the memorization test the benchmarks
run on pixels. Columns as in the shapes corpus: `image_key` (`gly_00000`, ...), `image`, `captions`,
`image_embeds`, `attributes`.
"""
from __future__ import annotations

import io
import itertools
import string

import datasets
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .synthetic import COLOURS

CHARACTERS = string.ascii_uppercase + string.digits
GLYPH_FEATURE_DIM = 6
_NOISE = 0.02
_TEMPLATES = (
    "the {kind} {char} in {fg} on {bg}",
    "a {fg} {char} on a {bg} background",
    "{bg} square with the {kind} {char} written in {fg}",
    "a picture of a {fg} {kind} {char}, background {bg}",
    "{char} drawn in {fg} over {bg}",
)


def max_glyph_images() -> int:
    """Distinct scenes: every character in every ordered pair of different colours."""
    return len(CHARACTERS) * len(COLOURS) * (len(COLOURS) - 1)


def make_glyph_corpus(num_images: int, image_size: int = 32, captions_per_image: int = 3,
                      seed: int = 0) -> datasets.Dataset:
    """Draw `num_images` distinct glyph scenes with `captions_per_image` paraphrased captions each."""
    if not 1 <= num_images <= max_glyph_images():
        raise ValueError(f"num_images must be between 1 and {max_glyph_images()}, got {num_images}")
    if not 1 <= captions_per_image <= len(_TEMPLATES):
        raise ValueError(f"captions_per_image must be between 1 and {len(_TEMPLATES)}, got {captions_per_image}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    rng = np.random.default_rng(seed)
    scenes = [(char, fg, bg) for char in CHARACTERS for fg, bg in itertools.permutations(COLOURS, 2)]
    font = ImageFont.load_default(size=int(image_size * 0.7))
    rows: dict[str, list] = {"image_key": [], "image": [], "captions": [], "image_embeds": [], "attributes": []}
    for index, scene in enumerate(rng.choice(len(scenes), size=num_images, replace=False)):
        char, fg, bg = scenes[scene]
        kind = "digit" if char.isdigit() else "letter"
        picked = rng.choice(len(_TEMPLATES), size=captions_per_image, replace=False)
        rows["image_key"].append(f"gly_{index:05d}")
        rows["image"].append(_draw(char, fg, bg, image_size, font, rng))
        rows["captions"].append([_TEMPLATES[i].format(kind=kind, char=char, fg=fg, bg=bg) for i in picked])
        colours = np.array(COLOURS[fg] + COLOURS[bg], dtype=np.float32) / 255.0
        rows["image_embeds"].append((colours + rng.normal(0.0, _NOISE, GLYPH_FEATURE_DIM)).astype(np.float32).tolist())
        rows["attributes"].append({"character": char, "colour": fg, "background": bg})
    features = datasets.Features({
        "image_key": datasets.Value("string"),
        "image": datasets.Image(),
        "captions": datasets.Sequence(datasets.Value("string")),
        "image_embeds": datasets.Sequence(datasets.Value("float32")),
        "attributes": {name: datasets.Value("string") for name in ("character", "colour", "background")},
    })
    return datasets.Dataset.from_dict(rows, features=features)


def _draw(char: str, fg: str, bg: str, size: int, font: ImageFont.ImageFont, rng: np.random.Generator) -> Image.Image:
    image = Image.new("RGB", (size, size), COLOURS[bg])
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
    # Centred, with a small seeded shift so no two images of a character are pixel-identical.
    x = (size - (right - left)) / 2 - left + rng.uniform(-0.08, 0.08) * size
    y = (size - (bottom - top)) / 2 - top + rng.uniform(-0.08, 0.08) * size
    draw.text((x, y), char, fill=COLOURS[fg], font=font)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue()))


__all__ = ["CHARACTERS", "GLYPH_FEATURE_DIM", "make_glyph_corpus", "max_glyph_images"]
