"""The encoder side of GCMR: image projectors, query pooling, and the cache that makes a frozen encoder free.

A query becomes two things: the *memory* the decoder cross-attends to (the text encoder's states, and for an image
`num_visual_tokens` projected vectors), and one *query vector* in the identifier space, which the identifier head
starts every decoding step from. For text it is the pooled encoder output through `query_projection`; for an image
feature it is the feature through `image_query_projection` (identity at the start when the identifiers were built
from those very features, so memorizing starts as exact lookup).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput


@dataclass
class GcmrEncoderOutput(ModelOutput):
    """Output of the multimodal encoder (what decoding keeps between steps).

    Args:
        last_hidden_state: (B, S, D) the decoder's memory: visual tokens (if any) and text states.
        hidden_states: per-layer text-encoder states, only when `output_hidden_states` was asked for.
        attentions: per-layer attentions, only when `output_attentions` was asked for.
        attention_mask: (B, S) the memory mask, visual slots included.
        layer_states: (B, L, S, D) every encoder layer's output (visual tokens repeated on each layer), kept for
            coarse-to-fine fusion. A tensor, not a tuple, so that beam expansion treats it like the other fields.
        query_vectors: (B, D_id) each row's query vector in the identifier space (format 2 models).
        dense_vectors: (B, D_id) each row's query before any learned map, normalised: the pooled text (when its
            width is the identifier width) or the image feature itself; the dense teacher of distillation. Rows
            with no such vector (pixel images, text of another width) are NaN. Built only in training with a
            distillation weight (None otherwise).
        image_rows: (B,) which rows carry an image (memorize rows), when images were given.
    """

    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    attention_mask: torch.LongTensor | None = None
    layer_states: torch.FloatTensor | None = None
    query_vectors: torch.FloatTensor | None = None
    dense_vectors: torch.FloatTensor | None = None
    image_rows: torch.BoolTensor | None = None


class GcmrImageProjector(nn.Module):
    """Maps one image feature vector to `num_tokens` memory vectors (linear, or linear-GELU-linear).

    A (B, n, D) input is averaged over n first (several crops or patch features of one image). The output is
    layer-normalised: text states have a standard deviation near 1 while a freshly initialised projection gives
    about 0.02, and visual tokens that small are all but ignored at first, which slows memorizing down.
    """

    def __init__(self, in_dim: int, out_dim: int, num_tokens: int, kind: str):
        super().__init__()
        self.in_dim, self.out_dim, self.num_tokens = in_dim, out_dim, num_tokens
        if kind == "linear":
            self.proj = nn.Linear(in_dim, num_tokens * out_dim)
        else:
            self.proj = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, num_tokens * out_dim))
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim == 3:
            features = features.mean(dim=1)
        return self.norm(self.proj(features).view(features.shape[0], self.num_tokens, self.out_dim))


def pool_text(states: torch.Tensor, mask: torch.Tensor, pooling: str, pooler_output: torch.Tensor | None) -> torch.Tensor:
    """One vector per row: the masked mean, the first token, or the encoder's own pooled output."""
    if pooling == "pooler":
        if pooler_output is None:
            raise ValueError("query_pooling='pooler' needs an encoder with a pooler_output (e.g. CLIP's text tower)")
        return pooler_output
    if pooling == "first":
        return states[:, 0]
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def identity_init_(linear: nn.Linear) -> None:
    """Set a square linear map to the identity (used where two spaces start out as one)."""
    with torch.no_grad():
        linear.weight.copy_(torch.eye(linear.out_features, linear.in_features))
        if linear.bias is not None:
            linear.bias.zero_()


class FrozenEncoderCache:
    """The text encoder's outputs per distinct query, kept while the encoder is frozen (least recently used first out).

    A frozen encoder gives the same states for the same tokens in every epoch, so they are computed once. Entries
    are keyed by the query's token ids (padding stripped) and hold that row's states (and every layer's, when
    fusion needs them) on the CPU. `max_bytes` caps the memory; the model clears the cache whenever the encoder's
    weights may have changed (`freeze_text_encoder`, loading, resizing).
    """

    def __init__(self, max_bytes: int = 2 << 30):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, tuple[torch.Tensor, ...]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """Memory the cached states take."""
        return self._bytes

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def get(self, key: bytes) -> tuple[torch.Tensor, ...] | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, entry: tuple[torch.Tensor, ...]) -> None:
        size = sum(tensor.nbytes for tensor in entry)
        if size > self.max_bytes:
            return
        if key in self._entries:
            self._bytes -= sum(tensor.nbytes for tensor in self._entries.pop(key))
        self._entries[key] = entry
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= sum(tensor.nbytes for tensor in evicted)


