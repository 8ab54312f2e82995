"""Retrieval results as HTML: thumbnail cards with rank, key, score and identifier, and a self-contained gallery page.

    render_hits(hits, thumbnails, gold=(), identifiers=None) -> str     # one row of result cards (an HTML fragment)
    thumbnail_data_uri(image, max_side=THUMBNAIL_SIDE) -> str            # a PNG thumbnail as a data: URI
    write_gallery(path, queries, systems, images_by_key, gold=None, top_k=5) -> Path   # one .html file, atomic

The search page (`examples/app.py`) and the demo's gallery draw their results with the same cards and `GALLERY_CSS`.
Every image is inlined as a data URI, so the gallery file can be mailed or opened offline and never points at a
file that is not there; a hit whose image is unavailable shows a visible placeholder instead.
"""
from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image

from ..atomic_write_gcmr import atomic_write
from .plotting import Hit, ImageLike, _as_pair, _gold_set, _load_image

# Longest side of an inlined thumbnail, in pixels: small enough that 20 queries x 10 hits stay a few MB.
THUMBNAIL_SIDE = 128
MISSING_IMAGE_TEXT = "image file missing"

GALLERY_CSS = """
.gcmr-hits { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
.gcmr-hit { margin: 0; width: 136px; padding: 4px; border: 2px solid #d0d0d0; border-radius: 6px;
            background: #fff; color: #222; font: 12px/1.35 system-ui, sans-serif; }
.gcmr-hit.gcmr-gold { border: 4px solid #1a9850; padding: 2px; }
.gcmr-thumb { display: block; width: 128px; height: 128px; object-fit: contain; background: #f4f4f4;
              image-rendering: pixelated; }
.gcmr-missing { display: flex; width: 128px; height: 128px; align-items: center; justify-content: center;
                background: repeating-linear-gradient(45deg, #eee, #eee 6px, #f8f8f8 6px, #f8f8f8 12px);
                color: #a00; text-align: center; }
.gcmr-rank { font-weight: 700; }
.gcmr-key { font-family: ui-monospace, monospace; word-break: break-all; }
.gcmr-score { color: #555; }
.gcmr-gold-label { color: #1a9850; font-weight: 700; }
.gcmr-id { margin-top: 2px; display: flex; flex-wrap: wrap; gap: 2px; align-items: center; }
.gcmr-id code { background: #eef2fb; border-radius: 3px; padding: 0 2px; font-size: 11px; }
.gcmr-query { margin: 18px 0 6px; font-size: 15px; }
.gcmr-systems { display: flex; gap: 28px; overflow-x: auto; }
.gcmr-system h3 { margin: 4px 0; font-size: 13px; }
.gcmr-system .gcmr-hits { flex-wrap: nowrap; gap: 6px; }
.gcmr-system .gcmr-hit { width: 104px; }
.gcmr-system .gcmr-thumb, .gcmr-system .gcmr-missing { width: 96px; height: 96px; }
"""


