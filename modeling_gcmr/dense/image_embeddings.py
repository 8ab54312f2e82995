"""Image embeddings for building identifiers, from whichever image encoder is at hand.

    compute_image_embeddings(dataset, source, batch_size=32, image_processor=None) -> np.ndarray float32 (N, D)
    save_image_embeddings(path, keys, embeddings); load_image_embeddings(path) -> (keys, embeddings)

`source` is one of
  * `"precomputed"`: the dataset's `image_embeds` column, as is;
  * a path to a `CLIPModel`-compatible checkpoint (loaded with `local_files_only=True`, never downloaded) with its
    image processor saved next to it; the features are `CLIPModel.get_image_features`;
  * a loaded `CLIPModel`, or a trained `DualEncoderModel` (its normalised image embeddings, from `pixel_values`
    with an `image_processor`, or from the `image_embeds` column when it was trained on them).

Rows come out in dataset order; images are converted to RGB.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator

import datasets
import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, CLIPModel

from ..atomic_write_gcmr import atomic_save_to


def compute_image_embeddings(
    dataset: datasets.Dataset,
    source: str | os.PathLike | torch.nn.Module,
    batch_size: int = 32,
    image_processor=None,
) -> np.ndarray:
    """Embed every image of `dataset` with `source` (see the module docstring); float32 (len(dataset), D)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(source, str) and source == "precomputed":
        if "image_embeds" not in dataset.column_names:
            raise ValueError(f"source='precomputed' needs an `image_embeds` column; the dataset has {dataset.column_names}")
        return np.asarray(dataset["image_embeds"], dtype=np.float32)
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isdir(source):
            raise FileNotFoundError(
                f"image encoder {str(source)!r} is not 'precomputed' or a local checkpoint folder; to embed with the dense "
                "baseline, train it (dense.dual_encoder.train_dual_encoder) and pass its model"
            )
        image_processor = image_processor or AutoImageProcessor.from_pretrained(source, local_files_only=True)
        source = CLIPModel.from_pretrained(source, local_files_only=True)
    if isinstance(source, CLIPModel):
        encode = lambda pixels: _as_tensor(source.get_image_features(pixel_values=pixels))  # noqa: E731
    elif hasattr(source, "encode_images"):  # DualEncoderModel
        if image_processor is None:
            if getattr(source.config, "image_embed_dim", None) is None or "image_embeds" not in dataset.column_names:
                raise ValueError("a dual encoder with a vision tower needs an image_processor to embed images")
            return _embed(dataset, lambda x: source.encode_images(image_embeds=x), batch_size, "image_embeds", source)
        encode = lambda pixels: source.encode_images(pixel_values=pixels)  # noqa: E731
    else:
        raise TypeError(
            f"source must be 'precomputed', a checkpoint path, a CLIPModel or a DualEncoderModel, "
            f"got {type(source).__name__}"
        )
    if image_processor is None:
        raise ValueError(f"embedding images with {type(source).__name__} needs an image_processor")
    if "image" not in dataset.column_names:
        raise ValueError(f"embedding pixels needs an `image` column; the dataset has {dataset.column_names}")

    def pixels(images: list) -> torch.Tensor:
        return image_processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]

    return _embed(dataset, encode, batch_size, "image", source, prepare=pixels)


def _embed(
    dataset: datasets.Dataset,
    encode: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
    column: str,
    model: torch.nn.Module,
    prepare: Callable[[list], torch.Tensor] | None = None,
) -> np.ndarray:
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with torch.no_grad():
            for values in tqdm(_batches(dataset, column, batch_size), total=-(-len(dataset) // batch_size),
                               desc="embedding images", unit="batch"):
                inputs = prepare(values) if prepare else torch.tensor(np.asarray(values, dtype=np.float32))
                chunks.append(encode(inputs.to(model.device)).float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(chunks).astype(np.float32)


def _batches(dataset: datasets.Dataset, column: str, batch_size: int) -> Iterator[list]:
    for start in range(0, len(dataset), batch_size):
        yield dataset[start : start + batch_size][column]


def _as_tensor(features) -> torch.Tensor:
    # get_image_features returns a tensor in older transformers and a ModelOutput with pooler_output in newer ones.
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def save_image_embeddings(path: str | os.PathLike, keys: list[str], embeddings: np.ndarray) -> None:
    """Write embeddings to one safetensors file, the image keys (row order) as JSON in its metadata; atomic."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or len(keys) != len(embeddings):
        raise ValueError(f"need one embedding row per key: {len(keys)} keys, embeddings of shape {embeddings.shape}")
    metadata = {"image_keys": json.dumps(list(keys))}
    atomic_save_to(path, lambda temporary: save_file({"embeddings": embeddings}, temporary, metadata=metadata))


def load_image_embeddings(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Read what `save_image_embeddings` wrote: (image keys, float32 (N, D))."""
    with safe_open(os.fspath(path), framework="np") as f:
        keys = json.loads((f.metadata() or {}).get("image_keys", "null") or "null")
        if keys is None:
            raise ValueError(f"{os.fspath(path)!r} has no `image_keys` metadata; it was not written by save_image_embeddings")
        return keys, f.get_tensor("embeddings")
