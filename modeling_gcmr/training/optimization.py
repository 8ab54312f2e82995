"""Per-part learning rates for the identifier head: the trie's edge vectors, the query projections and the rest.

Why: a dense-aware start is already a good retriever (step 0 ranks like dense inner-product search), and AdamW
moves every weight by about the learning rate per step whatever its gradient's size. At the decoder's learning
rate (3e-4) that is a large step for the edge vectors (entries of about 0.05, deeper residual levels smaller) and
for the identity query projection (384 x 384 entries that start at 0 or 1): within the first epoch they drift
away from the start faster than the decoder learns, and recall drops (docs/real_captions.md, "Tuning").
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

# Parameter name prefixes of each part (names as `GcmrForRetrieval.named_parameters()` gives them).
EDGE_PARAMETERS = ("identifier_head.edge_vectors",)
QUERY_PARAMETERS = ("query_projection.", "image_query_projection.", "vision_query_projection.")


def parameter_part(name: str) -> str:
    """'edge', 'query' or 'rest': which learning rate a parameter of a GcmrForRetrieval takes."""
    # PEFT and DDP wrappers prefix the names; the part is decided by what the name ends with.
    for prefix in EDGE_PARAMETERS:
        if name == prefix or name.endswith("." + prefix):
            return "edge"
    for prefix in QUERY_PARAMETERS:
        if name.startswith(prefix) or f".{prefix}" in name:
            return "query"
    return "rest"


def parameter_groups(model: nn.Module, learning_rate: float, weight_decay: float = 0.0,
                     edge_learning_rate: float | None = None,
                     query_learning_rate: float | None = None) -> list[dict[str, Any]]:
    """Optimizer parameter groups of the trainable parameters: one per (part, weight decay) pair that has any.

    Args:
        learning_rate: of everything but the edge vectors and query projections (decoder, step query map, ...).
        weight_decay: as `Trainer` applies it (not to biases and norms).
        edge_learning_rate / query_learning_rate: of the edge vectors / query projections; None: `learning_rate`;
            0 keeps them fixed (they still get no gradient step, and AdamW keeps no moment for them).
    """
    rates = {"edge": edge_learning_rate, "query": query_learning_rate, "rest": None}
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


def optimizer_cls_and_kwargs(model: nn.Module, args: TrainingArguments, edge_learning_rate: float | None,
                             query_learning_rate: float | None) -> tuple[type, dict[str, Any]] | None:
    """`Trainer(optimizer_cls_and_kwargs=...)` for per-part learning rates: the optimizer `args` names (AdamW by
    default), with `parameter_groups`; None when both rates are None (then the Trainer builds its own, unchanged).
    The Trainer's scheduler scales every group alike, so warm-up and decay apply to each part's own rate."""
    if edge_learning_rate is None and query_learning_rate is None:
        return None
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    if "params" in kwargs or "model" in kwargs:
        raise ValueError(f"--optim {args.optim} builds its own parameter groups: per-part learning rates "
                         "(--edge_learning_rate, --query_learning_rate) need an optimizer like adamw_torch")
    groups = parameter_groups(model, args.learning_rate, args.weight_decay, edge_learning_rate, query_learning_rate)
    return optimizer_cls, {**kwargs, "params": groups}


__all__ = ["optimizer_cls_and_kwargs", "parameter_groups", "parameter_part"]
