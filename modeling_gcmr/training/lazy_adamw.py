"""AdamW that updates a parameter with a sparse gradient in the gradient's rows only (a "lazy" Adam).

Why: past `FULL_SOFTMAX_LIMIT` identifiers the identifier head scores a batch against a sample of identifiers, so a
step reads a few hundred thousand of a million-image trie's two million edge vectors. With dense gradients AdamW
still writes a full (edges x D) gradient and updates every row: at a million images that gradient alone is 4.4 GB
beside the vectors and their two moments, and the step did not fit in 18 GB (benchmarks/scale.py). With
`IdentifierHead.sparse_gradients` the lookups leave a sparse gradient, and this optimizer updates the rows it holds
exactly as AdamW updates them (same moments, bias correction by the parameter's own step count, decoupled weight
decay); rows a step does not read keep their values and moments, as in TensorFlow's LazyAdam and torch's SparseAdam
(which takes no weight decay and no dense parameters, hence this class). Dense parameters go through `AdamW.step`
unchanged. Where every row is read at every step the two are the same optimizer.

Where the sparse gradient lives: in `parameter.sparse_grad`, beside `.grad`, which stays None. transformers' Trainer
runs torch's `clip_grad_norm_` over `.grad` at every step (to log the norm, also without clipping), and that has no
kernel for sparse tensors. Clipping therefore moves in here (`max_grad_norm`, over dense and sparse gradients
together); `optimization.optimizer_cls_and_kwargs` hands the Trainer's `max_grad_norm` over. A sparse `.grad` (an
`nn.Embedding(sparse=True)`) is taken as well.

Row-wise state (a parameter group with `"row_wise": True`, `--edge_optimizer_state row_wise`): AdamW's two moments
are two more copies of the edge table (4.6 GB of a million-image training step's 11 GB, benchmarks/scale.py). There
the group keeps, per row, one second moment (the mean of the row's squared gradient) and the row's own step count,
and no first moment: AdamW with beta1 = 0 whose denominator is shared by a row's values, as large recommendation
embedding tables train (FBGEMM's row-wise optimizers). The step count is per row so that a row first read late in
training starts with a bias-corrected step of about the learning rate, as AdamW's first step does (with the
parameter's count its first denominator would be sqrt(1 - beta2) of the gradient: a 30x step). Dense gradients in
such a group take the same step over every row.

Frozen rows (a parameter group with `"trainable_rows"`, a (rows,) bool tensor): only those rows step, whether the
gradient is sparse or dense; the others keep their values exactly (no weight decay either), their gradients count in
no clipping norm, and the state holds the trainable rows only, in their order (a refresh of 10,000 images at a
million holds their moments, not 4.6 GB of zeros). `refresh_after_add` trains the new identifiers' own edges this
way.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch


def sparse_gradient(parameter: torch.Tensor) -> torch.Tensor | None:
    """The parameter's sparse gradient (`sparse_grad`, or a sparse `.grad`), or None."""
    held = getattr(parameter, "sparse_grad", None)
    if held is not None:
        return held
    return parameter.grad if parameter.grad is not None and parameter.grad.is_sparse else None


class LazyAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` that also takes sparse gradients, updating only their rows (module docstring).

    Args:
        params, lr, betas, eps, weight_decay, **kwargs: as `torch.optim.AdamW`.
        max_grad_norm: clip the gradients of all its parameters together to this L2 norm before each step (0: no
            clipping), as `torch.nn.utils.clip_grad_norm_` does.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, max_grad_norm: float = 0.0, **kwargs: Any) -> None:
        if max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0, got {max_grad_norm}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
        self.max_grad_norm = float(max_grad_norm)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sparse = {}
        for group in self.param_groups:
            for parameter in group["params"]:
                grad = sparse_gradient(parameter)
                allowed = group.get("trainable_rows")
                if grad is not None:
                    grad = grad.coalesce()  # repeated rows summed, as a dense gradient sums
                    rows, values = grad.indices()[0], grad.values()
                elif (group.get("row_wise") or allowed is not None) and parameter.grad is not None:
                    rows, values = torch.arange(len(parameter), device=parameter.device), parameter.grad  # every row
                else:
                    continue
                if allowed is not None:
                    keep = allowed.to(rows.device)[rows]
                    rows, values = rows[keep], values[keep]
                sparse[parameter] = (group, rows, values)
        if self.max_grad_norm > 0:
            self._clip(sparse)
        held = {parameter: parameter.grad for parameter in sparse}
        for parameter in sparse:
            parameter.grad = None  # AdamW.step skips parameters without a gradient
        try:
            super().step()
        finally:
            for parameter, grad in held.items():
                parameter.grad = grad
        for parameter, (group, rows, values) in sparse.items():
            (self._row_wise_step if group.get("row_wise") else self._sparse_step)(group, parameter, rows, values)
            parameter.sparse_grad = None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for group in self.param_groups:
            for parameter in group["params"]:
                parameter.sparse_grad = None

    def _clip(self, sparse: dict[torch.Tensor, tuple[dict, torch.Tensor, torch.Tensor]]) -> None:
        values = [held[2] for held in sparse.values()]
        values += [parameter.grad for group in self.param_groups for parameter in group["params"]
                   if parameter not in sparse and parameter.grad is not None]
        if not values:
            return
        total = torch.stack([value.float().pow(2).sum().to(values[0].device) for value in values]).sum().sqrt()
        factor = (self.max_grad_norm / (total + 1e-6)).clamp(max=1.0)
        for value in values:
            value.mul_(factor.to(value.device, value.dtype))

    def _sparse_step(self, group: dict[str, Any], parameter: torch.Tensor, rows: torch.Tensor,
                     values: torch.Tensor) -> None:
        if group.get("amsgrad") or group.get("maximize"):
            raise ValueError("LazyAdamW: amsgrad and maximize are not supported for sparse gradients")
        state = self.state[parameter]
        if not state:  # AdamW's own state layout, so state_dict() and a dense step read it alike
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = _state_table(group, parameter, parameter.shape[1:], parameter.dtype)
            state["exp_avg_sq"] = _state_table(group, parameter, parameter.shape[1:], parameter.dtype)
        state["step"] += 1
        step = float(state["step"])
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = float(group["lr"]), group["eps"], group["weight_decay"]
        slots = _state_slots(group, rows)
        exp_avg = state["exp_avg"][slots].mul_(beta1).add_(values, alpha=1 - beta1)
        exp_avg_sq = state["exp_avg_sq"][slots].mul_(beta2).addcmul_(values, values, value=1 - beta2)
        state["exp_avg"].index_copy_(0, slots, exp_avg)
        state["exp_avg_sq"].index_copy_(0, slots, exp_avg_sq)
        denominator = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        updated = parameter[rows].mul_(1 - lr * weight_decay)
        updated.addcdiv_(exp_avg, denominator, value=-lr / (1 - beta1**step))
        parameter.index_copy_(0, rows, updated)

    def _row_wise_step(self, group: dict[str, Any], parameter: torch.Tensor, rows: torch.Tensor,
                       values: torch.Tensor) -> None:
        if group.get("amsgrad") or group.get("maximize") or parameter.dim() != 2:
            raise ValueError("LazyAdamW: a row-wise group takes 2-d parameters (tables of rows), without amsgrad "
                             f"or maximize; got a parameter of shape {tuple(parameter.shape)}")
        state = self.state[parameter]
        if not state:
            state["row_step"] = _state_table(group, parameter, (), torch.float32)
            state["row_exp_avg_sq"] = _state_table(group, parameter, (), torch.float32)
        beta2 = group["betas"][1]
        lr, eps, weight_decay = float(group["lr"]), group["eps"], group["weight_decay"]
        slots = _state_slots(group, rows)
        row_step = state["row_step"][slots].add_(1)
        row_sq = state["row_exp_avg_sq"][slots].mul_(beta2).add_(values.float().pow(2).mean(1), alpha=1 - beta2)
        state["row_step"].index_copy_(0, slots, row_step)
        state["row_exp_avg_sq"].index_copy_(0, slots, row_sq)
        denominator = (row_sq / (1 - beta2**row_step)).sqrt_().add_(eps)
        updated = parameter[rows].mul_(1 - lr * weight_decay)
        updated.addcdiv_(values, denominator[:, None].to(values.dtype), value=-lr)
        parameter.index_copy_(0, rows, updated)



def _state_table(group: dict[str, Any], parameter: torch.Tensor, row_shape: tuple[int, ...] | torch.Size,
                 dtype: torch.dtype) -> torch.Tensor:
    """Zero optimizer state with one row per row of `parameter`, or per trainable row where the group has them (a
    refresh of 10,000 images in a million-image table holds their moments, not the table's: 4.6 GB at 1M)."""
    allowed = group.get("trainable_rows")
    count = len(parameter) if allowed is None else int(allowed.sum())
    return torch.zeros((count, *row_shape), dtype=dtype, device=parameter.device)


def _state_slots(group: dict[str, Any], rows: torch.Tensor) -> torch.Tensor:
    """Where parameter rows `rows` (trainable ones, where the group has `trainable_rows`) keep their state."""
    allowed = group.get("trainable_rows")
    if allowed is None:
        return rows
    return (torch.cumsum(allowed.to(rows.device), 0) - 1)[rows]


__all__ = ["LazyAdamW", "sparse_gradient"]
