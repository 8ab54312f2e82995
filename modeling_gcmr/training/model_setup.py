"""Building a new retriever for a corpus: its text backbone, how images enter, and its identifier head.

`build_retriever` is what `examples/run_gcmr.py` calls; the benchmarks use the same function, so what they measure
is what users get. Two kinds of backbone:

- a pretrained one (`TextBackbone`, see `backbones.py`): its tokenizer is the text vocabulary; an encoder or CLIP
  text tower is frozen by default (its states are then computed once per query and cached);
- a small T5 trained from scratch (`ScratchT5`), with a WordPiece vocabulary trained on the captions.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
from transformers import CLIPVisionConfig, T5Config
from transformers.utils import logging

from ..configuration_gcmr import GcmrConfig
from ..modeling_gcmr import GcmrForRetrieval
from .backbones import TextBackbone

logger = logging.get_logger(__name__)


@dataclass
class ScratchT5:
    """Sizes of a T5 backbone trained from scratch."""

    d_model: int = 128
    d_ff: int = 256
    num_layers: int = 2
    num_heads: int = 4
    dropout_rate: float = 0.1


@dataclass
class VisionTower:
    """Sizes of a CLIP-style vision tower trained from scratch (images entering as pixels)."""

    image_size: int
    hidden_size: int = 64
    num_layers: int = 2
    patch_size: int = 8

    def config(self) -> CLIPVisionConfig:
        return CLIPVisionConfig(image_size=self.image_size, patch_size=self.patch_size, hidden_size=self.hidden_size,
                                intermediate_size=2 * self.hidden_size, num_hidden_layers=self.num_layers,
                                num_attention_heads=max(1, self.hidden_size // 32))


def typical_image_size(corpus: datasets.Dataset, sample: int = 64) -> int:
    """The most common longer side among (a sample of) the corpus images: a tower sized for the data, not for 224."""
    sizes = collections.Counter(max(image.size) for image in corpus.select(range(min(sample, len(corpus))))["image"])
    return int(sizes.most_common(1)[0][0])


def build_retriever(
    tokenizer: Any,
    *,
    backbone: TextBackbone | None = None,
    scratch: ScratchT5 | None = None,
    image_embed_dim: int | None = None,
    vision: VisionTower | None = None,
    identifier_features: np.ndarray | None = None,
    init: str = "auto",
    freeze_text_encoder: bool | None = None,
    shared_query_space: bool | None = None,
    decoder_layers: int = 1,
    decoder_intermediate_size: int = 512,
    seed: int = 0,
    **config_options: Any,
) -> GcmrForRetrieval:
    """A new `GcmrForRetrieval` fitted to `tokenizer`'s identifiers, pretrained weights loaded.

    Args:
        tokenizer: the `ImageIdTokenizer` (its text vocabulary is the backbone's tokenizer, or a trained one).
        backbone / scratch: a pretrained text backbone, or the sizes of a T5 from scratch.
        image_embed_dim / vision: how memorize rows give their image (precomputed features, or pixels).
        identifier_features: (N, D) the image features the identifiers were built from, in `tokenizer.keys`
            order; they initialise the identifier vectors (`set_identifier_vocabulary(init="dense")`).
        freeze_text_encoder: default: frozen for a pretrained encoder or CLIP tower, trained otherwise.
        shared_query_space: default: True when the backbone's query width equals the features' width (a sentence
            encoder the features come from, or CLIP with its projection), logged either way.
        **config_options: further `GcmrConfig` fields (fusion, consistency_weight, num_beams, score_scale, ...).
    """
    if (backbone is None) == (scratch is None):
        raise ValueError("pass exactly one of backbone (a pretrained text model) or scratch (T5 sizes)")
    special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if backbone is not None:
        text_config = backbone.text_config(decoder_layers, decoder_intermediate_size)
        pooling, query_width = backbone.query_pooling, backbone.query_width
        frozen_default = backbone.kind in ("encoder", "clip")
    else:
        text_config = T5Config(vocab_size=tokenizer.num_text_tokens, d_model=scratch.d_model, d_ff=scratch.d_ff,
                               d_kv=scratch.d_model // scratch.num_heads, num_layers=scratch.num_layers,
                               num_decoder_layers=scratch.num_layers, num_heads=scratch.num_heads,
                               dropout_rate=scratch.dropout_rate, decoder_start_token_id=tokenizer.pad_token_id,
                               **special)
        pooling, query_width, frozen_default = "mean", scratch.d_model, False
    feature_width = identifier_features.shape[1] if identifier_features is not None else image_embed_dim
    if shared_query_space is None:
        shared_query_space = backbone is not None and feature_width == query_width
        logger.info("queries %s the identifier space from the start (backbone query width %s, features %s)",
                    "share" if shared_query_space else "learn", query_width, feature_width)
    elif shared_query_space and feature_width != query_width:
        kind = backbone.kind if backbone is not None else "t5 from scratch"
        raise ValueError(
            f"the image features are {feature_width}-d but the text backbone ({kind}) projects queries to "
            f"{query_width}-d: a shared query space needs one width; use features of the same model (for CLIP: its "
            "image features) or let the query projection be learned (shared_query_space=False)"
        )
    config = GcmrConfig(
        text_config=text_config,
        vision_config=vision.config() if vision is not None else None,
        image_embed_dim=image_embed_dim,
        identifier_dim=feature_width,
        shared_query_space=bool(shared_query_space),
        query_pooling=pooling,
        **config_options,
    )
    model = GcmrForRetrieval(config)
    model.set_identifier_vocabulary(tokenizer, init=init, seed=seed, image_embeds=identifier_features)
    if backbone is not None:
        backbone.load_weights(model)
    frozen = frozen_default if freeze_text_encoder is None else freeze_text_encoder
    model.freeze_text_encoder(frozen)
    return model


__all__ = ["ScratchT5", "VisionTower", "build_retriever", "typical_image_size"]
