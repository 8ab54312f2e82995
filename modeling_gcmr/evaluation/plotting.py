"""Figures people would rather look at than read: retrieved images per query, recall curves and decoding latency.

Also Recall@k curves of several systems on the same queries. matplotlib is imported
lazily, with the non-interactive Agg backend, so importing this module costs nothing and works
headless. Every figure is written atomically (a temp name in the same folder, then `os.replace`).
"""
from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

from ..atomic_write_gcmr import atomic_write
from .metrics import Gold, retrieval_metrics

# A thumbnail cell, in inches: the image plus one line of rank/score text above it.
CELL_WIDTH_INCHES = 1.6
CELL_HEIGHT_INCHES = 1.9
# The strip above each row that holds the query text.
QUERY_TITLE_INCHES = 0.45
GOLD_COLOR = "#1a9850"
OTHER_COLOR = "#bdbdbd"

ImageLike = Union[Image.Image, np.ndarray, str, os.PathLike]
Hit = Union[tuple[str, float], Mapping[str, Any]]


def plot_retrieved_images(
    queries: Sequence[str],
    hits: Sequence[Sequence[Hit]],
    images_by_key: Mapping[str, ImageLike],
    path: str | os.PathLike,
    gold: Sequence[str | Sequence[str] | None] | None = None,
    top_k: int | None = None,
    dpi: int = 100,
) -> Path:
    """Draw one row per query (the query text as the row title) with its top-k images, best first.

    ``hits[i]`` holds query i's results as ``(image_key, score)`` pairs (what `GcmrForRetrieval.retrieve`
    returns) or as the pipeline's ``{"image_key", "score", ...}`` dicts. ``images_by_key`` maps an image key
    to a PIL image, an array or an image file path. ``gold[i]`` is query i's relevant key (or keys); gold
    thumbnails get a green frame. The figure is ``columns * CELL_WIDTH_INCHES`` wide and
    ``rows * (CELL_HEIGHT_INCHES + QUERY_TITLE_INCHES)`` high at ``dpi``. Returns the written path.
    """
    if len(queries) == 0:
        raise ValueError("plot_retrieved_images needs at least one query")
    if len(hits) != len(queries):
        raise ValueError(f"got {len(hits)} hit lists for {len(queries)} queries; expected one list per query")
    if gold is not None and len(gold) != len(queries):
        raise ValueError(f"got {len(gold)} gold entries for {len(queries)} queries; expected one per query")
    rows = [[_as_pair(hit, query_index, rank) for rank, hit in enumerate(query_hits)]
            for query_index, query_hits in enumerate(hits)]
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        rows = [row[:top_k] for row in rows]
    for query_index, row in enumerate(rows):
        for key, _ in row:
            if key not in images_by_key:
                raise KeyError(f"query {query_index}: retrieved image key {key!r} is not in images_by_key")
    columns = max(1, max(len(row) for row in rows))

    plt = _pyplot()
    row_height = CELL_HEIGHT_INCHES + QUERY_TITLE_INCHES
    figure = plt.figure(figsize=(columns * CELL_WIDTH_INCHES, len(rows) * row_height), dpi=dpi)
    subfigures = np.atleast_1d(figure.subfigures(len(rows), 1))
    wrap_width = max(20, int(columns * CELL_WIDTH_INCHES * 13))
    try:
        for query_index, (subfigure, query, row) in enumerate(zip(subfigures, queries, rows)):
            gold_keys = _gold_set(gold[query_index] if gold is not None else None)
            subfigure.suptitle(textwrap.shorten(str(query), wrap_width, placeholder="..."), fontsize=10, y=0.98)
            axes = np.atleast_1d(subfigure.subplots(1, columns))
            subfigure.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - QUERY_TITLE_INCHES / row_height - 0.08,
                                      wspace=0.08)
            for column, axis in enumerate(axes):
                axis.set_xticks([])
                axis.set_yticks([])
                if column >= len(row):
                    axis.set_axis_off()
                    continue
                key, score = row[column]
                axis.imshow(_load_image(images_by_key[key], key))
                is_gold = key in gold_keys
                color = GOLD_COLOR if is_gold else OTHER_COLOR
                for spine in axis.spines.values():
                    spine.set_edgecolor(color)
                    spine.set_linewidth(4 if is_gold else 1)
                label = f"#{column + 1}  {score:.2f}" + ("  gold" if is_gold else "")
                axis.set_title(label, fontsize=8, color=GOLD_COLOR if is_gold else "black")
        return _save_atomically(figure, path)
    finally:
        plt.close(figure)


def plot_recall_curve(
    rankings_by_name: Mapping[str, Sequence[Sequence[str]]],
    gold: Sequence[Gold],
    path: str | os.PathLike,
    max_k: int = 10,
) -> Path:
    """Plot Recall@k against k = 1..max_k, one line per system (all ranked for the same queries); PNG, atomic."""
    if not rankings_by_name:
        raise ValueError("plot_recall_curve needs at least one system")
    plt = _pyplot()
    ks = list(range(1, max_k + 1))
    figure, axes = plt.subplots(figsize=(5, 3.5))
    for name, rankings in rankings_by_name.items():
        metrics = retrieval_metrics(rankings, gold, ks=ks)
        axes.plot(ks, [metrics[f"recall@{k}"] for k in ks], marker="o", label=name)
    axes.set(xlabel="k", ylabel="Recall@k", ylim=(0, 1.02), xticks=ks, title=f"Recall@k over {len(gold)} queries")
    return _finish_line_plot(plt, figure, axes, path)


