"""The figures: real PNG files of the expected pixel size, written atomically; bad input fails clearly."""
import os

import numpy as np
import pytest
from PIL import Image

from modeling_gcmr.evaluation.plotting import (
    CELL_HEIGHT_INCHES,
    CELL_WIDTH_INCHES,
    QUERY_TITLE_INCHES,
    plot_latency,
    plot_retrieved_images,
)


@pytest.fixture
def images_by_key(tmp_path):
    """Three keys: a PIL image, an array, and an image file on disk."""
    on_disk = tmp_path / "blue.png"
    Image.new("RGB", (32, 32), (0, 0, 255)).save(on_disk)
    return {
        "red": Image.new("RGB", (32, 32), (255, 0, 0)),
        "green": np.zeros((24, 24, 3), dtype=np.uint8) + np.array([0, 255, 0], dtype=np.uint8),
        "blue": str(on_disk),
    }


def _png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_retrieved_images_grid_has_one_row_per_query_and_a_column_per_hit(tmp_path, images_by_key):
    hits = [[("red", -0.1), ("green", -1.5), ("blue", -2.0)], [{"image_key": "blue", "score": -0.3, "rank": 1}]]
    path = tmp_path / "figs" / "retrieved.png"
    written = plot_retrieved_images(["a red square", "a blue square"], hits, images_by_key, path,
                                    gold=["red", ["blue"]], dpi=50)
    assert written == path
    width, height = _png_size(path)
    assert width == round(3 * CELL_WIDTH_INCHES * 50)
    assert height == round(2 * (CELL_HEIGHT_INCHES + QUERY_TITLE_INCHES) * 50)
    # Only the figure remains: the temp file was renamed into place.
    assert os.listdir(path.parent) == ["retrieved.png"]


def test_retrieved_images_top_k_limits_the_columns(tmp_path, images_by_key):
    hits = [[("red", 0.0), ("green", -1.0), ("blue", -2.0)]]
    path = plot_retrieved_images(["q"], hits, images_by_key, tmp_path / "top1.png", top_k=1, dpi=40)
    assert _png_size(path)[0] == round(CELL_WIDTH_INCHES * 40)


def test_retrieved_images_rejects_bad_input(tmp_path, images_by_key):
    out = tmp_path / "bad.png"
    with pytest.raises(ValueError, match="2 hit lists for 1 queries"):
        plot_retrieved_images(["q"], [[("red", 0.0)], []], images_by_key, out)
    with pytest.raises(KeyError, match="'purple' is not in images_by_key"):
        plot_retrieved_images(["q"], [[("purple", 0.0)]], images_by_key, out)
    with pytest.raises(ValueError, match="needs 'image_key' and 'score'"):
        plot_retrieved_images(["q"], [[{"key": "red"}]], images_by_key, out)
    with pytest.raises(ValueError, match="gold entries"):
        plot_retrieved_images(["q"], [[("red", 0.0)]], images_by_key, out, gold=["red", "blue"])
    with pytest.raises(ValueError, match="cannot read image file"):
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"not a png")
        plot_retrieved_images(["q"], [[("x", 0.0)]], {"x": str(broken)}, out)
    assert not out.exists()
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]


def test_latency_plot_is_written_with_the_requested_size(tmp_path):
    path = plot_latency({"generative": {1: 2.0, 5: 4.5, 10: 8.0}}, tmp_path / "latency.png",
                        reference={"dense": 0.5}, figsize=(5, 3), dpi=60)
    assert _png_size(path) == (300, 180)


def test_latency_plot_rejects_bad_points(tmp_path):
    with pytest.raises(ValueError, match="at least one series"):
        plot_latency({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="'generative' has no points"):
        plot_latency({"generative": {}}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"point \(5, nan\)"):
        plot_latency({"generative": {5: float("nan")}}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="reference 'dense'"):
        plot_latency({"generative": {1: 1.0}}, tmp_path / "x.png", reference={"dense": -1.0})
