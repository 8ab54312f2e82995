"""The built-in synthetic image-caption corpus: two coloured shapes per image, with compositional captions.

API (stable; the demo, the examples and the tests build on it):

    make_synthetic_corpus(num_images, image_size=32, captions_per_image=3, seed=0) -> datasets.Dataset
    write_imagefolder(dataset, folder) -> Path     # images + metadata.jsonl, loadable with load_corpus(folder)
    synthetic_features(attributes, seed=0) -> np.ndarray float32 (N, FEATURE_DIM)

Each image shows two different (colour, shape) objects side by side or one above the other, e.g. "a red
circle to the left of a blue square"; its captions are distinct paraphrases drawn from templates, so a query
names the scene without repeating a training caption word for word. Scenes are distinct across the corpus
(up to `max_synthetic_images()` = 3120 of them), so every caption has exactly one correct image.

The dataset columns are `image_key` (`syn_00000`, ...), `image` (PIL RGB, `datasets.Image`), `captions`
(list[str]), `image_embeds` (a cheap deterministic feature vector: one-hot colour/shape of each object and the
layout, plus small seeded noise, so identifiers can be built without any image encoder) and `attributes`
(the scene as a dict). Everything is a pure function of the arguments: the same seed gives the same bytes.
"""
from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path

import datasets
import numpy as np
from PIL import Image, ImageDraw

from ..atomic_write_gcmr import make_shareable

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 50),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "cyan": (60, 210, 220),
    "pink": (245, 150, 190),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
LAYOUTS = ("horizontal", "vertical")
FEATURE_DIM = 2 * (len(COLOURS) + len(SHAPES)) + len(LAYOUTS)
_BACKGROUND = (35, 35, 35)
_FEATURE_NOISE = 0.05

# {a} is the first object (left or top), {b} the second; each list holds paraphrases of one layout.
_TEMPLATES = {
    "horizontal": (
        "{a} to the left of {b}",
        "{b} to the right of {a}",
        "{a} on the left and {b} on the right",
        "{a} next to {b}, with {a_bare} on the left",
        "a picture of {a} beside {b} on its right",
        "on the right {b}, on the left {a}",
    ),
    "vertical": (
        "{a} above {b}",
        "{b} below {a}",
        "{a} on top and {b} at the bottom",
        "{a} stacked over {b}",
        "a picture of {b} under {a}",
        "at the bottom {b}, at the top {a}",
    ),
}


def max_synthetic_images() -> int:
    """How many distinct scenes exist: ordered pairs of different objects times the two layouts."""
    objects = len(COLOURS) * len(SHAPES)
    return objects * (objects - 1) * len(LAYOUTS)


