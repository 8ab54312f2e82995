"""The training loss of the identifier head (see `identifier_head_gcmr.py` for how identifiers are scored).

Per batch: teacher-force the decoder on the gold paths; softmax over all identifiers (and per-depth prefixes) of
the summed dot products, every candidate scored with the gold path's query vectors; the hardest negatives scored
again with their own decoder states; and, as options, GENIUS's query/target interpolation, distillation from the
dense teacher, and R-Drop.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from .encoding_gcmr import GcmrEncoderOutput
from .text_head_gcmr import symmetric_kl


def identifier_head_loss(model: Any, encoded, labels, rdrop):
    head = model.identifier_head
    if labels is None:
        # No path to follow: every identifier scored with its step-0 query vector (the decoder-free estimate).
        summed = torch.zeros(head.num_identifiers, head.edge_vectors.shape[1], device=head.edge_vectors.device)
        paths = head.paths.long()
        for depth in range(paths.shape[1]):
            valid = paths[:, depth] >= 0
            summed[valid] += head.vectors_of(paths[valid, depth])
        return None, head.scale * encoded.query_vectors @ summed.T, None, None
    gold = head.identifier_index(labels.to(head.paths.device), model.config.eos_token_id)
    paths = head.paths.long()[gold]
    # A collection of one identifier has no negative to score (and a 0-row decoder pass cannot run): off there.
    negatives_on = model.config.hard_negatives > 0 and model.training and head.num_identifiers > 1
    # A frozen, zero step correction makes every step's query the base query: the decoder's states would meet only
    # that zero map (the same loss, at a fraction of the cost; evaluation still runs it for its hidden states).
    idle = model.training and head.decoder_is_idle
    # With hard negatives, keep the cross-attention keys and values of the memory: the negatives reuse them.
    states, cache = (None, None) if idle else model.decoder_states(head.decoder_inputs(paths), encoded,
                                                                   use_cache=negatives_on)
    base = interpolated_queries(model, encoded, paths)
    queries = base[:, None, :].expand(-1, paths.shape[1], -1) if idle else head.step_queries(base, states)
    candidates, gold_position = head.candidates(gold)
    teacher = teacher_scores(model, encoded, candidates)
    loss, logits = head.loss(queries, gold_position, model.config.prefix_loss_weight, teacher,
                             model.config.distill_weight, candidates)
    if negatives_on:
        loss = loss + hard_negative_loss(model, encoded, base, logits, gold_position, candidates,
                                         None if idle else cache.cross_attention_cache)
    consistency = None
    if rdrop:
        first, second = logits.float().chunk(2)
        consistency = symmetric_kl(first[:, None], second[:, None], torch.ones(len(first), 1, device=first.device))
        loss = loss + model.config.consistency_weight * consistency
        logits = logits.chunk(2)[0]
    return loss, logits, states, consistency


def hard_negative_loss(model: Any, encoded: GcmrEncoderOutput, base: torch.Tensor, logits: torch.Tensor,
                       gold_position: torch.Tensor, candidates: torch.Tensor | None,
                       memory_cache: DynamicCache | None) -> torch.Tensor:
    """Cross-entropy of the gold identifier against the hardest negatives, each scored with its *own* decoder
    states. The softmax over all identifiers scores every candidate with the gold path's query vectors (one
    decoder pass instead of one per identifier); beam search scores each path with its own, and a decoder
    trained on gold prefixes alone learns to boost any path it follows (R@10 rose, R@1 fell on f30k-dev).
    Scoring the negatives that look best under the shared vectors with their own states closes that gap.

    The memory's cross-attention keys and values (`memory_cache`, from the gold pass) are shared by a query's
    negatives rather than projected again for each: they were most of the cost of this loss. None: the decoder is
    idle (`IdentifierHead.decoder_is_idle`), and a negative's own score is its base-query score."""
    count = min(model.config.hard_negatives, logits.shape[1] - 1)
    with torch.no_grad():
        masked = logits.detach().scatter(1, gold_position[:, None], float("-inf"))
        negatives = masked.topk(count, dim=1).indices
        if candidates is not None:
            negatives = candidates[negatives]
        gold = gold_position if candidates is None else candidates[gold_position]
        negatives, unused = _with_mined_negatives(model, negatives, gold)
    negative_scores = own_path_scores(model, encoded, base, negatives, memory_cache)
    if unused is not None:
        negative_scores = negative_scores.masked_fill(unused, float("-inf"))
    gold_scores = logits.gather(1, gold_position[:, None])
    scores = torch.cat([gold_scores, negative_scores], dim=1).float()
    return F.cross_entropy(scores, torch.zeros(len(scores), dtype=torch.long, device=scores.device))