def check_pixel_values(model: Any, pixel_values: torch.Tensor) -> None:
    vision = model.config.vision_config
    channels = int(getattr(vision, "num_channels", 3))
    size = getattr(vision, "image_size", None)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (channels, height, width):
        raise ValueError(
            f"pixel_values must have shape (batch, {channels}, {height}, {width}) for this vision tower "
            f"({vision.model_type}), got {tuple(pixel_values.shape)}; resize/convert the images (RGB, "
            f"{height}x{width}) with the model's image processor"
        )


def encode_text(model: Any, input_ids, attention_mask, inputs_embeds, want_layers, output_attentions,
                 output_hidden_states) -> GcmrEncoderOutput:
    """Text states (and pooled text in `query_vectors`, before the projection); a frozen encoder is run without
    dropout, and in training from the cache."""
    reference = input_ids if input_ids is not None else inputs_embeds
    if attention_mask is None:
        attention_mask = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)
    frozen = model.text_encoder_is_frozen()
    if frozen and model.training and input_ids is not None and not (output_attentions or output_hidden_states):
        return encode_text_cached(model, input_ids, attention_mask, want_layers)
    return run_text_encoder(model, input_ids, attention_mask, inputs_embeds, want_layers, output_attentions,
                                  output_hidden_states, frozen)


def run_text_encoder(model: Any, input_ids, attention_mask, inputs_embeds, want_layers, output_attentions,
                      output_hidden_states, frozen) -> GcmrEncoderOutput:
    encoder = model.text_encoder()
    was_training = encoder.training
    if frozen:
        encoder.eval()
    try:
        # Only the given input: some encoders (CLIP's text tower) take no inputs_embeds argument at all.
        given = {"input_ids": input_ids} if input_ids is not None else {"inputs_embeds": inputs_embeds}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            out = encoder(**given, attention_mask=attention_mask, return_dict=True,
                          output_hidden_states=want_layers or bool(output_hidden_states),
                          output_attentions=output_attentions)
    finally:
        encoder.train(was_training)
    pooled = pool_text(out.last_hidden_state, attention_mask, model.config.query_pooling,
                       getattr(out, "pooler_output", None))
    return GcmrEncoderOutput(
        last_hidden_state=out.last_hidden_state, attention_mask=attention_mask,
        hidden_states=out.hidden_states if output_hidden_states else None,
        attentions=out.attentions if output_attentions else None,
        layer_states=torch.stack(out.hidden_states[1:], dim=1) if want_layers else None, query_vectors=pooled,
    )


def encode_text_cached(model: Any, input_ids, attention_mask, want_layers) -> GcmrEncoderOutput:
    lengths = attention_mask.sum(dim=1).tolist()
    keys = [row[:length].cpu().numpy().tobytes() for row, length in zip(input_ids, lengths)]
    entries = [model.encoder_cache.get(key) for key in keys]
    missing = [row for row, entry in enumerate(entries) if entry is None or (want_layers and len(entry) < 3)]
    if missing:
        computed = _encode_into_cache(model, input_ids[missing], [lengths[row] for row in missing],
                                      [keys[row] for row in missing], want_layers)
        for row, entry in zip(missing, computed):
            entries[row] = entry
    width, device = max(lengths), input_ids.device
    states = torch.zeros(len(keys), width, entries[0][0].shape[-1], device=device)
    layers = torch.zeros(len(keys), model.encoder_depth(), width, states.shape[-1], device=device) if want_layers else None
    for row, entry in enumerate(entries):
        states[row, : lengths[row]] = entry[0]
        if want_layers:
            layers[row, :, : lengths[row]] = entry[2]
    mask = (torch.arange(width, device=device)[None] < torch.tensor(lengths, device=device)[:, None]).long()
    pooled = torch.stack([entry[1] for entry in entries]).to(device)
    return GcmrEncoderOutput(last_hidden_state=states, attention_mask=mask, layer_states=layers,
                             query_vectors=pooled)


