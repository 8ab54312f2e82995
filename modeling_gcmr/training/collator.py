"""`GcmrDataCollator`: batches of memorize and retrieve rows (from `build_training_examples`) for the Trainer.

Text is right-padded with the tokenizer's pad id, labels with -100. A batch that holds images gets them as
`image_embeds` (stacked) and/or `pixel_values` (through an image processor built from the model config, no
download), with zeros in the rows that carry no image and a boolean `image_mask` saying which rows do.
Non-tensor columns (`task`, `image_key`) are dropped, so train with `remove_unused_columns=False`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedConfig
from transformers.utils import is_torchvision_available

from ..modeling_gcmr import LABEL_PAD_ID

# The side CLIP towers are trained at: what a vision config that names no size means.
CLIP_IMAGE_SIZE = 224


def build_image_processor(vision_config: PreTrainedConfig):
    """A CLIP-style image processor sized for `vision_config.image_size` (resize the short side, centre-crop).

    Built directly, not downloaded. Mean and std are CLIP's defaults; a tower trained from scratch adapts to
    them, and a pretrained tower's own processor can be passed to the collator instead.
    """
    if vision_config is None:
        raise ValueError("the model config has no vision_config, so it takes no pixel_values")
    size = int(getattr(vision_config, "image_size", CLIP_IMAGE_SIZE))
    if is_torchvision_available():
        from transformers import CLIPImageProcessor as processor_class
    else:  # the PIL backend needs no torchvision
        from transformers import CLIPImageProcessorPil as processor_class
    return processor_class(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


@dataclass
class GcmrDataCollator:
    """Pads `input_ids` / `labels` and batches the image inputs of mixed memorize/retrieve rows.

    Args:
        tokenizer: gives `pad_token_id` (an `ImageIdTokenizer` or any transformers tokenizer).
        image_processor: turns PIL images into `pixel_values`; needed only when rows carry an `image`.
        pad_to_multiple_of: round padded lengths up to a multiple of this (tensor-core friendly).
    """

    tokenizer: Any
    image_processor: Any = None
    pad_to_multiple_of: int | None = None

    @classmethod
    def from_config(cls, config: PreTrainedConfig, tokenizer, **kwargs) -> "GcmrDataCollator":
        """A collator whose image processor matches `config.vision_config` (none when images come as embeddings)."""
        vision_config = getattr(config, "vision_config", None)
        processor = build_image_processor(vision_config) if vision_config is not None else None
        return cls(tokenizer=tokenizer, image_processor=processor, **kwargs)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        for row, feature in enumerate(features):
            if "input_ids" not in feature:
                raise ValueError(
                    f"batch row {row} has no 'input_ids' (columns: {sorted(feature)}); build rows with "
                    "build_training_examples and train with remove_unused_columns=False"
                )
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has no pad_token_id")
        input_ids = self._pad([f["input_ids"] for f in features], pad_id)
        lengths = torch.tensor([len(f["input_ids"]) for f in features])
        attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if all(f.get("labels") is not None for f in features):
            batch["labels"] = self._pad([f["labels"] for f in features], LABEL_PAD_ID)
        image_mask = None
        embeds = [f.get("image_embeds") for f in features]
        if any(e is not None for e in embeds):
            tensors = [None if e is None else torch.as_tensor(np.asarray(e, dtype=np.float32)) for e in embeds]
            batch["image_embeds"] = _stack_with_zeros(tensors)
            image_mask = torch.tensor([e is not None for e in embeds])
        images = [f.get("image") for f in features]
        if any(image is not None for image in images):
            batch["pixel_values"] = _stack_with_zeros(self._pixels(images))
            pixel_mask = torch.tensor([image is not None for image in images])
            image_mask = pixel_mask if image_mask is None else image_mask | pixel_mask
        if image_mask is not None:
            batch["image_mask"] = image_mask
        return batch

    def _pad(self, sequences: list, value: int) -> torch.Tensor:
        length = max(len(s) for s in sequences)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        padded = torch.full((len(sequences), length), value, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            padded[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
        return padded

    def _pixels(self, images: list) -> list[torch.Tensor | None]:
        if self.image_processor is None:
            raise ValueError(
                "the batch holds images but the collator has no image_processor; build it with "
                "GcmrDataCollator.from_config(config, tokenizer) for a model with a vision_config"
            )
        present = [image.convert("RGB") for image in images if image is not None]
        pixels = iter(self.image_processor(present, return_tensors="pt")["pixel_values"])
        return [None if image is None else next(pixels) for image in images]


def _stack_with_zeros(tensors: list[torch.Tensor | None]) -> torch.Tensor:
    """Stack per-row tensors; rows without one get zeros of the common shape."""
    shapes = {tuple(t.shape) for t in tensors if t is not None}
    if len(shapes) != 1:
        raise ValueError(f"image inputs of one batch must share a shape, got {sorted(shapes)}")
    template = next(t for t in tensors if t is not None)
    return torch.stack([torch.zeros_like(template) if t is None else t for t in tensors])


__all__ = ["GcmrDataCollator", "LABEL_PAD_ID", "build_image_processor"]