def _with_mined_negatives(model: Any, negatives: torch.Tensor,
                          gold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Add the negatives mined from the model's own beam (`identifier_head.mined_negatives`, (N, M) identifier rows
    per gold identifier, -1 padded; set between epochs by `training.callbacks.BeamNegativesCallback`, never saved)
    to the shared-vector ones. Returns the negatives and a mask of entries to ignore (padding, the gold itself, or
    a repeat of a shared-vector negative; None when nothing was mined)."""
    mined = getattr(model.identifier_head, "mined_negatives", None)
    if mined is None:
        return negatives, None
    extra = mined.to(gold.device)[gold]
    unused = (extra < 0) | (extra == gold[:, None]) | (extra[:, :, None] == negatives[:, None, :]).any(-1)
    extra = torch.where(unused, gold[:, None], extra)
    keep = torch.zeros_like(negatives, dtype=torch.bool)
    return torch.cat([negatives, extra], dim=1), torch.cat([keep, unused], dim=1)


def own_path_scores(model: Any, encoded: GcmrEncoderOutput, base: torch.Tensor, identifiers: torch.Tensor,
                    memory_cache: DynamicCache | None) -> torch.Tensor:
    """The score of each identifier (B, K) for its row's query, with the decoder run on that identifier's own path:
    what beam search computes. `memory_cache` holds the cross-attention keys and values of the rows' memory (None:
    an idle decoder, so every step scores with the base query)."""
    head = model.identifier_head
    batch, count = identifiers.shape
    rows = torch.arange(batch, device=identifiers.device).repeat_interleave(count)
    paths = head.paths.long()[identifiers.flatten()]
    if memory_cache is None:
        queries = base[rows][:, None, :]
    else:
        shared = DynamicCache()
        for index, layer in enumerate(memory_cache.layers):
            shared.update(layer.keys[rows], layer.values[rows], index)
        states, _ = model.decoder_states(head.decoder_inputs(paths), encoded, rows=rows, use_cache=True,
                                         cache=EncoderDecoderCache(DynamicCache(), shared))
        queries = head.step_queries(base[rows], states)[:, : paths.shape[1]]
    steps = (queries * head.vectors_of(paths.clamp(min=0))).sum(-1) * (paths >= 0)
    return (head.scale * steps.sum(1)).view(batch, count)


def interpolated_queries(model: Any, encoded: GcmrEncoderOutput, paths: torch.Tensor) -> torch.Tensor:
    """GENIUS's query/target interpolation on a share of the text rows while training."""
    queries, probability = encoded.query_vectors, model.config.interpolation_prob
    if not (model.training and probability > 0):
        return queries
    head = model.identifier_head
    target = (head.vectors_of(paths.clamp(min=0)) * (paths >= 0)[..., None]).sum(1).detach()
    mix = torch.rand(len(queries), device=queries.device) < probability
    if encoded.image_rows is not None:
        mix &= ~encoded.image_rows
    share = torch.distributions.Beta(2.0, 2.0).sample((len(queries), 1)).to(queries.device)
    mixed = F.normalize(share.sqrt() * queries + (1 - share).sqrt() * F.normalize(target, dim=-1), dim=-1)
    return torch.where(mix[:, None], mixed, queries)


def teacher_scores(model: Any, encoded: GcmrEncoderOutput, candidates: torch.Tensor | None) -> torch.Tensor | None:
    """Dense teacher logits for distillation: each query before any learned map against the stored features. Rows
    whose query has no vector in the features' space (images given as pixels) are NaN and take no part."""
    if not (model.config.distill_weight > 0 and model.training):
        return None
    dense = encoded.dense_vectors
    untaught_text = dense.isnan().any(dim=-1) if dense is not None else None
    if untaught_text is not None and encoded.image_rows is not None:
        untaught_text &= ~encoded.image_rows
    if model.stored_image_features is None or untaught_text is None or untaught_text.any():
        raise ValueError("distill_weight > 0 needs stored image features (store_image_features) and queries that "
                         "live in their space (text encoder width = image feature width, or image features)")
    features = model.stored_image_features if candidates is None else model.stored_image_features[candidates]
    return model.config.score_scale * dense @ features.T.float()


__all__ = ["identifier_head_loss"]