def plot_training_curves(
    curves: Mapping[str, Sequence[Mapping[str, float]]],
    path: str | os.PathLike,
    metric: str = "recall@1",
    reference: Mapping[str, float] | None = None,
) -> Path:
    """`metric` against training minutes, one line per run (points: dicts with `train_minutes` and `metric`), with
    horizontal lines for reference systems (e.g. dense search); PNG, atomic."""
    if not curves or not any(curves.values()):
        raise ValueError("plot_training_curves needs at least one run with points")
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5.5, 3.5))
    for name, points in curves.items():
        axes.plot([p["train_minutes"] for p in points], [p[metric] for p in points], marker="o", label=name)
    for name, value in (reference or {}).items():
        axes.axhline(value, linestyle="--", color="grey", linewidth=1)
        axes.annotate(name, (0, value), textcoords="offset points", xytext=(2, 3), fontsize=8, color="grey")
    axes.set(xlabel="training minutes", ylabel=metric, ylim=(0, 1.02), title=f"{metric} against training time")
    return _finish_line_plot(plt, figure, axes, path)


def _finish_line_plot(plt, figure, axes, path: str | os.PathLike) -> Path:
    """Grid, legend, layout, then the PNG written atomically at 120 dpi; the figure is closed either way."""
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    try:
        figure.set_dpi(120)
        return _save_atomically(figure, path)
    finally:
        plt.close(figure)


def plot_latency(
    series: Mapping[str, Mapping[float, float]],
    path: str | os.PathLike,
    x_label: str = "beams",
    y_label: str = "latency per query (ms)",
    title: str = "Retrieval latency",
    reference: Mapping[str, float] | None = None,
    log_x: bool = False,
    figsize: tuple[float, float] = (6.0, 4.0),
    dpi: int = 100,
) -> Path:
    """Line plot of latency: ``series[name][x] = y`` (e.g. ms per query vs beams or vs corpus size).

    ``reference[name] = y`` draws a dashed horizontal line, for a method whose latency does not depend on x
    (the dense baseline when x is the beam width). Returns the written path.
    """
    if not series and not reference:
        raise ValueError("plot_latency needs at least one series or reference line")
    for name, points in series.items():
        if not points:
            raise ValueError(f"latency series {name!r} has no points")
        for x, y in points.items():
            if not (np.isfinite(float(x)) and np.isfinite(float(y))) or float(y) < 0:
                raise ValueError(f"latency series {name!r}: point ({x}, {y}) must be finite with a latency >= 0")
    for name, y in (reference or {}).items():
        if not np.isfinite(float(y)) or float(y) < 0:
            raise ValueError(f"reference {name!r}: latency {y} must be finite and >= 0")

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=figsize, dpi=dpi)
    try:
        for name, points in series.items():
            xs = sorted(points, key=float)
            axis.plot([float(x) for x in xs], [float(points[x]) for x in xs], marker="o", label=name)
        for name, y in (reference or {}).items():
            axis.axhline(float(y), linestyle="--", color="grey", label=name)
        if log_x:
            axis.set_xscale("log")
        axis.set_xlabel(x_label)
        axis.set_ylabel(y_label)
        axis.set_title(title)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        figure.tight_layout()
        return _save_atomically(figure, path)
    finally:
        plt.close(figure)


def _pyplot():
    """matplotlib's pyplot on the Agg backend (headless; safe in tests and on servers)."""
    try:
        import matplotlib
    except ImportError as error:  # matplotlib is in the dev/bench extras, not a core dependency
        raise ImportError("plotting needs matplotlib: pip install 'gcmr[dev]' or pip install matplotlib") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _as_pair(hit: Hit, query_index: int, rank: int) -> tuple[str, float]:
    """(image_key, score) from a retrieve() pair or a pipeline result dict."""
    if isinstance(hit, Mapping):
        if "image_key" not in hit or "score" not in hit:
            raise ValueError(f"query {query_index}, hit {rank}: a dict hit needs 'image_key' and 'score', got {sorted(hit)}")
        key, score = hit["image_key"], hit["score"]
    elif isinstance(hit, (tuple, list)) and len(hit) == 2:
        key, score = hit
    else:
        raise ValueError(f"query {query_index}, hit {rank}: expected (image_key, score) or a dict, got {hit!r}")
    if not isinstance(key, str):
        raise ValueError(f"query {query_index}, hit {rank}: image key must be a str, got {type(key).__name__}")
    return key, float(score)


def _gold_set(entry: str | Sequence[str] | None) -> set[str]:
    if entry is None:
        return set()
    if isinstance(entry, str):
        return {entry}
    return set(entry)


def _load_image(image: ImageLike, key: str) -> np.ndarray:
    """An RGB array for imshow, from a PIL image, an array or a file path."""
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                return np.asarray(opened.convert("RGB"))
        except (OSError, ValueError) as error:
            raise ValueError(f"image {key!r}: cannot read image file {os.fspath(image)!r}: {error}") from error
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4)):
        return array
    raise ValueError(f"image {key!r}: expected a PIL image, an (H, W[, 3|4]) array or a file path, got shape {array.shape}")


def _save_atomically(figure, path: str | os.PathLike) -> Path:
    """Write the figure as PNG under a temp name in the target folder, then rename it into place."""
    return atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=figure.dpi), mode="wb")


__all__ = ["plot_latency", "plot_retrieved_images"]
