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


# ----------------------------------------------------------------------------- row-wise state (--edge_optimizer_state)


def _row_wise_reference(start, batches, lr, beta2, eps, weight_decay):
    """The row-wise step written out row by row: a row's summed gradient, its own step count, one second moment."""
    table, seen, second = start.clone(), [0] * ROWS, [0.0] * ROWS
    target = torch.arange(WIDTH, dtype=torch.float32)
    for rows in batches:
        looked_up = table[rows].clone().requires_grad_(True)
        ((looked_up - target) ** 2 * (1 + rows.float())[:, None]).sum().backward()
        for row in sorted(set(rows.tolist())):
            grad = looked_up.grad[rows == row].sum(0)
            seen[row] += 1
            second[row] = beta2 * second[row] + (1 - beta2) * float(grad.pow(2).mean())
            denominator = (second[row] / (1 - beta2 ** seen[row])) ** 0.5 + eps
            table[row] = table[row] * (1 - lr * weight_decay) - lr * grad / denominator
    return table


def _lookups(start, batches, sparse, weight_decay=0.1, max_grad_norm=0.0, **group):
    """A (ROWS, WIDTH) table from `start` trained by LazyAdamW (lr 0.05; `group`: row_wise, trainable_rows) on
    squared errors of the lookups of `batches`, each row's weighted by its number: its values and state."""
    table = torch.nn.Parameter(start.clone())
    optimizer = LazyAdamW([{"params": [table], **group}], lr=0.05, weight_decay=weight_decay,
                          max_grad_norm=max_grad_norm)
    target = torch.arange(WIDTH, dtype=torch.float32)
    for rows in batches:
        looked_up = F.embedding(rows, table, sparse=True) if sparse else table.index_select(0, rows)
        ((looked_up - target) ** 2 * (1 + rows.float())[:, None]).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return table.detach(), optimizer.state[table]


@pytest.mark.parametrize("sparse", [True, False])
def test_row_wise_state_steps_each_row_by_its_own_count_and_mean_square(sparse):
    # rows 7 and 9 are first read at the third step: their first step is bias-corrected by their own count
    batches = [torch.tensor([0, 1, 1, 2]), torch.tensor([2, 5]), torch.tensor([7, 9, 0]), torch.tensor([9, 9, 1])]
    start = torch.randn(ROWS, WIDTH, generator=torch.Generator().manual_seed(0))
    table, state = _lookups(start, batches, sparse, row_wise=True)
    want = _row_wise_reference(start, batches, lr=0.05, beta2=0.999, eps=1e-8, weight_decay=0.1)
    read = sorted({row for rows in batches for row in rows.tolist()})
    unread = [row for row in range(ROWS) if row not in read]
    if sparse:  # rows no step reads keep their values, weight decay included
        torch.testing.assert_close(table, want, rtol=1e-5, atol=1e-6)
        assert torch.equal(table[unread], start[unread])
        assert state["row_step"].tolist() == [2, 2, 2, 0, 0, 1, 0, 1, 0, 2, 0, 0]
    else:  # a dense gradient reads every row at every step (zero where no lookup): all rows step each time
        assert state["row_step"].tolist() == [len(batches)] * ROWS
        torch.testing.assert_close(table[unread], start[unread] * (1 - 0.05 * 0.1) ** len(batches))
    # the whole state: two floats per row, no copy of the table
    assert set(state) == {"row_step", "row_exp_avg_sq"}
    assert all(value.shape == (ROWS,) for value in state.values())
    # a row's first step moves each value by about the learning rate, as AdamW's first step does
    first = _lookups(start, batches[:1], sparse=True, weight_decay=0.0, row_wise=True)[0]
    assert float((first[0] - start[0]).abs().max()) <= 0.05 * 2.3


