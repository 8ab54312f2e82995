"""Adding images to a trained retriever, and removing them, without retraining: model and tokenizer in one call.

`add_images` asks the tokenizer to prepare the new identifiers (its id type's rules, `identifier_edits.py` on the
tokenizer side, used here only through the tokenizer object's methods), builds the model's new tensors from that
prepared edit, and only then changes both. Every check runs before the first change, so a failed call leaves model
and tokenizer exactly as they were.

Why a new image is retrievable at once: the identifier head scores an identifier by the sum of its trie edges'
vectors against the query (`identifier_head_gcmr.py`). Edges the new identifier shares with old ones keep their
trained vectors; its new edges (at least its EOS edge) start, as `set_identifier_vocabulary(init="dense")` starts
every edge, at the mean of what the shared edges leave of the new images' targets, the last edge taking the rest.
The path then sums to the target: the image's feature mapped into the trained geometry (`_trained_map`, fitted on
the stored features of old images; the identity for an untrained model or without stored features, i.e. exactly
`init="dense"`). Before any gradient step the new image scores like dense inner-product search, while the old
identifiers keep every trained vector (IncDSI, Kishore et al. 2023, places new documents with the model frozen in
the same spirit). On a 300-image f30k-test dev split the map lifted R@1 of old images after an add of 20% from
70.1 to 71.0 and of new ones from 58.3 to 58.9. Text-head identifiers (string, semantic) get rows for new
tokens only; they need the refresh (`training/refresh.py`) to be found.

An add keeps every old vector in its row and appends the new edges' rows after them; the rebuilt trie numbers its
edges in its own (node, token) order, and the head matches the two numberings (`IdentifierHead.edge_rows`). At a
million images, rewriting the table in the trie's order had been most of an add's time. The edge vectors and the
stored features grow into buffers with room to spare (`_with_room`): the first add copies them (out of a loaded
checkpoint's memory-mapped file, say), later adds write their rows past what the model sees, with no copy.

Removal edits the tokenizer's trie in place (dead edges, O(identifiers removed)), and the model only records the new
signature: the removed rows' vectors stay, unreachable, so no edge is renumbered.
"""
from __future__ import annotations

import ctypes
import mmap
import sys
from typing import Any, Sequence

import numpy as np
import torch

from .identifier_head_gcmr import SHARED_EOS_ROW, forced_eos_edges
from .query_inputs_gcmr import check_finite_rows

# Identifiers sampled to fit the feature -> trained path-sum map, and its pull towards the identity (per row).
MAP_SAMPLE = 20_000
MAP_RIDGE = 1e-3
# Where a new coarse_fine identifier goes: "model": it takes the codes of the identifier the trained model retrieves
# first for the image (plus a uniqueness token), so it sits under the prefix the model routes such images to;
# "centroids": the table's nearest centroid and codebook entries (no search; what the tokenizer alone does).
# On f30k-test (200 images added to a model of 800) "model" placement lifted R@1 of the new images' text queries
# from 41.2 to 46.3 (R@10 60.3 -> 66.3): with "centroids", 40% of them never reached the beam. Checked on f30k-dev
# (203 images added to 811 in one round): new images 42.5 -> 47.1, old images 64.0 -> 63.2.
PLACEMENTS = ("model", "centroids")
MADV_DONTNEED = 4  # <sys/mman.h> on Linux
# Rows a grown table's buffer holds per row it needs: an add that must copy a table leaves room for the next adds,
# which then write their rows without copying (at a million images in bf16: 2.2 GB per add). Rows never written take
# no memory. The attribute marks a table as a leading view of such a buffer (what else lies past a tensor's rows in
# its storage, a memory-mapped checkpoint's other tensors for one, must never be written).
GROWTH = 1.25
_ROOM_MARK = "_gcmr_room"


