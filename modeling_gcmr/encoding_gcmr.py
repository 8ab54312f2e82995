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

import torch
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
            width is the identifier width) or the image feature itself; the dense teacher of distillation.
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


__all__ = ["FrozenEncoderCache", "GcmrEncoderOutput", "GcmrImageProjector", "identity_init_", "pool_text"]
