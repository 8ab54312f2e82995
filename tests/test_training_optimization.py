"""Training that moves away from a good start with care: per-part learning rates, and hard negatives mined from the
model's own beam (BeamNegativesCallback + the identifier loss), on tiny models."""
from __future__ import annotations

import functools

import pytest
import torch
from test_training import tiny_setup  # noqa: F401  (the fixture this module's `tiny` builds on)

from modeling_gcmr.identifier_loss_gcmr import _with_mined_negatives
from modeling_gcmr.training.callbacks import BeamNegativesCallback
from modeling_gcmr.training.collator import GcmrDataCollator
from modeling_gcmr.training.optimization import (
    DENSE_START_DECODER_SHARE,
    LONG_IDENTIFIER_LENGTH,
    LONG_IDENTIFIER_SHARE,
    optimizer_cls_and_kwargs,
    parameter_groups,
    parameter_part,
    part_learning_rates,
)


@pytest.fixture(scope="module")
def tiny(tiny_setup):
    """test_training's 12-image corpus, with models that train against 2 hard negatives."""
    return {**tiny_setup, "make_model": functools.partial(tiny_setup["make_model"], hard_negatives=2)}


def _trainer(tiny, model, tmp_path, callbacks=(), optimizer=None, **overrides):
    from transformers import Trainer, TrainingArguments

    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=12, learning_rate=1e-2, max_steps=6,
                   logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, warmup_steps=0,
                   remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0)
    options.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**options), train_dataset=tiny["train"],
                   data_collator=GcmrDataCollator.from_config(model.config, tiny["tokenizer"]),
                   processing_class=tiny["tokenizer"], callbacks=list(callbacks), optimizer_cls_and_kwargs=optimizer)


# ----------------------------------------------------------------------------- per-part learning rates


def test_parameter_parts_cover_edges_query_projections_and_the_rest(tiny):
    model = tiny["make_model"]()
    parts = {name: parameter_part(name) for name, _ in model.named_parameters()}
    assert parts["identifier_head.edge_vectors"] == "edge"
    assert {name for name, part in parts.items() if part == "query"} == {
        name for name in parts if name.startswith(("query_projection.", "image_query_projection."))}
    assert parts["identifier_head.step_query.weight"] == parts["identifier_head.log_scale"] == "decoder"
    # the text encoder and its embeddings are a part of their own (a fixed decoder leaves them training)
    encoder = {name for name, part in parts.items() if part == "encoder"}
    assert all(name.startswith(("backbone.encoder.", "backbone.shared.", "embed_projector.")) for name in encoder)
    encoder_tensors = {id(p) for module in (model.text_encoder(), model.embed_projector) for p in module.parameters()}
    assert {id(p) for name, p in model.named_parameters() if name in encoder} == encoder_tensors
    assert all(part == "decoder" for name, part in parts.items() if name.startswith("backbone.decoder."))
    assert parameter_part("base_model.model.backbone.encoder.block.0.layer.0.SelfAttention.q.lora_A.default.weight") \
        == "encoder"
    # wrappers prefix the names (PEFT: base_model.model.)
    assert parameter_part("base_model.model.identifier_head.edge_vectors") == "edge"
    assert parameter_part("base_model.model.query_projection.weight") == "query"
    # the vision tower makes image queries: it learns with them, and a fixed decoder does not freeze it
    assert parameter_part("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight") == "query"

    groups = parameter_groups(model, 1e-3, 0.1, edge_learning_rate=1e-5, query_learning_rate=0.0)
    rates = {(group["gcmr_part"], group["weight_decay"]) : group["lr"] for group in groups}
    assert {part for part, _ in rates} == {"edge", "encoder", "decoder"}  # a zero rate leaves the part out
    assert all(lr == (1e-5 if part == "edge" else 1e-3) for (part, _), lr in rates.items())
    grouped = [p for group in groups for p in group["params"]]
    assert len(grouped) == len({id(p) for p in grouped})  # no parameter twice
    expected = {id(p) for name, p in model.named_parameters() if p.requires_grad and parameter_part(name) != "query"}
    assert {id(p) for p in grouped} == expected
    with pytest.raises(ValueError, match="edge learning rate must be >= 0"):
        parameter_groups(model, 1e-3, edge_learning_rate=-1.0)