def add_images(model: Any, keys: Sequence[str], tokenizer: Any, image_embeds: Any = None, pixel_values: Any = None,
               captions: Any = None, placement: str = "model") -> None:
    """See `GcmrForRetrieval.add_images`."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    _check_pair(model, tokenizer)
    keys = _key_list(keys, "add_images")
    identifier_head = model.config.identifier_head == "identifier"
    features = _features(model, len(keys), image_embeds, pixel_values, required=identifier_head)
    head = model.identifier_head if identifier_head else None
    structured = tokenizer.identifier_table.id_type == "structured"
    edge_vectors = None
    if structured and head is not None:  # the tokenizer reads them by its trie's edge numbers
        edge_vectors = head.on_trie(tokenizer.prefix_trie).vectors_of(torch.arange(tokenizer.prefix_trie.num_edges))
        edge_vectors = edge_vectors.detach().float().cpu().numpy()
    neighbors = None
    if head is not None and placement == "model" and tokenizer.identifier_table.id_type == "coarse_fine":
        neighbors = _model_neighbors(model, tokenizer, image_embeds, pixel_values)
    edit = tokenizer.prepare_add(keys, None if features is None else features.numpy(), captions, edge_vectors,
                                 neighbors)
    grown = None
    if head is not None:
        grown = _grown_head(head, tokenizer.prefix_trie, edit,
                            features @ _trained_map(model, tokenizer.identifier_table.live_mask()),
                            model.config.shared_eos_vector)
    stored = None
    if grown is not None and model.config.stores_image_features:
        stored = _with_room(model.image_features, len(features))
        stored[len(model.image_features):] = features.to(stored)

    # Every check and every new tensor is ready: from here on nothing can fail half-way.
    tokenizer.apply_edit(edit)
    config = model.config
    if grown is not None:
        paths, token_rows, vectors, rows = grown
        replaced = [head.edge_vectors, head.paths, head.token_rows] + ([model.image_features] if stored is not None
                                                                       else [])
        head.set_identifiers(paths, token_rows, vectors.shape[0], vectors)
        _mark_room(head.edge_vectors)
        head.remember_edge_rows(edit.trie, rows)
        config.num_identifiers, config.num_identifier_edges = int(paths.shape[0]), int(vectors.shape[0])
        if stored is not None:
            del model.image_features
            model.register_buffer("image_features", stored)
            _mark_room(model.image_features)
        release_mapped_pages(replaced)
    elif model.vocab_size < edit.vocab_size:
        model.resize_token_embeddings(edit.vocab_size)
    config.max_identifier_length = int(edit.token_rows.shape[1])
    config.identifier_signature = edit.signature


def remove_images(model: Any, keys: Sequence[str], tokenizer: Any) -> None:
    """See `GcmrForRetrieval.remove_images`."""
    _check_pair(model, tokenizer)
    edit = tokenizer.prepare_remove(_key_list(keys, "remove_images"))
    tokenizer.apply_edit(edit)
    model.config.identifier_signature = edit.signature


def release_mapped_pages(tensors: Sequence[torch.Tensor]) -> int:
    """Unmap the pages of checkpoint-file memory that `tensors` (no longer used) were read from; returns the bytes.

    A loaded checkpoint's tensors are memory-mapped from its safetensors file, and the file stays mapped while any
    tensor of it lives (the backbone's, say), so the pages an add read while copying the old edge vectors and
    features into the grown ones stayed in the process (at a million images: 2.3 GB of a bf16 checkpoint; the second
    add of scale.py's run peaked at 8.84 GB, 6.61 GB once they were released). `madvise(MADV_DONTNEED)` drops them
    from this process; only whole pages inside each tensor that lie in a file mapping (a path in /proc/self/maps) are
    touched, never anonymous memory, which the allocator may hand out again. A reference still held to such a tensor
    reads the file again. Linux only; elsewhere (or where /proc is unreadable) nothing happens."""
    if not sys.platform.startswith("linux"):
        return 0
    spans = [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in tensors
             if t.device.type == "cpu" and t.untyped_storage().nbytes() >= mmap.PAGESIZE]
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as handle:
            fields = [line.split(maxsplit=5) for line in handle]
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    # "start-end perms offset dev inode path": file mappings have a path; anonymous ones none or "[heap]" and such.
    files = [[int(bound, 16) for bound in row[0].split("-")] for row in fields if len(row) == 6 and row[5][0] == "/"]
    released = 0
    for start, size in spans:
        for low, high in files:
            first = -(-max(start, low) // mmap.PAGESIZE) * mmap.PAGESIZE
            end = min(start + size, high) // mmap.PAGESIZE * mmap.PAGESIZE
            if end > first and madvise(ctypes.c_void_p(first), ctypes.c_size_t(end - first), MADV_DONTNEED) == 0:
                released += end - first
    return released


def _model_neighbors(model: Any, tokenizer: Any, image_embeds: Any, pixel_values: Any) -> np.ndarray:
    """Per new image, the row of the live identifier the model retrieves first for it (-1: none)."""
    hits = model.retrieve(tokenizer=tokenizer, image_embeds=image_embeds, pixel_values=pixel_values, top_k=1,
                          show_progress=False)
    wanted = {row[0][0] for row in hits if row}
    row_of = {key: index for index, key in enumerate(tokenizer.keys) if key in wanted}
    return np.array([row_of[row[0][0]] if row else -1 for row in hits], dtype=np.int64)


def _check_pair(model: Any, tokenizer: Any) -> None:
    if model.config.images_through_encoder:
        raise ValueError("this checkpoint has format_version 1 (images through the encoder), which cannot be edited; "
                         "retrain it with this version of gcmr to add or remove images")
    if not callable(getattr(tokenizer, "prepare_add", None)):
        raise ValueError(f"{type(tokenizer).__name__} cannot edit its identifiers: pass the ImageIdTokenizer saved "
                         "with this model (saved by a gcmr version with collection edits)")
    model.check_tokenizer(tokenizer)


def _key_list(keys: Any, call: str) -> list:
    if isinstance(keys, (str, bytes)) or not hasattr(keys, "__iter__"):
        raise ValueError(f"keys must be a list of image keys (strings), got {type(keys).__name__}: {keys!r}")
    keys = list(keys)
    if not keys:
        raise ValueError(f"{call}: keys is empty, so no images were given; pass at least one image key")
    return keys


@torch.no_grad()
def _features(model: Any, count: int, image_embeds: Any, pixel_values: Any, required: bool) -> torch.Tensor | None:
    """(count, identifier_dim) finite float32 features of the new images, on the CPU."""
    if image_embeds is not None and pixel_values is not None:
        raise ValueError("pass image_embeds or pixel_values, not both")
    if image_embeds is None and pixel_values is None:
        if required:
            raise ValueError("add_images needs the new images: image_embeds (count, identifier_dim) or pixel_values; "
                             "their identifiers start from these features")
        return None
    width = model.config.identifier_dim
    if image_embeds is not None:
        values = image_embeds.detach().cpu() if isinstance(image_embeds, torch.Tensor) else np.asarray(image_embeds)
        if not isinstance(values, torch.Tensor) and values.dtype.kind not in "fiu":
            raise ValueError(f"image_embeds must be numbers, got dtype {values.dtype}")
        features = torch.as_tensor(values, dtype=torch.float32)
        name = "image_embeds"
    else:
        if model.vision_tower is None:
            raise ValueError("pixel_values given, but this model has no vision tower: pass image_embeds")
        was_training = model.training
        model.eval()
        pixels = torch.as_tensor(pixel_values, dtype=torch.float32).to(model.device)
        features = model.get_image_features(pixel_values=pixels)[2].float().cpu()
        model.train(was_training)
        name = "pixel_values (through the vision tower)"
    if features.ndim != 2 or features.shape[0] != count or (width and features.shape[1] != width):
        raise ValueError(f"{name} must have shape ({count}, {width}): one row per key, the identifier width "
                         f"(config.identifier_dim); got {tuple(features.shape)}")
    check_finite_rows(features, name)
    return features


def _with_room(table: torch.Tensor, count: int) -> torch.Tensor:
    """`table` with `count` rows appended (their values unset), `table` itself unchanged.

    Where `table` is a leading view of a buffer made here with room for them, the result is a longer view of the
    same buffer: the new rows lie past what `table` shows, so writing them changes nothing anyone sees until the
    caller swaps the result in. Otherwise `table` is copied into a new buffer with room for GROWTH x the rows."""
    rows = len(table) + count
    storage = table.untyped_storage()
    if (getattr(table, _ROOM_MARK, None) == _room_of(table) and table.is_contiguous() and table.storage_offset() == 0
            and storage.nbytes() >= rows * table.stride(0) * table.element_size()):
        return torch.as_strided(table.detach(), (rows, *table.shape[1:]), table.stride())
    buffer = table.new_empty(int(rows * GROWTH) + 1, *table.shape[1:])
    buffer[: len(table)] = table.detach()
    return buffer[:rows]


def _room_of(table: torch.Tensor) -> tuple[int, int, torch.dtype]:
    storage = table.untyped_storage()
    return storage.data_ptr(), storage.nbytes(), table.dtype


def _mark_room(table: torch.Tensor) -> None:
    """Mark the model's tensor (made by `_with_room`) as growable in place; a tensor that later gets other data
    (`param.data = ...`, a dtype change) no longer matches its mark and is copied."""
    setattr(table, _ROOM_MARK, _room_of(table))


@torch.no_grad()
def _trained_map(model: Any, live: np.ndarray) -> torch.Tensor:
    """The linear map that best takes stored image features to their identifiers' trained path sums.

    Training moves the old edge vectors away from the features they started at (a new identifier that starts at
    its raw feature would then score on another scale than its trained neighbours). With the old images' features
    stored, a ridge fit towards the identity of `features @ A ~ path sums` over a sample of current identifiers
    places the new ones in the trained geometry; an untrained model gets A = I, exactly `init="dense"`.
    """
    head = model.identifier_head
    width = head.edge_vectors.shape[1]
    identity = torch.eye(width)
    features = model.stored_image_features
    rows = torch.as_tensor(np.flatnonzero(live[: len(features)])) if features is not None else None
    if rows is None or not len(rows) or features.shape[1] != width:
        return identity  # nothing to fit on (every image removed: the collection starts again as init="dense")
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:MAP_SAMPLE]]
    paths = head.paths[rows].long()
    # Summed where they lie, in the table's dtype: a half-precision table is not converted whole (at a million images
    # in bf16 that float32 copy was 2.3 GB, the peak of an add), and no (rows, depth, D) gather is written (0.33 s of
    # an add at 1M; embedding_bag 0.02 s).
    vectors = head.edge_vectors.detach()
    sums = torch.nn.functional.embedding_bag(paths.clamp(min=0).to(vectors.device), vectors, mode="sum",
                                             per_sample_weights=(paths >= 0).to(vectors)).float().cpu()
    x = features[rows].float().cpu()
    strength = MAP_RIDGE * len(rows)
    return torch.linalg.solve(x.T @ x + strength * identity, x.T @ sums + strength * identity)


@torch.no_grad()
def _grown_head(head: Any, trie: Any, edit: Any, features: torch.Tensor, shared_eos: bool) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The head's paths, token rows and edge vectors after the edit (module docstring), without changing it, and
    the vector row of each edge of the edit's trie (`IdentifierHead.edge_rows`); `trie` is the one before the edit.

    Old edges keep their vector rows and the new edges' rows follow them, so the grown table is the old one with rows
    appended (one contiguous copy), however the rebuilt trie numbers its edges. With `shared_eos` a new forced EOS
    edge takes the shared row instead of a row of its own (an old EOS edge keeps its row, even where a new
    identifier now extends it)."""
    old_paths = head.paths.long().cpu()
    old_count, old_width = old_paths.shape
    old_rows = head.edge_vectors.shape[0]
    rows = torch.full((edit.trie.num_edges,), -1, dtype=torch.long)
    carried = torch.as_tensor(trie.edge_map(edit.trie))
    if (carried < 0).any():  # the edit's trie is built from every old row: this is a bug, not bad input
        raise RuntimeError("the rebuilt trie lost an edge of the old one")
    old_edge_rows = head.edge_rows(trie)
    rows[carried] = torch.arange(trie.num_edges) if old_edge_rows is None else old_edge_rows.cpu()
    trie_paths = torch.as_tensor(edit.trie.paths(edit.token_rows[old_count:]))
    if shared_eos:
        rows[forced_eos_edges(trie_paths, edit.trie.num_edges, elsewhere=rows >= 0)] = SHARED_EOS_ROW
    fresh = torch.nonzero(rows < 0).squeeze(-1)
    rows[fresh] = old_rows + torch.arange(len(fresh))
    paths = torch.full((len(edit.token_rows), trie_paths.shape[1]), -1, dtype=torch.long)
    paths[:old_count, :old_width] = old_paths
    new_paths = torch.where(trie_paths >= 0, rows[trie_paths.clamp(min=0)], -1)
    paths[old_count:] = new_paths
    vectors = _with_room(head.edge_vectors, len(fresh))
    vectors[old_rows:] = 0
    known = torch.arange(len(vectors)) < old_rows
    left = features.to(vectors.device, torch.float32).clone()
    for depth in range(new_paths.shape[1]):
        edges = new_paths[:, depth]
        taken = torch.nonzero(edges >= 0).squeeze(-1)
        unset = taken[~known[edges[taken]]]
        if len(unset):
            unique, inverse = torch.unique(edges[unset], return_inverse=True)
            sums = torch.zeros(len(unique), left.shape[1], device=left.device).index_add_(0, inverse.to(left.device),
                                                                                         left[unset])
            counts = torch.bincount(inverse, minlength=len(unique)).to(left)
            vectors[unique.to(vectors.device)] = (sums / counts[:, None]).to(vectors.dtype)
            known[unique] = True
        left[taken] -= vectors[edges[taken].to(vectors.device)].float()
    token_rows = torch.as_tensor(np.asarray(edit.token_rows, dtype=np.int64))
    return paths, token_rows, vectors, rows


__all__ = ["add_images", "release_mapped_pages", "remove_images"]
