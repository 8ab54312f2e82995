"""Sparse edge gradients and LazyAdamW (issue 16: a training step at a million images costs what it reads).

The optimizer against torch's AdamW on real tensors, and a tiny model trained by the Trainer with a sampled softmax.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback
from test_training import tiny_setup  # noqa: F401  (the fixture `tiny` builds on)
from test_training_optimization import _trainer

from modeling_gcmr import identifier_head_gcmr
from modeling_gcmr.training.lazy_adamw import LazyAdamW, sparse_gradient
from modeling_gcmr.training.optimization import optimizer_cls_and_kwargs, sparse_edge_gradients

ROWS, WIDTH = 12, 5


def _train(optimizer_cls, sparse: bool, batches, clip: float = 0.0, **options):
    """A (ROWS, WIDTH) table and a bias trained on lookups of `batches`; the table's gradient sparse or dense."""
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(ROWS, WIDTH))
    bias = torch.nn.Parameter(torch.randn(WIDTH))
    target = torch.randn(WIDTH)
    if optimizer_cls is LazyAdamW:
        optimizer = LazyAdamW([table, bias], lr=0.05, weight_decay=0.1, max_grad_norm=clip, **options)
    else:
        optimizer = torch.optim.AdamW([table, bias], lr=0.05, weight_decay=0.1, **options)
    for rows in batches:
        looked_up = F.embedding(rows, table, sparse=sparse) if sparse else table.index_select(0, rows)
        loss = ((looked_up + bias - target) ** 2).sum() * (1 + rows.float()).mean()
        loss.backward()
        if clip and optimizer_cls is not LazyAdamW:
            torch.nn.utils.clip_grad_norm_([table, bias], clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return table.detach(), bias.detach(), optimizer


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_lazy_adamw_is_adamw_where_every_row_is_read_at_every_step(clip):
    # every row read, some twice (a sparse gradient with repeated rows sums them, as the dense one does)
    batches = [torch.cat([torch.randperm(ROWS, generator=torch.Generator().manual_seed(step)), torch.tensor([3, 3])])
               for step in range(6)]
    want_table, want_bias, dense = _train(torch.optim.AdamW, False, batches, clip)
    got_table, got_bias, lazy = _train(LazyAdamW, True, batches, clip)
    torch.testing.assert_close(got_table, want_table, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_bias, want_bias, rtol=1e-5, atol=1e-6)
    # the same state layout as AdamW's, so a checkpointed optimizer reads alike
    table_state = lazy.state[lazy.param_groups[0]["params"][0]]
    assert set(table_state) == {"step", "exp_avg", "exp_avg_sq"} and float(table_state["step"]) == 6
    # dense gradients alone: LazyAdamW is AdamW
    dense_table, _, _ = _train(LazyAdamW, False, batches, clip)
    torch.testing.assert_close(dense_table, want_table, rtol=1e-5, atol=1e-6)


def test_lazy_adamw_leaves_rows_no_step_reads_and_their_moments_alone():
    batches = [torch.tensor([0, 1, 2]), torch.tensor([2, 5])]
    torch.manual_seed(0)
    start = torch.randn(ROWS, WIDTH)
    table, _, optimizer = _train(LazyAdamW, True, batches)
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    unread = [row for row in range(ROWS) if row not in (0, 1, 2, 5)]
    # weight decay too is applied to the rows a step reads only
    assert torch.equal(table[unread], start[unread])
    assert not state["exp_avg"][unread].any() and not state["exp_avg_sq"][unread].any()
    assert not torch.equal(table[[0, 1, 2, 5]], start[[0, 1, 2, 5]])


def test_lazy_adamw_refuses_what_it_cannot_do_sparsely():
    with pytest.raises(ValueError, match="max_grad_norm must be >= 0"):
        LazyAdamW([torch.nn.Parameter(torch.zeros(2))], max_grad_norm=-1.0)
    with pytest.raises(ValueError, match="amsgrad and maximize are not supported for sparse"):
        _train(LazyAdamW, True, [torch.tensor([0, 1])], amsgrad=True)


@pytest.fixture(scope="module")
def tiny(tiny_setup):
    return {**tiny_setup, "make_model": functools.partial(tiny_setup["make_model"], hard_negatives=2)}


def test_a_sampled_softmax_trains_its_edges_sparsely_with_the_trainer(tiny, tmp_path, monkeypatch):
    from transformers import TrainingArguments

    model = tiny["make_model"]()
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-2, report_to=[], use_cpu=True,
                             max_grad_norm=1.0)
    assert not sparse_edge_gradients(model) and optimizer_cls_and_kwargs(model, args) is None  # 12 identifiers
    monkeypatch.setattr(identifier_head_gcmr, "FULL_SOFTMAX_LIMIT", 4)  # as if the collection were large
    assert model.identifier_head.samples_softmax and sparse_edge_gradients(model)
    optimizer = optimizer_cls_and_kwargs(model, args)
    assert optimizer[0] is LazyAdamW and optimizer[1]["max_grad_norm"] == 1.0 and args.max_grad_norm == 0.0
    assert model.identifier_head.sparse_gradients
    start = model.identifier_head.edge_vectors.detach().clone()
    seen = []

    class Watch(TrainerCallback):  # what the optimizer is given at each step
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            edges = model.identifier_head.edge_vectors
            seen.append((edges.grad is None, sparse_gradient(edges) is not None and sparse_gradient(edges).is_sparse))

    trainer = _trainer(tiny, model, tmp_path, [Watch()], optimizer=optimizer, max_steps=4, max_grad_norm=0.0)
    history = trainer.train()
    assert seen == [(True, True)] * 4  # every step's edge gradient was sparse, beside an empty .grad
    assert torch.isfinite(torch.tensor(history.training_loss))
    assert type(trainer.optimizer).__name__ == "LazyAdamW" or isinstance(trainer.optimizer.optimizer, LazyAdamW)
    assert not torch.equal(model.identifier_head.edge_vectors.detach(), start)


def test_sparse_edge_gradients_are_the_dense_ones_in_the_rows_read(tiny, monkeypatch):
    from modeling_gcmr.training.collator import GcmrDataCollator

    monkeypatch.setattr(identifier_head_gcmr, "FULL_SOFTMAX_LIMIT", 4)  # sampled softmax: the head reads some rows
    model = tiny["make_model"]().train()
    batch = GcmrDataCollator.from_config(model.config, tiny["tokenizer"])([tiny["train"][i] for i in range(6)])
    edges = model.identifier_head.edge_vectors
    grads = []
    for sparse in (False, True):
        torch.manual_seed(1)  # the same negative sample both times
        model.identifier_head.sparse_gradients = sparse
        model.zero_grad(set_to_none=True)
        edges.sparse_grad = None
        model(**batch).loss.backward()
        grads.append(edges.grad if not sparse else edges.sparse_grad)
    dense, sparse = grads
    assert edges.grad is None and sparse.is_sparse
    read = torch.unique(sparse.coalesce().indices()[0])
    assert 0 < len(read) < len(edges)  # a share of the rows, as at scale
    torch.testing.assert_close(sparse.to_dense(), dense, rtol=1e-5, atol=1e-6)