def test_trainer_applies_each_part_its_own_rate(tiny, tmp_path):
    from transformers import TrainingArguments

    model = tiny["make_model"]()
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-2, report_to=[], use_cpu=True)
    assert optimizer_cls_and_kwargs(model, args, None, None) is None  # the Trainer's own optimizer, unchanged
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = _trainer(tiny, model, tmp_path, optimizer=optimizer_cls_and_kwargs(model, args, 0.0, 1e-3),
                       lr_scheduler_type="constant")
    trainer.train()
    rates = {group["gcmr_part"]: group["lr"] for group in trainer.optimizer.param_groups}
    assert rates == {"query": pytest.approx(1e-3), "encoder": pytest.approx(1e-2), "decoder": pytest.approx(1e-2)}
    moved = {name: not torch.equal(start[name], p) for name, p in model.named_parameters()}
    assert not moved["identifier_head.edge_vectors"]  # rate 0: exactly where it started
    assert moved["query_projection.weight"] and moved["identifier_head.step_query.weight"]
    # the query projection moved about 10x less per step than the decoder-side map (AdamW: steps ~ the rate)
    step_query = (model.identifier_head.step_query.weight - start["identifier_head.step_query.weight"]).abs().max()
    query = (model.query_projection.weight - start["query_projection.weight"]).abs().max()
    assert query < 0.3 * step_query


def test_a_fixed_decoder_is_frozen_and_training_skips_it_with_the_same_loss(tiny, tmp_path, monkeypatch):
    """--decoder_learning_rate 0 freezes the decoder part; its step correction stays zero, so the loss (hard
    negatives included) is computed without running the decoder, and equals the loss that runs it."""
    from transformers import TrainingArguments

    model = tiny["make_model"]().train()
    head = model.identifier_head
    batch = GcmrDataCollator.from_config(model.config, tiny["tokenizer"])([tiny["train"][i] for i in range(8)])
    decoder_runs = []
    decoder_states = model.decoder_states
    monkeypatch.setattr(model, "decoder_states", lambda *args, **kwargs: decoder_runs.append(1) or decoder_states(
        *args, **kwargs))
    assert not head.reads_decoder_states and not head.decoder_is_idle  # zero at the start, but trainable
    torch.manual_seed(0)
    through_decoder = model(**batch).loss
    assert decoder_runs

    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-2, report_to=[], use_cpu=True)
    optimizer = optimizer_cls_and_kwargs(model, args, None, None, 0.0)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {name for name, _ in model.named_parameters() if parameter_part(name) == "decoder"}
    assert head.decoder_is_idle and not model.text_encoder_is_frozen()  # the encoder still learns the queries
    decoder_runs.clear()
    torch.manual_seed(0)
    idle = model(**batch).loss
    assert decoder_runs == []
    torch.testing.assert_close(idle, through_decoder, rtol=1e-5, atol=1e-5)

    start = head.edge_vectors.detach().clone()
    trainer = _trainer(tiny, model, tmp_path, optimizer=optimizer, max_steps=3)
    trainer.train()
    assert decoder_runs == []  # nor in any training step
    assert not torch.equal(head.edge_vectors, start) and not head.reads_decoder_states


def test_dense_aware_start_keeps_its_decoder_fixed_by_default(tiny):
    from types import SimpleNamespace

    model = tiny["make_model"]()
    args = SimpleNamespace(learning_rate=1e-3, edge_learning_rate=None, query_learning_rate=2e-4,
                           decoder_learning_rate=None)
    assert not model.config.shared_query_space  # a model from scratch: the common rate for its decoder
    assert part_learning_rates(model.config, args) == {"edge": None, "query": 2e-4, "encoder": None, "decoder": None}
    model.config.shared_query_space = True  # queries start in the features' space: the dense-aware start
    assert DENSE_START_DECODER_SHARE == 0 and part_learning_rates(model.config, args)["decoder"] == 0
    args.decoder_learning_rate = 5e-4  # an explicit rate always wins
    assert part_learning_rates(model.config, args)["decoder"] == 5e-4


def test_long_identifiers_train_every_part_slower_by_default(tiny):
    from types import SimpleNamespace

    model = tiny["make_model"]()
    model.config.shared_query_space = True
    args = SimpleNamespace(learning_rate=1e-3, edge_learning_rate=None, query_learning_rate=None,
                           decoder_learning_rate=None)
    model.config.max_identifier_length = LONG_IDENTIFIER_LENGTH  # not longer: the defaults of short paths
    short = part_learning_rates(model.config, args)
    assert short == pytest.approx({"edge": 1e-3, "query": 1e-3, "encoder": 1e-3,
                                   "decoder": DENSE_START_DECODER_SHARE * 1e-3})
    model.config.max_identifier_length = 2 * LONG_IDENTIFIER_LENGTH  # semantic ids: 16 tokens
    long = part_learning_rates(model.config, args)
    assert long == pytest.approx({part: LONG_IDENTIFIER_SHARE * rate for part, rate in short.items()})
    args.query_learning_rate = 2e-4  # an explicit rate always wins
    assert part_learning_rates(model.config, args)["query"] == 2e-4
    model.config.shared_query_space = False  # a model from scratch keeps the common rate, long or not
    assert part_learning_rates(model.config, args) == {"edge": None, "query": 2e-4, "encoder": None, "decoder": None}


