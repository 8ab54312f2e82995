"""Per-part learning rates for the identifier head: the trie's edge vectors, the query projections, the text encoder,
and the decoder with everything else.

Why: a dense-aware start is already a good retriever (step 0 ranks like dense inner-product search); what training
may move, and how fast, decides whether it ends above that start. Measured on f30k-dev (docs/real_captions.md,
"Tuning"): the decoder's per-step correction (`q_t = q_0 + W h_t`, W starting at zero) trained at the common rate
is what loses R@1 in the first epoch, while the edge vectors and the query projection at that rate gain it.

Large collections: where the head samples its softmax, the edge vectors train with sparse gradients and `LazyAdamW`
(`sparse_edge_gradients`, `lazy_adamw.py`), so that a step costs what it reads, not the whole edge table.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from .lazy_adamw import LazyAdamW

# Parameter name prefixes of each part (names as `GcmrForRetrieval.named_parameters()` gives them).
EDGE_PARAMETERS = ("identifier_head.edge_vectors",)
# The vision tower makes the image queries: in the decoder part, a fixed decoder froze it (glyphs read from pixels,
# `benchmarks/memorization.py` with the decoder fixed: own-pixel R@1 15.0; with the tower here 84.5).
QUERY_PARAMETERS = ("query_projection.", "image_query_projection.", "vision_query_projection.", "vision_tower.")
# The text encoder (with the token embeddings it shares with the decoder, and the projectors of visual tokens into
# it): what a model from scratch learns its text queries with. In the decoder part, a fixed decoder froze it, and with
# it a pretrained encoder that `--freeze_text_encoder false` had asked to train (frozen by default anyway).
ENCODER_PARAMETERS = ("backbone.encoder.", "backbone.shared.", "backbone.model.encoder.", "backbone.model.shared.",
                      "embed_projector.", "vision_projector.")
PARTS = ("edge", "query", "encoder", "decoder")
EDGE_OPTIMIZER_STATES = ("full", "row_wise")
# The decoder's rate as a share of --learning_rate for a dense-aware start: 0, so the decoder stays at its zero
# correction and neither training nor search runs it (`IdentifierHead.decoder_is_idle`). Chosen on the dev sets with
# held-out features (docs/real_captions.md, "A fixed decoder"): against the earlier 0.1 with 4 hard negatives, R@1
# 60.7 vs 59.8 (f30k-dev coarse_fine), 50.0 vs 50.1 (coco-dev coarse_fine), 61.8 vs 61.2 (f30k-dev semantic), with
# 2.5-3.2x less training time and search 1.3-3.4x faster. 0.1 had itself been chosen over the common rate, which
# lost R@1 in the first epoch ("Tuning: training that beats its start").
DENSE_START_DECODER_SHARE = 0.0
# A dense-aware start whose identifiers are longer than LONG_IDENTIFIER_LENGTH tokens (semantic ids: 16) trains
# every part at LONG_IDENTIFIER_SHARE of its default rate. AdamW moves each edge vector by about the rate per step
# whatever its gradient, and a score sums one edge per token, so a 16-token path drifts about four times as far per
# step as the 3-4 tokens the defaults were chosen for. On f30k-dev (docs/real_captions.md, "Tuning semantic
# identifiers"), semantic ids at the default rates lost 6.7 R@1 against their step 0 under the benchmark's protocol
# and gained 4.1 with held-out features; at a third of the rates they lost 1.9 and gained 7.2 (at a tenth: -0.6 and
# +3.8; slowing only the decoder or only the edges still lost 3.4-3.5).
LONG_IDENTIFIER_LENGTH = 8
LONG_IDENTIFIER_SHARE = 1 / 3


def parameter_part(name: str) -> str:
    """'edge', 'query', 'encoder' or 'decoder' (everything else): which learning rate a parameter of a
    GcmrForRetrieval takes."""
    # PEFT and DDP wrappers prefix the names; the part is decided by what the name ends with.
    for prefix in EDGE_PARAMETERS:
        if name == prefix or name.endswith("." + prefix):
            return "edge"
    for part, prefixes in (("query", QUERY_PARAMETERS), ("encoder", ENCODER_PARAMETERS)):
        if any(name.startswith(prefix) or f".{prefix}" in name for prefix in prefixes):
            return part
    return "decoder"


def parameter_groups(model: nn.Module, learning_rate: float, weight_decay: float = 0.0,
                     edge_learning_rate: float | None = None, query_learning_rate: float | None = None,
                     decoder_learning_rate: float | None = None,
                     encoder_learning_rate: float | None = None) -> list[dict[str, Any]]:
    """Optimizer parameter groups of the trainable parameters: one per (part, weight decay) pair that has any.

    Args:
        learning_rate: the rate of every part whose own rate is None.
        weight_decay: as `Trainer` applies it (not to biases and norms).
        edge_learning_rate / query_learning_rate / encoder_learning_rate / decoder_learning_rate: of the edge
            vectors / the query projections / the text encoder / everything else (decoder, step query map, score
            scale); 0 keeps that part fixed (it is left out of the optimizer).
    """
    rates = dict(zip(PARTS, (edge_learning_rate, query_learning_rate, encoder_learning_rate, decoder_learning_rate)))
    for part, rate in rates.items():
        if rate is not None and rate < 0:
            raise ValueError(f"the {part} learning rate must be >= 0, got {rate}")
        rates[part] = learning_rate if rate is None else rate
    decay = set(Trainer.get_decay_parameter_names(None, model))
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        part = parameter_part(name)
        if parameter.requires_grad and rates[part] > 0:
            groups.setdefault((part, name in decay), []).append(parameter)
    return [{"params": params, "lr": rates[part], "weight_decay": weight_decay if decays else 0.0, "gcmr_part": part}
            for (part, decays), params in groups.items()]


def part_learning_rates(config: Any, args: Any) -> dict[str, float | None]:
    """The per-part rates `args` asks for (`edge_`, `query_`, `encoder_`, `decoder_learning_rate`),
    with the recommended defaults filled in for a dense-aware start (identifier head, queries in the features'
    space): the decoder at `DENSE_START_DECODER_SHARE` of `learning_rate` (0: fixed), and every part whose rate is
    not given at `LONG_IDENTIFIER_SHARE` of its default where identifiers are longer than `LONG_IDENTIFIER_LENGTH`
    tokens.
    Anything else keeps None (the common rate): models from scratch learn their decoder from nothing."""
    rates = {part: getattr(args, f"{part}_learning_rate", None) for part in PARTS}
    dense_start = (getattr(config, "identifier_head", None) == "identifier"
                   and getattr(config, "shared_query_space", False))
    if not dense_start:
        return rates
    share = LONG_IDENTIFIER_SHARE if getattr(config, "max_identifier_length", 0) > LONG_IDENTIFIER_LENGTH else 1.0
    defaults = {"edge": share * args.learning_rate, "query": share * args.learning_rate,
                "encoder": share * args.learning_rate,
                "decoder": share * DENSE_START_DECODER_SHARE * args.learning_rate}
    return {part: defaults[part] if rate is None else rate for part, rate in rates.items()}


def sparse_edge_gradients(model: nn.Module) -> bool:
    """Whether training `model` should read its edge vectors with sparse gradients (and `LazyAdamW`): where the
    identifier head samples its softmax (more than FULL_SOFTMAX_LIMIT identifiers), so that a step touches a share
    of the edges. Not in distributed training: DDP all-reduces `.grad`, and the sparse gradient lives beside it
    (`lazy_adamw.py`)."""
    head = getattr(model, "identifier_head", None)
    if head is None or not head.samples_softmax:
        return False
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    # WORLD_SIZE: launched by torchrun, before the Trainer initialises the process group.
    return not distributed and int(os.environ.get("WORLD_SIZE", "1")) <= 1


def optimizer_cls_and_kwargs(model: nn.Module, args: TrainingArguments, edge_learning_rate: float | None = None,
                             query_learning_rate: float | None = None, decoder_learning_rate: float | None = None,
                             encoder_learning_rate: float | None = None,
                             trainable_edge_rows: torch.Tensor | None = None) -> tuple[type, dict[str, Any]] | None:
    """`Trainer(optimizer_cls_and_kwargs=...)` for per-part learning rates: the optimizer `args` names (AdamW by
    default), with `parameter_groups`; None when every rate is None and the edge gradients stay dense (then the
    Trainer builds its own, unchanged). The Trainer's scheduler scales every group alike, so warm-up and decay apply
    to each part's own rate.

    Where `sparse_edge_gradients(model)` (a sampled softmax), the model's head is switched to sparse gradients and
    AdamW (`--optim adamw_torch`, the default) becomes `LazyAdamW`, which takes over `args.max_grad_norm` (the
    Trainer's clipping cannot see the sparse gradient; it is set to 0 in `args`, and the norm the Trainer logs leaves
    the edge vectors out). Another optimizer keeps dense gradients. Parts whose rate is 0 are frozen
    (`requires_grad=False`): a decoder fixed at its zero start then does not run in training
    (`IdentifierHead.decoder_is_idle`), nor, through `reads_decoder_states`, in search.

    `args.edge_optimizer_state == "row_wise"` (GcmrTrainingArguments) keeps the edge vectors' state per row
    (`lazy_adamw.py`): LazyAdamW, sparse gradients or not. `trainable_edge_rows` (a (edges,) bool tensor) trains
    only those edge vectors (`refresh_after_add`): LazyAdamW, which then clips in place of the Trainer, so that the
    frozen rows' gradients count in no norm."""
    rates = dict(zip(PARTS, (edge_learning_rate, query_learning_rate, encoder_learning_rate, decoder_learning_rate)))
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    state = getattr(args, "edge_optimizer_state", "full")
    if state not in EDGE_OPTIMIZER_STATES:
        raise ValueError(f"--edge_optimizer_state must be one of {EDGE_OPTIMIZER_STATES}, got {state!r}")
    row_wise = state == "row_wise"
    restricted = trainable_edge_rows is not None
    if (row_wise or restricted) and optimizer_cls is not torch.optim.AdamW:
        asked = "--edge_optimizer_state row_wise" if row_wise else "training only some edge vectors (a refresh)"
        raise ValueError(f"{asked} needs LazyAdamW (--optim adamw_torch, the default), not --optim {args.optim}")
    sparse = optimizer_cls is torch.optim.AdamW and sparse_edge_gradients(model)
    if sparse or restricted:
        model.identifier_head.sparse_gradients = sparse
        optimizer_cls, kwargs = LazyAdamW, {**kwargs, "max_grad_norm": args.max_grad_norm or 0.0}
        args.max_grad_norm = 0.0
    elif row_wise:
        optimizer_cls = LazyAdamW  # dense gradients: the Trainer clips them itself
    elif all(rate is None for rate in rates.values()):
        return None
    if "params" in kwargs or "model" in kwargs:
        raise ValueError(f"--optim {args.optim} builds its own parameter groups: per-part learning rates "
                         "(--edge/query/encoder/decoder_learning_rate) need an optimizer like adamw_torch")
    for name, parameter in model.named_parameters():
        if rates[parameter_part(name)] == 0:
            # Fixed parts need no gradient, and a fixed zero step correction lets training skip the decoder.
            parameter.requires_grad_(False)
    groups = parameter_groups(model, args.learning_rate, args.weight_decay, edge_learning_rate, query_learning_rate,
                              decoder_learning_rate, encoder_learning_rate)
    for group in groups:
        group["row_wise"] = row_wise and group["gcmr_part"] == "edge"
        if restricted and group["gcmr_part"] == "edge":
            group["trainable_rows"] = trainable_edge_rows
    return optimizer_cls, {**kwargs, "params": groups}


__all__ = ["DENSE_START_DECODER_SHARE", "EDGE_OPTIMIZER_STATES", "ENCODER_PARAMETERS", "LONG_IDENTIFIER_LENGTH",
           "LONG_IDENTIFIER_SHARE", "optimizer_cls_and_kwargs", "parameter_groups", "parameter_part",
           "part_learning_rates", "sparse_edge_gradients"]