@pytest.mark.parametrize("row_wise", [False, True])
@pytest.mark.parametrize("sparse", [True, False])
def test_trainable_rows_step_as_if_the_other_rows_were_never_read(sparse, row_wise):
    trainable = torch.zeros(ROWS, dtype=torch.bool)
    trainable[[1, 2, 7]] = True
    batches = [torch.tensor([0, 1, 1, 2]), torch.tensor([2, 5, 7]), torch.tensor([7, 9, 0])]
    start = torch.randn(ROWS, WIDTH, generator=torch.Generator().manual_seed(0))
    table, state = _lookups(start, batches, sparse, max_grad_norm=0.5, row_wise=row_wise, trainable_rows=trainable)
    # the same steps where only the trainable rows are looked up: same values, same clipping norm (a dense gradient
    # steps every trainable row at every step, read or not, as AdamW does; a sparse one the rows read)
    only_trainable = [rows[trainable[rows]] for rows in batches]
    want, reference = _lookups(start, only_trainable, sparse, max_grad_norm=0.5, row_wise=row_wise)
    torch.testing.assert_close(table[trainable], want[trainable], rtol=1e-5, atol=1e-6)
    frozen = ~trainable
    assert torch.equal(table[frozen], start[frozen])  # read, differentiated, decayed by nothing
    assert not torch.equal(table[trainable], start[trainable])
    # the state holds the trainable rows only, in their order: the same as the reference's rows
    assert set(state) == set(reference)
    for name, value in state.items():
        if name != "step":
            assert len(value) == int(trainable.sum())
            torch.testing.assert_close(value, reference[name][trainable], rtol=1e-5, atol=1e-6)


def test_row_wise_state_refuses_what_is_not_a_table():
    vector = torch.nn.Parameter(torch.zeros(3))
    optimizer = LazyAdamW([{"params": [vector], "row_wise": True}])
    vector.sum().backward()
    with pytest.raises(ValueError, match=r"row-wise group takes 2-d parameters .* shape \(3,\)"):
        optimizer.step()


@pytest.mark.parametrize("sampled", [False, True])
def test_edge_optimizer_state_row_wise_trains_the_edges_with_the_trainer(tiny, tmp_path, monkeypatch, sampled):
    from modeling_gcmr.training.arguments import GcmrTrainingArguments

    if sampled:
        monkeypatch.setattr(identifier_head_gcmr, "FULL_SOFTMAX_LIMIT", 4)
    model = tiny["make_model"]()
    args = GcmrTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_grad_norm=1.0,
                                 edge_optimizer_state="row_wise")
    optimizer_cls, kwargs = optimizer_cls_and_kwargs(model, args)
    assert optimizer_cls is LazyAdamW and model.identifier_head.sparse_gradients == sampled
    assert args.max_grad_norm == (0.0 if sampled else 1.0)  # clipping moves into LazyAdamW with sparse gradients only
    assert {group["gcmr_part"]: group["row_wise"] for group in kwargs["params"]}["edge"]
    assert not any(group["row_wise"] for group in kwargs["params"] if group["gcmr_part"] != "edge")
    start = model.identifier_head.edge_vectors.detach().clone()
    trainer = _trainer(tiny, model, tmp_path, optimizer=(optimizer_cls, kwargs), max_steps=4,
                       max_grad_norm=args.max_grad_norm)
    history = trainer.train()
    assert torch.isfinite(torch.tensor(history.training_loss))
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    edges = model.identifier_head.edge_vectors
    assert set(inner.state[edges]) == {"row_step", "row_exp_avg_sq"} and inner.state[edges]["row_step"].max() == 4
    assert not torch.equal(edges.detach(), start)
    for bad, message in ((dict(edge_optimizer_state="rows"), "edge_optimizer_state must be one of"),
                         (dict(edge_optimizer_state="row_wise", optim="sgd"), "row_wise needs LazyAdamW")):
        with pytest.raises(ValueError, match=message):
            optimizer_cls_and_kwargs(model, GcmrTrainingArguments(output_dir=str(tmp_path), report_to=[],
                                                                  use_cpu=True, **bad))