def make_synthetic_corpus(
    num_images: int, image_size: int = 32, captions_per_image: int = 3, seed: int = 0
) -> datasets.Dataset:
    """Draw `num_images` distinct two-shape scenes with `captions_per_image` paraphrased captions each."""
    limit = max_synthetic_images()
    if not 1 <= num_images <= limit:
        raise ValueError(f"num_images must be between 1 and {limit} (the number of distinct scenes), got {num_images}")
    max_captions = len(_TEMPLATES["horizontal"])
    if not 1 <= captions_per_image <= max_captions:
        raise ValueError(f"captions_per_image must be between 1 and {max_captions}, got {captions_per_image}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels for the shapes to be drawable, got {image_size}")
    rng = np.random.default_rng(seed)
    objects = list(itertools.product(COLOURS, SHAPES))
    scenes = [(a, b, layout) for a, b in itertools.permutations(objects, 2) for layout in LAYOUTS]
    chosen = rng.choice(len(scenes), size=num_images, replace=False)
    rows: dict[str, list] = {"image_key": [], "image": [], "captions": [], "attributes": []}
    for index, scene_index in enumerate(chosen):
        (colour_a, shape_a), (colour_b, shape_b), layout = scenes[scene_index]
        attributes = {"colour_a": colour_a, "shape_a": shape_a, "colour_b": colour_b, "shape_b": shape_b, "layout": layout}
        rows["image_key"].append(f"syn_{index:05d}")
        rows["image"].append(_draw(attributes, image_size, rng))
        rows["captions"].append(_captions(attributes, captions_per_image, rng))
        rows["attributes"].append(attributes)
    rows["image_embeds"] = synthetic_features(rows["attributes"], seed=seed).tolist()
    features = datasets.Features(
        {
            "image_key": datasets.Value("string"),
            "image": datasets.Image(),
            "captions": datasets.Sequence(datasets.Value("string")),
            "attributes": {name: datasets.Value("string") for name in rows["attributes"][0]},
            "image_embeds": datasets.Sequence(datasets.Value("float32")),
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)


def synthetic_features(attributes: list[dict], seed: int = 0) -> np.ndarray:
    """One-hot colour and shape of both objects plus the layout, with seeded Gaussian noise (float32, (N, D))."""
    colours, shapes = list(COLOURS), list(SHAPES)
    features = np.zeros((len(attributes), FEATURE_DIM), dtype=np.float32)
    for row, scene in enumerate(attributes):
        offset = 0
        for slot in ("a", "b"):
            features[row, offset + colours.index(scene[f"colour_{slot}"])] = 1.0
            offset += len(colours)
            features[row, offset + shapes.index(scene[f"shape_{slot}"])] = 1.0
            offset += len(shapes)
        features[row, offset + LAYOUTS.index(scene["layout"])] = 1.0
    # A separate stream from the drawing one, so adding noise never changes the images.
    noise = np.random.default_rng([seed, 1]).normal(0.0, _FEATURE_NOISE, features.shape).astype(np.float32)
    return features + noise


def write_imagefolder(dataset: datasets.Dataset, folder: str | os.PathLike) -> Path:
    """Write `dataset` as an imagefolder: `<image_key>.png` files plus `metadata.jsonl`; atomic.

    The folder is built under a temporary name next to `folder` and renamed into place, so a reader never sees
    half a corpus. An existing `folder` is replaced. Columns other than `image` go into `metadata.jsonl`.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    make_shareable(staging, directory=True)
    try:
        with open(staging / "metadata.jsonl", "w", encoding="utf-8") as metadata:
            for row in dataset:
                file_name = f"{row['image_key']}.png"
                row["image"].save(staging / file_name, format="PNG")
                record = {"file_name": file_name, **{k: v for k, v in row.items() if k != "image"}}
                metadata.write(json.dumps(record) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _captions(attributes: dict, count: int, rng: np.random.Generator) -> list[str]:
    def named(slot: str) -> tuple[str, str]:
        bare = f"{attributes[f'colour_{slot}']} {attributes[f'shape_{slot}']}"
        return bare, ("an " if bare[0] in "aeiou" else "a ") + bare

    a_bare, a = named("a")
    b_bare, b = named("b")
    templates = _TEMPLATES[attributes["layout"]]
    picked = rng.choice(len(templates), size=count, replace=False)
    return [templates[i].format(a=a, b=b, a_bare="the " + a_bare) for i in picked]


def _draw(attributes: dict, size: int, rng: np.random.Generator) -> Image.Image:
    image = Image.new("RGB", (size, size), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    half = size / 2
    for slot, cell in (("a", 0), ("b", 1)):
        # The two objects occupy the two halves; jitter position and size a little so no two images of a
        # scene type are pixel-identical.
        radius = half * rng.uniform(0.28, 0.4)
        along = half * cell + half / 2 + rng.uniform(-0.08, 0.08) * half
        across = half + rng.uniform(-0.25, 0.25) * half
        cx, cy = (along, across) if attributes["layout"] == "horizontal" else (across, along)
        _shape(draw, attributes[f"shape_{slot}"], cx, cy, radius, COLOURS[attributes[f"colour_{slot}"]])
    # Round-trip through PNG so the in-memory image equals what write_imagefolder stores and reloads.
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue()))


def _shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour: tuple) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    else:  # cross
        w = r / 2.5
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