def thumbnail_data_uri(image: ImageLike, max_side: int = THUMBNAIL_SIDE, key: str = "image") -> str:
    """`image` (PIL image, array or file path) shrunk to at most `max_side` pixels a side, as a PNG data URI."""
    thumbnail = Image.fromarray(_load_image(image, key)).convert("RGB")
    thumbnail.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def render_hits(
    hits: Sequence[Hit],
    thumbnails: Mapping[str, str],
    gold: str | Sequence[str] | None = None,
    identifiers: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """One row of result cards, best first: thumbnail (or a placeholder), rank, key, score, identifier tokens.

    ``hits`` are ``(image_key, score)`` pairs or ``{"image_key", "score"}`` dicts; ``thumbnails[key]`` is an image
    URI (keys without one get a placeholder); gold keys get a green frame; ``identifiers[key]`` are the identifier's
    tokens, shown coarse to fine.
    """
    gold_keys = _gold_set(gold)
    cards = []
    for rank, hit in enumerate(hits, start=1):
        key, score = _as_pair(hit, 0, rank - 1)
        escaped_key = html.escape(key)
        uri = thumbnails.get(key)
        picture = (f'<img class="gcmr-thumb" src="{html.escape(uri)}" alt="{escaped_key}">' if uri else
                   f'<div class="gcmr-missing">{MISSING_IMAGE_TEXT}</div>')
        is_gold = key in gold_keys
        caption = (f'<span class="gcmr-rank">#{rank}</span> <span class="gcmr-key">{escaped_key}</span><br>'
                   f'<span class="gcmr-score">score {score:.3f}</span>'
                   + (' <span class="gcmr-gold-label">correct</span>' if is_gold else ""))
        tokens = (identifiers or {}).get(key)
        if tokens:
            chips = "<span>&rsaquo;</span>".join(f"<code>{html.escape(token)}</code>" for token in tokens)
            caption += f'<div class="gcmr-id" title="identifier">{chips}</div>'
        css_class = "gcmr-hit gcmr-gold" if is_gold else "gcmr-hit"
        cards.append(f'<figure class="{css_class}" data-key="{escaped_key}" data-rank="{rank}">{picture}'
                     f"<figcaption>{caption}</figcaption></figure>")
    return f'<div class="gcmr-hits">{"".join(cards)}</div>'


def write_gallery(
    path: str | os.PathLike,
    queries: Sequence[str],
    systems: Mapping[str, Sequence[Sequence[Hit]]],
    images_by_key: Mapping[str, ImageLike],
    gold: Sequence[str | Sequence[str] | None] | None = None,
    top_k: int = 5,
    title: str = "GCMR retrieval gallery",
) -> Path:
    """Write one self-contained HTML page: per query, each system's top-k thumbnails side by side.

    ``systems[name][i]`` are query i's hits from that system (e.g. ``{"generative": ..., "dense": ...}``),
    ``gold[i]`` its correct key (or keys), framed in green. Images are inlined (one thumbnail per key, drawn once),
    so the page needs no other file. Written atomically; returns the path.
    """
    if not queries:
        raise ValueError("write_gallery needs at least one query")
    if not systems:
        raise ValueError("write_gallery needs at least one system's hits")
    for name, hits in systems.items():
        if len(hits) != len(queries):
            raise ValueError(f"system {name!r} has {len(hits)} hit lists for {len(queries)} queries")
    if gold is not None and len(gold) != len(queries):
        raise ValueError(f"got {len(gold)} gold entries for {len(queries)} queries; expected one per query")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")

    shown = {name: [list(query_hits)[:top_k] for query_hits in hits] for name, hits in systems.items()}
    keys = {_as_pair(hit, index, rank)[0]
            for hits in shown.values() for index, query_hits in enumerate(hits) for rank, hit in enumerate(query_hits)}
    thumbnails = {key: thumbnail_data_uri(images_by_key[key], key=key) for key in sorted(keys) if key in images_by_key}
    sections = []
    for index, query in enumerate(queries):
        query_gold = gold[index] if gold is not None else None
        columns = "".join(
            f'<div class="gcmr-system"><h3>{html.escape(name)}</h3>'
            f"{render_hits(hits[index], thumbnails, gold=query_gold)}</div>"
            for name, hits in shown.items()
        )
        gold_note = f" &mdash; correct: <code>{html.escape(', '.join(sorted(_gold_set(query_gold))))}</code>" \
            if query_gold else ""
        sections.append(f'<section><h2 class="gcmr-query">{index + 1}. {html.escape(str(query))}{gold_note}</h2>'
                        f'<div class="gcmr-systems">{columns}</div></section>')
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>body {{ margin: 24px; font-family: system-ui, sans-serif; }}{GALLERY_CSS}</style></head>"
            f"<body><h1>{html.escape(title)}</h1><p>Top {top_k} per system; the correct image is framed in green. "
            f"Scores are each system's own (for the generative retriever: its identifier score, higher is better).</p>"
            f'{"".join(sections)}</body></html>\n')
    return atomic_write(path, lambda handle: handle.write(page))


__all__ = ["GALLERY_CSS", "render_hits", "thumbnail_data_uri", "write_gallery"]
