"""ACE's coarse-to-fine fusion of all encoder layers into the decoder (Fang et al., 2024/2025).

The paper feeds the decoder the hidden states of *every* encoder layer, along two routes whose results are summed:

- **coarse**: a linear map over the layer axis mixes the L layer outputs into one memory; the decoder
  cross-attends to it and the result passes a sigmoid self-gate, ``c * sigmoid(W_g c)``;
- **fine**: the decoder cross-attends to each layer separately and the L results are combined with learned
  softmax weights.

How this implementation differs from the paper, and why:

- The fusion is applied once, *after* the backbone's decoder stack (to its final hidden states, before the LM
  head), not inside every decoder layer: the backbone's decoder layers (T5, BERT, ...) are library code whose
  cross-attention we do not rewrite. The backbone's own cross-attention to the last encoder layer stays in place.
- One cross-attention module is shared by the L fine-route attentions (the paper does not say whether they share
  weights); this keeps the parameter count independent of depth and lets the L attentions run as one batch.
- Each layer's states pass one shared LayerNorm first: intermediate residual streams of pre-LN encoders (T5) are
  not normalised and differ in scale from layer to layer.
- The output projections of both cross-attentions start at zero, so a freshly added fusion is an exact no-op and
  training starts from the backbone's behaviour (the projections still get gradient, so the fusion learns).
- For encoder-decoder pairs with different hidden sizes (e.g. a MiniLM encoder and a smaller decoder) the encoder
  states are first projected to the decoder's size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FusionCrossAttention(nn.Module):
    """Multi-head cross-attention from decoder states to one memory, with a key padding mask."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide hidden_size ({hidden_size})")
        self.num_heads = num_heads
        self.query_proj = nn.Linear(hidden_size, hidden_size)
        self.key_proj = nn.Linear(hidden_size, hidden_size)
        self.value_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        """queries (N, T, D), memory (N, S, D), memory_mask (N, S) bool, True where a key may be attended."""
        q = self._heads(self.query_proj(queries))
        k, v = self._heads(self.key_proj(memory)), self._heads(self.value_proj(memory))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=memory_mask[:, None, None, :])
        return self.out_proj(out.transpose(1, 2).reshape(queries.shape))


class CoarseToFineFusion(nn.Module):
    """Adds ACE's coarse (layer-mixed, gated) and fine (per-layer, weighted) cross-attention to decoder states.

    Args:
        num_layers: how many encoder layers are fused (the encoder's depth).
        encoder_hidden_size: width of the encoder states.
        decoder_hidden_size: width of the decoder states (the output width).
        num_heads: attention heads of both cross-attentions.
    """

    def __init__(self, num_layers: int, encoder_hidden_size: int, decoder_hidden_size: int, num_heads: int):
        super().__init__()
        self.num_layers = num_layers
        self.memory_proj = (
            nn.Linear(encoder_hidden_size, decoder_hidden_size)
            if encoder_hidden_size != decoder_hidden_size
            else nn.Identity()
        )
        self.memory_norm = nn.LayerNorm(decoder_hidden_size)
        # coarse route: a linear map over the layer axis, then attention and a sigmoid self-gate
        self.layer_mix = nn.Parameter(torch.full((num_layers,), 1.0 / num_layers))
        self.coarse_attention = FusionCrossAttention(decoder_hidden_size, num_heads)
        self.gate = nn.Linear(decoder_hidden_size, decoder_hidden_size)
        # fine route: one attention per layer, combined with softmax weights
        self.fine_layer_logits = nn.Parameter(torch.zeros(num_layers))
        self.fine_attention = FusionCrossAttention(decoder_hidden_size, num_heads)

    def forward(
        self, decoder_states: torch.Tensor, encoder_layers: torch.Tensor, encoder_mask: torch.Tensor
    ) -> torch.Tensor:
        """Fuse.

        Args:
            decoder_states: (B, T, D_dec) final decoder hidden states.
            encoder_layers: (B, L, S, D_enc) the output of every encoder layer.
            encoder_mask: (B, S) 1/True where an encoder position is real.

        Returns:
            (B, T, D_dec): decoder_states + coarse + fine.
        """
        batch, num_layers, length, _ = encoder_layers.shape
        if num_layers != self.num_layers:
            raise ValueError(f"fusion expects {self.num_layers} encoder layers, got {num_layers}")
        memory = self.memory_norm(self.memory_proj(encoder_layers))
        mask = encoder_mask.to(torch.bool)

        mixed = torch.einsum("l,blsd->bsd", self.layer_mix.to(memory.dtype), memory)
        coarse = self.coarse_attention(decoder_states, mixed, mask)
        coarse = coarse * torch.sigmoid(self.gate(coarse))

        steps = decoder_states.shape[1]
        per_layer = self.fine_attention(
            decoder_states.unsqueeze(1).expand(batch, num_layers, steps, -1).reshape(batch * num_layers, steps, -1),
            memory.reshape(batch * num_layers, length, -1),
            mask.unsqueeze(1).expand(batch, num_layers, length).reshape(batch * num_layers, length),
        ).view(batch, num_layers, steps, -1)
        weights = torch.softmax(self.fine_layer_logits, dim=0).to(per_layer.dtype)
        fine = torch.einsum("l,bltd->btd", weights, per_layer)
        return decoder_states + coarse + fine


__all__ = ["CoarseToFineFusion", "FusionCrossAttention"]
