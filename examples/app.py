#!/usr/bin/env python
"""A search page over your own image collection: type a query and look at what a GCMR retriever returns.

    python examples/app.py --retriever FOLDER_OR_HUB_ID --images FOLDER [--port 7860]

Serves a Gradio page on 127.0.0.1 with a search box and a top-k slider. Each result shows the image's thumbnail,
key, rank and score, and the identifier the model generated for it, token by token (the coarse-to-fine path).
When the checkpoint has a vision tower (`config.vision_config`) or stored image features
(`model.stored_image_features`, rows in `tokenizer.keys` order), a second tab searches image to image: an uploaded
image (vision tower) or an image of the collection (its stored feature, else its pixels through the tower).

`--images` is the collection: an imagefolder (keys from `metadata.jsonl`/`metadata.csv` `image_key` columns when
present) or any folder of images (keys from the file names, as `load_corpus` derives them). Images the checkpoint
names but the folder lacks are listed at the top of the page; they are still searched and show a placeholder. Image
files are confined to `--images` as the corpus loader confines a corpus's: a `file_name` such as
`../outside/secret.png` or `/etc/passwd`, or a symlink leading out, is ignored and named at the top of the page.
Removed images (`model.remove_images`) are neither searched nor offered.

Offline by design: Gradio analytics off, no asset from the network (Gradio 6 ships its fonts), the model loaded once at
start. Run unchanged as a Hugging Face Space's `app.py` (see docs/app.md): without arguments it serves the
`retriever/` and `images/` folders next to this file (or `$GCMR_RETRIEVER` / `$GCMR_IMAGES`), and inside a Space
(`$SPACE_ID` set) it listens where the Space runtime expects.
"""
from __future__ import annotations

import csv
import functools
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

# Before gradio is imported: it reads this at import time.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoModel, AutoTokenizer, HfArgumentParser  # noqa: E402

from modeling_gcmr.evaluation.gallery import GALLERY_CSS, render_hits, thumbnail_data_uri  # noqa: E402
from modeling_gcmr.query_inputs_gcmr import check_positive_int  # noqa: E402  (retrieve()'s own check of top_k)
from modeling_gcmr.training.collator import build_image_processor  # noqa: E402
from modeling_gcmr.training.corpus_values import resolve_within  # noqa: E402  (the corpus loader's confinement)
from modeling_gcmr.training.data import _derived_keys  # noqa: E402  (the same keys training derives)

