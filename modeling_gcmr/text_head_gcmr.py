"""The text head: identifiers spelled with vocabulary tokens, scored by the backbone's LM head.

String and semantic identifiers (text pieces), and every format 1 checkpoint, score the whole vocabulary at each
step and decode with `generate()` under `PrefixTrieLogitsProcessor`; training is token cross-entropy (plus ACE's
R-Drop consistency when `consistency_weight > 0`).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutput

from .encoding_gcmr import GcmrEncoderOutput

# Label positions to ignore (padding), as transformers' losses expect.
LABEL_PAD_ID = -100


def text_head_loss(model: Any, encoded, labels, decoder_input_ids, decoder_attention_mask, cache, use_cache, rdrop):
    if labels is not None and decoder_input_ids is None:
        decoder_input_ids = shift_right(model, labels)
    if labels is not None:
        use_cache = False
    logits, states, cache = text_logits(model, encoded, decoder_input_ids, decoder_attention_mask, cache, use_cache)
    loss = consistency = None
    if labels is not None:
        labels = labels.to(logits.device)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=LABEL_PAD_ID)
        if rdrop:
            first, second = logits.float().chunk(2)
            consistency = symmetric_kl(first, second, labels.chunk(2)[0] != LABEL_PAD_ID)
            loss = loss + model.config.consistency_weight * consistency
            logits = logits.chunk(2)[0]
    return loss, logits, states, cache if use_cache is not False else None, consistency


def text_logits(model: Any, encoded: GcmrEncoderOutput, decoder_input_ids, decoder_attention_mask, cache,
                 use_cache) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
    """(logits, final decoder states or None, cache) of the text head."""
    if model.fusion is None:
        out = model.backbone(attention_mask=encoded.attention_mask,
                            encoder_outputs=BaseModelOutput(last_hidden_state=encoded.last_hidden_state),
                            decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                            cache=cache, use_cache=use_cache, return_dict=True)
        return out.logits, None, out.cache
    embeddings = model.backbone.get_decoder().get_input_embeddings()
    states, cache = model.decoder_states(embeddings(decoder_input_ids), encoded, cache=cache, use_cache=use_cache,
                                        attention_mask=decoder_attention_mask)
    return lm_head(model, states), states, cache


def lm_head(model: Any, states: torch.Tensor) -> torch.Tensor:
    if model.is_encoder_decoder_pair():
        decoder_lm = model.backbone.decoder
        heads = [m for n, m in decoder_lm.named_children() if n != decoder_lm.base_model_prefix]
        if len(heads) != 1:
            raise ValueError(f"cannot find the LM head of {type(decoder_lm).__name__} (children: {heads})")
        return heads[0](states)
    if getattr(model.backbone.config, "scale_decoder_outputs", False):
        # T5 with tied embeddings rescales before the LM head
        states = states * (model.backbone.config.d_model**-0.5)
    return model.backbone.lm_head(states)


def shift_right(model: Any, labels: torch.LongTensor) -> torch.LongTensor:
    shifted = labels.new_full(labels.shape, model.config.pad_token_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = model.config.decoder_start_token_id
    return shifted.masked_fill(shifted == LABEL_PAD_ID, model.config.pad_token_id)



def symmetric_kl(first: torch.Tensor, second: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(KL(p1||p2) + KL(p2||p1)) / 2, summed over the last axis and averaged over the kept positions."""
    log_p, log_q = torch.log_softmax(first, dim=-1), torch.log_softmax(second, dim=-1)
    per_position = 0.5 * ((log_p.exp() * (log_p - log_q)).sum(-1) + (log_q.exp() * (log_q - log_p)).sum(-1))
    return (per_position * keep).sum() / keep.sum().clamp_min(1)


__all__ = ["LABEL_PAD_ID", "lm_head", "shift_right", "symmetric_kl", "text_head_loss", "text_logits"]