def _encode_into_cache(model: Any, input_ids: torch.Tensor, lengths: list[int], keys: list[bytes],
                       want_layers: bool) -> list[tuple[torch.Tensor, ...]]:
    """Run the frozen encoder on right-padded rows (their true `lengths`) and cache each row's entry under its key."""
    width = max(lengths)
    mask = (torch.arange(width, device=input_ids.device)[None]
            < torch.tensor(lengths, device=input_ids.device)[:, None]).long()
    computed = run_text_encoder(model, input_ids[:, :width], mask, None, want_layers, None, None, frozen=True)
    entries = []
    for position, length in enumerate(lengths):
        entry = (computed.last_hidden_state[position, :length].cpu(), computed.query_vectors[position].cpu())
        if want_layers:
            entry += (computed.layer_states[position, :, :length].cpu(),)
        model.encoder_cache.put(keys[position], entry)
        entries.append(entry)
    return entries


def prefill_encoder_cache(model: Any, token_rows: Iterable[Sequence[int]], batch_size: int = 64) -> int:
    """Encode the distinct `token_rows` (unpadded query token ids) into a frozen encoder's cache before training.

    Training meets its queries in shuffled batches, and a batch of captions is padded to its longest: encoding
    them in batches of similar length does the same work on about half the padded positions (f30k-dev's 2,028
    training captions through MiniLM on 2 CPU cores: 14.6 s in shuffled batches of 64, 6.7 s sorted by length).
    Rows already cached are skipped. Nothing is encoded (returns 0) unless the text encoder is frozen and its states
    are cached in training, or where the rows would not all fit in the cache: training would then evict what was
    filled before meeting it (least recently used first), and the prefill would be wasted work. Under DDP every
    process fills its own cache with every row (each meets all of them over the epochs). Returns the number of rows
    encoded.
    """
    if model.config.images_through_encoder or not model.text_encoder_is_frozen():
        return 0
    want_layers = model.fusion is not None
    cache = model.encoder_cache
    distinct: dict[bytes, Sequence[int]] = {}
    for row in token_rows:
        key = np.asarray(row, dtype=np.int64).tobytes()
        if not len(row) or key in distinct:
            continue
        entry = cache.get(key)
        if entry is None or (want_layers and len(entry) < 3):
            distinct[key] = row
    if not distinct:
        return 0
    # What the rows' states will take in the cache (an estimate before encoding: fp32 states per token, every layer's
    # where fusion keeps them, and the pooled vector).
    width = model.text_encoder().get_input_embeddings().embedding_dim
    token_bytes = 4 * width * (1 + (model.encoder_depth() if want_layers else 0))
    if cache.bytes + sum(token_bytes * len(row) + 4 * width for row in distinct.values()) > cache.max_bytes:
        return 0
    order = sorted(distinct, key=lambda key: len(distinct[key]))
    device = model.device
    for start in range(0, len(order), batch_size):
        keys = order[start: start + batch_size]
        lengths = [len(distinct[key]) for key in keys]
        input_ids = torch.zeros(len(keys), max(lengths), dtype=torch.long, device=device)
        for position, key in enumerate(keys):
            input_ids[position, : lengths[position]] = torch.as_tensor(distinct[key], dtype=torch.long)
        with torch.no_grad():
            _encode_into_cache(model, input_ids, lengths, keys, want_layers)
    return len(order)