# ----------------------------------------------------------------------------- beam-mined hard negatives


def _training_queries(tiny):
    train = tiny["split"].train
    return [(c, key) for key, caps in zip(train["image_key"], train["captions"]) for c in caps]


def test_mined_negatives_are_the_beam_s_other_images_best_rank_first(tiny):
    model, tokenizer = tiny["make_model"](), tiny["tokenizer"]
    pairs = _training_queries(tiny)
    callback = BeamNegativesCallback([c for c, _ in pairs], [k for _, k in pairs], tokenizer, num_negatives=2,
                                     num_beams=4)
    mined = callback.mine(model)
    rows = {key: row for row, key in enumerate(tokenizer.keys)}
    assert mined.shape == (len(tokenizer.keys), 2) and mined.dtype == torch.long
    hits = model.retrieve([c for c, _ in pairs], tokenizer, top_k=3, num_beams=4)
    for gold in set(k for _, k in pairs):
        # the expected table row, computed directly: each other image at its best rank over this image's queries
        best: dict[int, int] = {}
        for (_, key), ranked in zip(pairs, hits):
            if key == gold:
                for rank, (hit, _) in enumerate(ranked):
                    if hit != gold:
                        best[rows[hit]] = min(rank, best.get(rows[hit], rank))
        expected = sorted(best, key=lambda row: (best[row], row))[:2]
        got = [row for row in mined[rows[gold]].tolist() if row >= 0]
        assert rows[gold] not in got and len(got) == len(expected)
        assert sorted(best[row] for row in got) == sorted(best[row] for row in expected)
    # images without training queries mine nothing
    assert all(mined[rows[key]].tolist() == [-1, -1] for key in tokenizer.keys if key not in {k for _, k in pairs})


def test_mined_negatives_join_the_loss_and_padding_changes_nothing(tiny):
    model = tiny["make_model"]().train()
    batch = GcmrDataCollator.from_config(model.config, tiny["tokenizer"])([tiny["train"][i] for i in range(8)])
    torch.manual_seed(0)
    plain = model(**batch).loss
    gold = model.identifier_head.identifier_index(batch["labels"], model.config.eos_token_id)
    table = torch.full((model.identifier_head.num_identifiers, 3), -1, dtype=torch.long)
    table[gold, 0] = gold  # the gold itself, and padding: nothing to add
    model.identifier_head.mined_negatives = table
    torch.manual_seed(0)
    torch.testing.assert_close(model(**batch).loss, plain)
    negatives, unused = _with_mined_negatives(model, torch.zeros(len(gold), 1, dtype=torch.long), gold)
    assert negatives.shape == (len(gold), 4) and unused[:, 1:].all() and not unused[:, 0].any()

    table[gold, 0] = (gold + 1) % model.identifier_head.num_identifiers  # a real other image per row
    torch.manual_seed(0)
    mined = model(**batch).loss
    assert torch.isfinite(mined) and mined > plain  # one more negative in each row's softmax
    mined.backward()
    assert model.identifier_head.edge_vectors.grad is not None


def test_callback_mines_at_each_epoch_start_inside_the_trainer(tiny, tmp_path):
    model, tokenizer = tiny["make_model"](), tiny["tokenizer"]
    pairs = _training_queries(tiny)
    callback = BeamNegativesCallback([c for c, _ in pairs], [k for _, k in pairs], tokenizer, num_negatives=2,
                                     num_beams=4, max_queries=5)
    assert len(callback.queries) <= 5
    mined_at = []
    original = callback.mine
    callback.mine = lambda m: mined_at.append(trainer.state.global_step) or original(m)
    trainer = _trainer(tiny, model, tmp_path, [callback], max_steps=-1, num_train_epochs=2)
    trainer.train()
    steps_per_epoch = trainer.state.max_steps // 2
    assert mined_at == [0, steps_per_epoch]
    assert model.identifier_head.mined_negatives.shape == (len(tokenizer.keys), 2)
    assert all(entry["loss"] == entry["loss"] for entry in trainer.state.log_history if "loss" in entry)  # no NaN


def test_callback_rejects_bad_input(tiny):
    tokenizer = tiny["tokenizer"]
    with pytest.raises(ValueError, match="2 queries but 1 gold keys"):
        BeamNegativesCallback(["a", "b"], [tokenizer.keys[0]], tokenizer)
    with pytest.raises(ValueError, match="'nope' has no identifier"):
        BeamNegativesCallback(["a"], ["nope"], tokenizer)
    with pytest.raises(ValueError, match="num_negatives and every_epochs must be >= 1"):
        BeamNegativesCallback(["a"], [tokenizer.keys[0]], tokenizer, num_negatives=0)