logger = logging.getLogger("gcmr.app")
HERE = Path(__file__).resolve().parent
IMAGE_SUFFIXES = frozenset(suffix for suffix, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
# Keys listed in the page's missing-images notice; the log has all of them.
MAX_LISTED_KEYS = 20
# A dropdown of a huge collection would bloat the page; past this, the picker also accepts a typed key.
MAX_PICKER_CHOICES = 5000
TABLE_HEADERS = ["rank", "image_key", "score", "identifier"]
# Largest image (width x height) the page decodes as a query: 8000 x 8000. The vision tower sees a few hundred pixels
# a side; decoding a bigger file only costs memory (3 bytes a pixel, more while it is resized).
MAX_QUERY_IMAGE_PIXELS = 64_000_000
_SHRINK = ("The model sees an image at a few hundred pixels a side: shrink it (say to 1024 pixels on the long side) "
           "and search again.")


@dataclass
class AppArguments:
    """Which retriever and images to serve, and where."""

    retriever: str = field(default=os.environ.get("GCMR_RETRIEVER", str(HERE / "retriever")),
                           metadata={"help": "Checkpoint folder (or Hub id) saved by save_retriever / run_gcmr.py."})
    images: str = field(default=os.environ.get("GCMR_IMAGES", str(HERE / "images")),
                        metadata={"help": "Folder with the collection's images (an imagefolder or plain files)."})
    host: str | None = field(default=None,
                             metadata={"help": "Address to serve on (default 127.0.0.1; in a Space 0.0.0.0)."})
    port: int | None = field(default=None, metadata={"help": "Port (default $GRADIO_SERVER_PORT or 7860)."})
    max_top_k: int = field(default=20, metadata={"help": "Largest top-k the slider offers."})
    max_query_chars: int = field(default=1000, metadata={"help": "Longer queries are refused with a message."})
    num_beams: int | None = field(default=None, metadata={"help": "Beam width (default: the checkpoint's)."})
    image_prompt: str = field(default="",
                              metadata={"help": "Text given with image queries (run_gcmr's --memorize_prompt)."})
    allow_paths_outside_images: bool = field(
        default=False, metadata={"help": "Show image files that metadata or symlinks place outside --images."})
    dtype: str | None = field(default=None, metadata={
        "help": "Serve the model in this dtype: float32, bfloat16 (half the memory, the same ranking within rounding: "
                "docs/user_guide.md) or float16 (default: the dtype the checkpoint was saved in)."})


@dataclass(frozen=True)
class ImageCollection:
    """The image file of each key the checkpoint names, the keys the folder lacks, and the image paths refused for
    leading outside the folder (each as 'where: path')."""

    folder: Path
    paths: dict[str, Path]
    missing: list[str]
    outside: list[str] = field(default_factory=list)


class SearchError(ValueError):
    """A problem with the user's request, shown in the page as it is."""


def index_images(folder: str | os.PathLike, keys: list[str], allow_outside: bool = False) -> ImageCollection:
    """Find the image file of every key in `keys` under `folder` (metadata `image_key` first, else file names).

    A file that resolves outside `folder` (a metadata `file_name` with `..` or an absolute path, a symlink leading
    out) is not used unless `allow_outside`: the page would inline it for anyone who can reach it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images {str(folder)!r} is not a folder")
    root, outside = folder.resolve(), []

    def confined(path: Path, where: str) -> bool:
        if allow_outside or resolve_within(path, root)[1]:
            return True
        outside.append(f"{where}: {path}")
        return False

    files = sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
    files = [path for path in files if confined(path, "file")]
    by_key = dict(zip(_derived_keys([str(path) for path in files], folder), files))
    for metadata in sorted([*folder.rglob("metadata.jsonl"), *folder.rglob("metadata.csv")]):
        for key, file_name, where in _metadata_rows(metadata):
            path = metadata.parent / file_name
            if path.is_file() and confined(path, f"{where} file_name {file_name!r}"):
                by_key[key] = path
    wanted = set(keys)
    paths = {key: path for key, path in by_key.items() if key in wanted}
    return ImageCollection(folder, paths, [key for key in keys if key not in paths], outside)


def _metadata_rows(metadata: Path) -> list[tuple[str, str, str]]:
    """(image_key, file_name, 'FILE line N') of an imagefolder metadata file; unreadable rows are logged and skipped."""
    pairs = []
    with open(metadata, encoding="utf-8", newline="") as handle:
        if metadata.suffix == ".csv":
            rows = enumerate(csv.DictReader(handle), start=2)
        else:
            rows = ((number, _json_row(line, metadata, number)) for number, line in enumerate(handle, start=1)
                    if line.strip())
        for number, row in rows:
            if isinstance(row, dict) and row.get("image_key") and row.get("file_name"):
                pairs.append((str(row["image_key"]), str(row["file_name"]), f"{metadata} line {number}"))
            elif isinstance(row, dict) and "image_key" in row:
                logger.warning("%s line %d: no image_key or file_name; skipped", metadata, number)
    return pairs


def _json_row(line: str, metadata: Path, number: int) -> dict | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        logger.warning("%s line %d is not JSON (%s); skipped", metadata, number, error)
        return None


def live_keys(tokenizer) -> tuple[str, ...]:
    """The keys the collection holds now: `tokenizer.keys` without those `model.remove_images` removed."""
    # A checkpoint saved before images could be removed has tokenizer code without `current_keys`: all are live.
    return tuple(getattr(tokenizer, "current_keys", tokenizer.keys))


def _raw_value(payload):
    return payload


class Searcher:
    """Runs the page's searches on one loaded model; every user mistake becomes a `SearchError` message."""

    def __init__(self, model, tokenizer, collection: ImageCollection, max_top_k: int = 20,
                 max_query_chars: int = 1000, num_beams: int | None = None, image_prompt: str = ""):
        self.model, self.tokenizer, self.collection = model.eval(), tokenizer, collection
        self.live_keys = live_keys(tokenizer)
        self.max_top_k = max(1, min(max_top_k, len(self.live_keys)))
        self.max_query_chars, self.num_beams, self.image_prompt = max_query_chars, num_beams, image_prompt
        vision_config = getattr(model.config, "vision_config", None)
        self.image_processor = build_image_processor(vision_config) if vision_config is not None else None
        # Rows follow tokenizer.keys; None for a checkpoint saved without features.
        self.stored_features = getattr(model, "stored_image_features", None)
        # Rows of the stored features; removed keys keep their rows but are not searched with.
        self.row_of_key = {key: row for row, key in enumerate(tokenizer.keys)}
        self.removed = frozenset(self.row_of_key) - frozenset(self.live_keys)
        self._thumbnails = functools.lru_cache(maxsize=4096)(self._draw_thumbnail)

    @property
    def takes_uploads(self) -> bool:
        return self.image_processor is not None

    @property
    def searches_images(self) -> bool:
        return self.takes_uploads or self.stored_features is not None

    def text(self, query: str | None, top_k) -> list[tuple[str, float]]:
        query = (query or "").strip()
        if not query:
            raise SearchError("The search box is empty: type what the image shows, e.g. 'a red circle above a "
                              "blue square'.")
        if len(query) > self.max_query_chars:
            raise SearchError(f"The query has {len(query):,} characters; the limit is {self.max_query_chars:,}. "
                              "Describe the image in a sentence or two.")
        return self._retrieve(top_k, queries=[query])

    def upload(self, file_path: str | None, top_k) -> list[tuple[str, float]]:
        if not self.takes_uploads:
            raise SearchError("This checkpoint has no vision tower, so it cannot read an uploaded image; "
                              "pick an image of the collection instead.")
        if not file_path:
            raise SearchError("No image uploaded: choose an image file first.")
        name = Path(file_path).name
        return self._retrieve(top_k, pixel_values=self._pixels(_read_image(file_path, f"'{name}'", uploaded=True)))

    def collection_image(self, key: str | None, top_k) -> list[tuple[str, float]]:
        if not key:
            raise SearchError("No image chosen: pick an image key of the collection.")
        if key in self.removed:
            raise SearchError(f"'{key}' was removed from the collection.")
        if key not in self.row_of_key:
            raise SearchError(f"'{key}' is not an image key of this checkpoint.")
        if self.stored_features is not None:  # exactly the feature the model memorized, no pixel processing
            row = self.row_of_key[key]
            return self._retrieve(top_k, image_embeds=self.stored_features[row : row + 1])
        path = self.collection.paths.get(key)
        if path is None:
            raise SearchError(f"The image of '{key}' is not in {self.collection.folder}, so it cannot be searched "
                              "with.")
        image = _read_image(path, f"The image file of '{key}' ({path})")
        return self._retrieve(top_k, pixel_values=self._pixels(image))

    def identifier_tokens(self, key: str) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(self.tokenizer.identifier_ids(key))

    def thumbnail(self, key: str) -> str | None:
        """The key's thumbnail as a data URI (drawn once, then cached), or None when its image is unavailable."""
        return self._thumbnails(key)

    def _draw_thumbnail(self, key: str) -> str | None:
        path = self.collection.paths.get(key)
        if path is None:
            return None
        try:
            return thumbnail_data_uri(path, key=key)
        except ValueError as error:  # a damaged file shows the placeholder; the log says why
            logger.warning("cannot draw the thumbnail of %r: %s", key, error)
            return None

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        return self.image_processor(images=[image], return_tensors="pt")["pixel_values"]

    def _retrieve(self, top_k, **query) -> list[tuple[str, float]]:
        try:
            top_k = check_positive_int("top_k", top_k)
        except ValueError as error:
            raise SearchError(f"{error}; the page takes a whole number from 1 to {self.max_top_k}.") from None
        if top_k > self.max_top_k:
            raise SearchError(f"top_k must be a whole number from 1 to {self.max_top_k} (the page's limit), got "
                              f"{top_k}.")
        if "queries" not in query:
            query["prompt"] = self.image_prompt
        return self.model.retrieve(tokenizer=self.tokenizer, top_k=top_k, num_beams=self.num_beams, **query)[0]


def _read_image(path: str | os.PathLike, shown: str, uploaded: bool = False) -> Image.Image:
    """The image file as RGB; a `SearchError` when it cannot be read or is over `MAX_QUERY_IMAGE_PIXELS`."""
    try:
        with warnings.catch_warnings():
            # A size over PIL's limit is refused below with advice; PIL's own warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                size = opened.size  # from the header: nothing is decoded yet
                if size[0] * size[1] <= MAX_QUERY_IMAGE_PIXELS:
                    return opened.convert("RGB")
    except Image.DecompressionBombError:  # over twice PIL's limit: PIL does not even give the size
        size = None
    except MemoryError:
        raise SearchError(f"{shown} does not fit in memory once decoded. {_SHRINK}") from None
    except (OSError, ValueError, SyntaxError) as error:
        if uploaded:
            raise SearchError(f"{shown} is not an image file that can be read ({type(error).__name__}). Upload a "
                              "PNG, JPEG, WebP or similar image file.") from error
        raise SearchError(f"{shown} cannot be read: {error}") from error
    dimensions = f"{size[0]} x {size[1]} pixels ({size[0] * size[1]:,})" if size else "too large to open"
    raise SearchError(f"{shown} is {dimensions}; the page reads images of up to {MAX_QUERY_IMAGE_PIXELS:,} pixels "
                      f"(8000 x 8000). {_SHRINK}")


def respond(searcher: Searcher, search, *args) -> tuple[str, list[list], str]:
    """Run one search for the page: (results HTML, table rows, status). Never raises: errors become the status."""
    started = time.perf_counter()
    try:
        hits = search(*args)
    except SearchError as error:
        return "", [], f"**Cannot search.** {error}"
    except Exception as error:  # noqa: BLE001  (the server keeps serving; the log holds the traceback)
        logger.exception("search failed")
        return "", [], f"**The search failed** ({type(error).__name__}: {error}). The server is still running."
    identifiers = {key: searcher.identifier_tokens(key) for key, _ in hits}
    thumbnails = {key: uri for key, _ in hits if (uri := searcher.thumbnail(key))}
    rows = [[rank, key, round(float(score), 4), " ".join(identifiers[key])]
            for rank, (key, score) in enumerate(hits, start=1)]
    status = f"{len(hits)} results in {time.perf_counter() - started:.2f} s (score: the model's identifier score, higher is better)."
    return render_hits(hits, thumbnails, identifiers=identifiers), rows, status


def _listing(names: list[str]) -> str:
    """The first MAX_LISTED_KEYS names as code, and how many more."""
    listed = ", ".join(f"`{name}`" for name in names[:MAX_LISTED_KEYS])
    unlisted = len(names) - MAX_LISTED_KEYS
    return listed + (f" and {unlisted} more" if unlisted > 0 else "")


def build_page(searcher: Searcher, title: str = "GCMR search") -> gr.Blocks:
    """The page: a text tab and, when the checkpoint can take images, an image tab."""
    collection = searcher.collection
    with gr.Blocks(title=title, analytics_enabled=False) as page:
        gr.Markdown(f"# {title}\n{len(searcher.live_keys):,} images; each result shows the identifier the "
                    "model generated for it, coarse to fine.")
        if collection.missing:
            gr.Markdown(f"**{len(collection.missing)} of the {len(searcher.live_keys)} images this checkpoint "
                        f"names are not in `{collection.folder}`:** {_listing(collection.missing)}. They are still "
                        "searched and show a placeholder instead of a thumbnail.", elem_id="missing-images")
        if collection.outside:
            gr.Markdown(f"**{len(collection.outside)} image path(s) lead outside `{collection.folder}` and are not "
                        f"shown:** {_listing(collection.outside)}. Copy those images into the folder (or start the "
                        "page with `--allow_paths_outside_images` if you trust them).", elem_id="outside-images")
        top_k = gr.Slider(1, searcher.max_top_k, value=min(5, searcher.max_top_k), step=1, label="top-k",
                          elem_id="top-k")
        # The value reaches the search as it was sent, so `retrieve()`'s own check judges it (Gradio's would round
        # 2.5 to 2 and fail on text with a generic error). Set on the instance: a Slider subclass would make Gradio
        # write an app.pyi stub next to this file each time the page starts.
        top_k.preprocess = _raw_value
        with gr.Tab("Text to image"):
            with gr.Row():
                query = gr.Textbox(label="Query", placeholder="a red circle above a blue square", scale=4,
                                   elem_id="query")
                search = gr.Button("Search", variant="primary", scale=1, elem_id="search")
            text_outputs = _result_components("text")
        search.click(functools.partial(respond, searcher, searcher.text), [query, top_k], text_outputs,
                     api_name="search")
        query.submit(functools.partial(respond, searcher, searcher.text), [query, top_k], text_outputs,
                     api_visibility="private")
        if searcher.searches_images:
            _image_tab(searcher, top_k)
    return page


def _image_tab(searcher: Searcher, top_k: gr.Slider) -> None:
    with gr.Tab("Image to image"):
        with gr.Row():
            with gr.Column():
                if searcher.takes_uploads:
                    upload = gr.File(label="Upload an image", file_types=["image"], type="filepath", elem_id="upload")
                    upload_button = gr.Button("Search with the upload", elem_id="search-upload")
                else:
                    gr.Markdown("This checkpoint has stored image features but no vision tower: pick an image of "
                                "the collection (uploads cannot be read).")
            with gr.Column():
                keys = sorted(searcher.collection.paths if searcher.stored_features is None else searcher.live_keys)
                picker = gr.Dropdown(keys[:MAX_PICKER_CHOICES], label="or an image of the collection",
                                     allow_custom_value=len(keys) > MAX_PICKER_CHOICES, elem_id="collection-key")
                pick_button = gr.Button("Search with this image", elem_id="search-collection")
        outputs = _result_components("image")
    if searcher.takes_uploads:
        upload_button.click(functools.partial(respond, searcher, searcher.upload), [upload, top_k], outputs,
                            api_name="search_upload")
    pick_button.click(functools.partial(respond, searcher, searcher.collection_image), [picker, top_k], outputs,
                      api_name="search_collection_image")


def _result_components(prefix: str) -> list[gr.components.Component]:
    status = gr.Markdown(elem_id=f"{prefix}-status")
    results = gr.HTML(elem_id=f"{prefix}-results")
    table = gr.Dataframe(headers=TABLE_HEADERS, datatype=["number", "str", "number", "str"], interactive=False,
                         label="Results", elem_id=f"{prefix}-table")
    return [results, table, status]


def server_name(host: str | None) -> str:
    """127.0.0.1 unless told otherwise; a Space's container must listen on every interface."""
    if host:
        return host
    return "0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1"


SERVING_DTYPES = ("float32", "bfloat16", "float16")


def load_retriever(folder: str, dtype: str | None = None) -> tuple:
    """The model (in `dtype`, default the checkpoint's own) and tokenizer of a checkpoint, as a Hub user loads them."""
    if dtype is not None and dtype not in SERVING_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(SERVING_DTYPES)}, got {dtype!r}")
    options = {} if dtype is None else {"dtype": getattr(torch, dtype)}
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, **options)
    return model, AutoTokenizer.from_pretrained(folder, trust_remote_code=True)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (args,) = HfArgumentParser(AppArguments).parse_args_into_dataclasses(argv)
    started = time.perf_counter()
    try:
        model, tokenizer = load_retriever(args.retriever, args.dtype)
        collection = index_images(args.images, list(live_keys(tokenizer)), args.allow_paths_outside_images)
    except (OSError, ValueError) as error:
        sys.exit(f"cannot start the search page: {error}")
    if collection.missing:
        logger.warning("%d images the checkpoint names are not in %s: %s", len(collection.missing),
                       collection.folder, ", ".join(collection.missing))
    if collection.outside:
        logger.warning("%d image paths lead outside %s and are not shown (--allow_paths_outside_images shows them): "
                       "%s", len(collection.outside), collection.folder, "; ".join(collection.outside))
    searcher = Searcher(model, tokenizer, collection, args.max_top_k, args.max_query_chars, args.num_beams,
                        args.image_prompt)
    logger.info("loaded %s (%d images, %d with a file) in %.1f s, in %s; image-to-image search: %s", args.retriever,
                len(searcher.live_keys), len(collection.paths), time.perf_counter() - started, model.dtype,
                "yes" if searcher.searches_images else "no")
    # Gradio 6's default theme ships its fonts; ssr_mode=False needs no Node server.
    build_page(searcher).launch(server_name=server_name(args.host), server_port=args.port, share=False,
                                ssr_mode=False, css=GALLERY_CSS, footer_links=[], max_file_size="20mb")


if __name__ == "__main__":
    main()