def encode_format1(model: Any, input_ids, attention_mask, pixel_values, image_embeds, image_mask, inputs_embeds,
                    output_attentions, output_hidden_states) -> GcmrEncoderOutput:
    """Format 1: visual tokens prepended to the text embeddings and encoded together (checkpoints before 2)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("format 1 checkpoints encode images with a text prompt: pass input_ids")
    if inputs_embeds is None:
        inputs_embeds = model.get_input_embeddings()(input_ids)
    batch, length = inputs_embeds.shape[:2]
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.long, device=inputs_embeds.device)
    if pixel_values is not None or image_embeds is not None:
        visual, image_mask, _ = model.get_image_features(pixel_values, image_embeds, image_mask)
        if visual.shape[0] != batch:
            raise ValueError(f"{visual.shape[0]} images for {batch} text rows; give one (or a zero row) per row")
        inputs_embeds = torch.cat([visual.to(inputs_embeds.dtype), inputs_embeds], dim=1)
        visual_mask = image_mask[:, None].expand(batch, visual.shape[1]).to(attention_mask.dtype)
        attention_mask = torch.cat([visual_mask, attention_mask], dim=1)
    want_layers = model.fusion is not None or bool(output_hidden_states)
    encoded = model.text_encoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  output_hidden_states=want_layers, output_attentions=output_attentions,
                                  return_dict=True)
    return GcmrEncoderOutput(
        last_hidden_state=encoded.last_hidden_state,
        hidden_states=encoded.hidden_states if output_hidden_states else None,
        attentions=encoded.attentions if output_attentions else None,
        attention_mask=attention_mask,
        layer_states=torch.stack(encoded.hidden_states[1:], dim=1) if model.fusion is not None else None,
    )

# ---------------------------------------------------------------------------------------------------- decoding




def image_inputs(model: Any, pixel_values: torch.FloatTensor | None = None,
                       image_embeds: torch.FloatTensor | None = None,
                       image_mask: torch.BoolTensor | None = None) -> tuple[torch.Tensor, torch.BoolTensor, torch.Tensor | None]:
    """Visual tokens (B, num_visual_tokens, D_enc), the (B,) mask of rows that carry an image, and (format 2) the
    rows' image query vectors (B, D_id), zeros where there is no image.

    The vision tower and projectors run only on the rows with an image; the other rows get zeros.
    """
    if pixel_values is not None and image_embeds is not None:
        raise ValueError("pass either pixel_values or image_embeds for a batch, not both")
    if pixel_values is not None:
        if model.vision_tower is None:
            raise ValueError("this model has no vision tower (config.vision_config is None); pass image_embeds")
        check_pixel_values(model, pixel_values)
        images = pixel_values
    else:
        if model.embed_projector is None:
            raise ValueError("this model takes no image_embeds (config.image_embed_dim is None)")
        if image_embeds.ndim not in (2, 3) or image_embeds.shape[-1] != model.embed_projector.in_dim:
            raise ValueError(
                f"image_embeds must have shape (batch, {model.embed_projector.in_dim}) or "
                f"(batch, n, {model.embed_projector.in_dim}), got {tuple(image_embeds.shape)}"
            )
        images = image_embeds
    batch = images.shape[0]
    image_mask = torch.ones(batch, dtype=torch.bool, device=images.device) if image_mask is None else image_mask
    image_mask = image_mask.to(device=images.device, dtype=torch.bool)
    if image_mask.shape != (batch,):
        raise ValueError(f"image_mask must have shape ({batch},), got {tuple(image_mask.shape)}")
    rows = torch.nonzero(image_mask).flatten()
    visual = torch.zeros(batch, model.config.num_visual_tokens, model.config.encoder_hidden_size,
                         device=images.device, dtype=model.dtype)
    queries = None
    if model.query_projection is not None:
        queries = torch.zeros(batch, model.config.identifier_dim, device=images.device, dtype=model.dtype)
    if len(rows):
        if pixel_values is not None:
            tower = model.vision_tower(pixel_values=images[rows].to(model.vision_tower.dtype), return_dict=True)
            pooled = getattr(tower, "pooler_output", None)
            features = pooled if pooled is not None else tower.last_hidden_state[:, 0]
            tokens, query_projection = model.vision_projector(features), model.vision_query_projection
        else:
            features = images[rows].to(model.dtype)
            tokens, query_projection = model.embed_projector(features), model.image_query_projection
            features = features.mean(dim=1) if features.ndim == 3 else features
        visual = visual.index_copy(0, rows, tokens.to(visual.dtype))
        if queries is not None:
            queries = queries.index_copy(0, rows, F.normalize(query_projection(features), dim=-1).to(queries.dtype))
    return visual, image_mask, queries


def encode_inputs(model: Any, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
           pixel_values: torch.FloatTensor | None = None, image_embeds: torch.FloatTensor | None = None,
           image_mask: torch.BoolTensor | None = None, inputs_embeds: torch.FloatTensor | None = None,
           output_attentions: bool | None = None, output_hidden_states: bool | None = None) -> GcmrEncoderOutput:
    """The decoder's memory and the query vectors: visual tokens first, then the text encoder's states."""
    has_images = pixel_values is not None or image_embeds is not None
    if input_ids is not None and inputs_embeds is not None:
        raise ValueError("pass input_ids or inputs_embeds, not both")
    if model.config.images_through_encoder:
        return encode_format1(model, input_ids, attention_mask, pixel_values, image_embeds, image_mask,
                                    inputs_embeds, output_attentions, output_hidden_states)
    if input_ids is None and inputs_embeds is None and not has_images:
        raise ValueError("nothing to encode: pass input_ids (a text query) and/or image_embeds or pixel_values")
    want_layers = model.fusion is not None
    # Only distillation reads the dense vectors, so only a training pass with a distillation weight builds them.
    want_dense = model.training and model.config.distill_weight > 0
    parts, masks, layer_parts = [], [], []
    text_queries = image_queries = image_rows = text_dense = image_dense = None
    if has_images:
        visual, image_rows, image_queries = model.get_image_features(pixel_values, image_embeds, image_mask)
        if want_dense and image_embeds is not None and image_embeds.shape[-1] == model.config.identifier_dim:
            image_dense = F.normalize((image_embeds.mean(1) if image_embeds.ndim == 3 else image_embeds).float(), dim=-1)
        parts.append(visual)
        masks.append(image_rows[:, None].expand(-1, visual.shape[1]).long())
        if want_layers:
            layer_parts.append(visual[:, None].expand(-1, model.encoder_depth(), -1, -1))
    text = None
    if input_ids is not None or inputs_embeds is not None:
        text = encode_text(model, input_ids, attention_mask, inputs_embeds, want_layers, output_attentions,
                                 output_hidden_states)
        parts.append(text.last_hidden_state)
        masks.append(text.attention_mask.long())
        if want_layers:
            layer_parts.append(text.layer_states)
        text_queries = F.normalize(model.query_projection(text.query_vectors.to(model.dtype)), dim=-1)
        if want_dense and model.config.query_pooling == "pooler":
            # CLIP: its pooled text reaches the image space only through its projection (whatever the widths).
            text_dense = text_queries.detach().float()
        elif want_dense and text.query_vectors.shape[-1] == model.config.identifier_dim:
            text_dense = F.normalize(text.query_vectors.float(), dim=-1)
    batches = {part.shape[0] for part in parts}
    if len(batches) != 1:
        raise ValueError(f"images and text disagree on the batch size ({sorted(batches)}); give one image (or a "
                         "zero row with image_mask False) per text row")
    # A row with an image is a memorize row: the image is its query.
    queries = by_row(image_rows, image_queries, text_queries)
    dense = None
    if want_dense:
        unknown = torch.full((next(iter(batches)), model.config.identifier_dim), float("nan"), device=parts[0].device)
        dense = by_row(image_rows, image_dense if image_dense is not None or not has_images else unknown,
                       text_dense if text_dense is not None or text is None else unknown)
    return GcmrEncoderOutput(
        last_hidden_state=torch.cat([part.to(model.dtype) for part in parts], dim=1),
        hidden_states=text.hidden_states if text is not None else None,
        attentions=text.attentions if text is not None else None,
        attention_mask=torch.cat(masks, dim=1),
        layer_states=torch.cat(layer_parts, dim=2) if want_layers else None,
        query_vectors=queries,
        dense_vectors=dense,
        image_rows=image_rows,
    )

def as_encoder_output(encoder_outputs: Any, attention_mask: torch.Tensor | None) -> GcmrEncoderOutput:
    """Accept a GcmrEncoderOutput, a BaseModelOutput or a tuple; fill in the mask from `attention_mask`."""
    if isinstance(encoder_outputs, GcmrEncoderOutput):
        encoded = encoder_outputs
    elif isinstance(encoder_outputs, ModelOutput):
        encoded = GcmrEncoderOutput(last_hidden_state=encoder_outputs.last_hidden_state,
                                    hidden_states=getattr(encoder_outputs, "hidden_states", None),
                                    attentions=getattr(encoder_outputs, "attentions", None))
    else:
        encoded = GcmrEncoderOutput(last_hidden_state=encoder_outputs[0])
    if encoded.attention_mask is None:
        batch, length = encoded.last_hidden_state.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=encoded.last_hidden_state.device)
        if attention_mask.shape != (batch, length):
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} does not cover the encoder output ({batch}, {length})"
            )
        encoded.attention_mask = attention_mask
    return encoded

def by_row(image_rows: torch.Tensor | None, image_part: torch.Tensor | None,
            text_part: torch.Tensor | None) -> torch.Tensor | None:
    """Per row: the image's vector where the row carries an image, else the text's."""
    if text_part is None or image_rows is None:
        return image_part if text_part is None else text_part
    return torch.where(image_rows[:, None], image_part.to(text_part.dtype), text_part)


__all__ = [
    "FrozenEncoderCache", "GcmrEncoderOutput", "GcmrImageProjector", "by_row", "check_pixel_values", "encode_format1",
    "as_encoder_output", "encode_inputs", "image_inputs",
    "encode_text", "encode_text_cached", "identity_init_", "pool_text", "prefill_encoder_cache", "run_text_encoder",
]
