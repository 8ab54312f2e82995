"""The two training steps, the data collator and Trainer integration (eval Recall@K, resume, LoRA)."""
from __future__ import annotations

import collections

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from modeling_gcmr.training.callbacks import RetrievalEvalCallback
from modeling_gcmr.training.collator import (
    LABEL_PAD_ID,
    GcmrDataCollator,
    build_image_processor,
)
from modeling_gcmr.training.examples import (
    MEMORIZE,
    RETRIEVE,
    TrainingExamplesConfig,
    build_query_examples,
    build_training_examples,
)

# ----------------------------------------------------------------------------- collator


def _image(color: tuple[int, int, int], size: int = 20) -> Image.Image:
    return Image.new("RGB", (size, size), color)


def test_collator_pads_text_and_labels(text_tokenizer):
    collator = GcmrDataCollator(text_tokenizer)
    batch = collator([{"input_ids": [5, 6, 1], "labels": [7, 1]}, {"input_ids": [9, 1], "labels": [3, 4, 8, 1]}])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 1], [9, 1, text_tokenizer.pad_token_id]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[7, 1, LABEL_PAD_ID, LABEL_PAD_ID], [3, 4, 8, 1]]
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long


def test_collator_stacks_embeds_with_zeros_for_text_rows(text_tokenizer):
    collator = GcmrDataCollator(text_tokenizer, pad_to_multiple_of=4)
    rows = [
        {"task": MEMORIZE, "image_key": "a", "input_ids": [1], "labels": [4, 1], "image_embeds": [1.0, 2.0, 3.0]},
        {"task": RETRIEVE, "image_key": "b", "input_ids": [5, 6, 1], "labels": [4, 1], "image_embeds": None},
    ]
    batch = collator(rows)
    assert batch["input_ids"].shape == (2, 4)
    assert batch["image_embeds"].tolist() == [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]
    assert batch["image_embeds"].dtype == torch.float32
    assert batch["image_mask"].tolist() == [True, False]
    assert "pixel_values" not in batch and "task" not in batch


def test_collator_processes_images_into_pixel_values(text_tokenizer):
    from transformers import CLIPVisionConfig

    vision = CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    processor = build_image_processor(vision)
    collator = GcmrDataCollator(text_tokenizer, image_processor=processor)
    rows = [
        {"input_ids": [5, 1], "labels": [4, 1], "image": None},
        {"input_ids": [1], "labels": [4, 1], "image": _image((255, 0, 0), 24)},
        {"input_ids": [1], "labels": [4, 1], "image": _image((0, 0, 255), 40)},
    ]
    batch = collator(rows)
    pixels = batch["pixel_values"]
    assert pixels.shape == (3, 3, 16, 16)
    assert batch["image_mask"].tolist() == [False, True, True]
    assert torch.count_nonzero(pixels[0]) == 0
    # red image: red channel above blue channel after normalisation, and the reverse for the blue one
    assert pixels[1, 0].mean() > pixels[1, 2].mean() and pixels[2, 2].mean() > pixels[2, 0].mean()
    with pytest.raises(ValueError, match="no image_processor"):
        GcmrDataCollator(text_tokenizer)(rows)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_collator_turns_any_image_mode_and_size_into_rgb_pixels(text_tokenizer, mode):
    """Grayscale, alpha, palette, 16-bit and CMYK images of odd sizes all reach the tower as (3, H, W) RGB."""
    from transformers import CLIPVisionConfig

    vision = CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    image = _image((200, 120, 40), 37).convert(mode).resize((37, 23))
    batch = GcmrDataCollator(text_tokenizer, image_processor=build_image_processor(vision))(
        [{"input_ids": [1], "labels": [4, 1], "image": image}]
    )
    assert batch["pixel_values"].shape == (1, 3, 16, 16)
    assert torch.isfinite(batch["pixel_values"]).all() and batch["pixel_values"].std() > 0


def test_collator_rejects_rows_without_input_ids(text_tokenizer):
    with pytest.raises(ValueError, match="row 1 has no 'input_ids'"):
        GcmrDataCollator(text_tokenizer)([{"input_ids": [1]}, {"text": "a red circle"}])


# ----------------------------------------------------------------------------- training examples


def _corpus(num_images: int = 6, with_split: bool = False) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    data = {
        "image_key": [f"img_{i}" for i in range(num_images)],
        "captions": [[f"a red circle number {i}", f"a blue square number {i}"] for i in range(num_images)],
        "image_embeds": rng.normal(size=(num_images, 8)).astype(np.float32).tolist(),
    }
    if with_split:
        data["split"] = ["train" if i % 2 == 0 else "test" for i in range(num_images)]
    return datasets.Dataset.from_dict(data)


@pytest.fixture
def id_tokenizer(make_id_tokenizer):
    from tokenization_gcmr import build_identifiers

    keys = [f"img_{i}" for i in range(6)]
    return make_id_tokenizer(build_identifiers(keys, "atomic"))


def test_joint_examples_are_tagged_labelled_and_mixed(id_tokenizer):
    corpus = _corpus()
    examples = build_training_examples(corpus, id_tokenizer, TrainingExamplesConfig(schedule="joint", memorize_prompt="image"))
    tasks = collections.Counter(examples["task"])
    assert tasks == {MEMORIZE: 6, RETRIEVE: 12}
    assert set(examples["task"][:9]) == {MEMORIZE, RETRIEVE}  # shuffled together, not in blocks
    prompt = id_tokenizer(["image"])["input_ids"][0]
    for row in examples:
        assert row["labels"] == id_tokenizer.identifier_ids(row["image_key"]) + [id_tokenizer.eos_token_id]
        if row["task"] == MEMORIZE:
            assert row["image_embeds"] == pytest.approx(corpus[int(row["image_key"][4:])]["image_embeds"])
            assert row["input_ids"] == prompt
        else:
            assert row["image_embeds"] is None
            assert id_tokenizer.decode(row["input_ids"], skip_special_tokens=True).endswith(row["image_key"][4:])


def test_query_examples_label_each_query_with_its_own_image(id_tokenizer):
    # several queries per image, as the held-out captions of a corpus come
    gold = ["img_0", "img_0", "img_3", "img_1", "img_3", "img_5"]
    rows = build_query_examples([f"query {i}" for i in range(len(gold))], gold, id_tokenizer)
    assert [row["labels"] for row in rows] == id_tokenizer.encode_identifiers(gold)


def test_sequential_schedule_puts_every_memorize_row_first(id_tokenizer):
    config = TrainingExamplesConfig(schedule="sequential", phase_epochs=2)
    tasks = build_training_examples(_corpus(), id_tokenizer, config)["task"]
    assert tasks == [MEMORIZE] * 12 + [RETRIEVE] * 24


def test_ratios_scale_each_task(id_tokenizer):
    examples = build_training_examples(_corpus(), id_tokenizer, TrainingExamplesConfig(memorize_ratio=2, retrieve_ratio=0.5, seed=3))
    counts = collections.Counter(examples["task"])
    assert counts[MEMORIZE] == 12
    assert 1 <= counts[RETRIEVE] <= 11  # a seeded random half of 12 captions
    per_key = collections.Counter(k for k, t in zip(examples["image_key"], examples["task"]) if t == MEMORIZE)
    assert set(per_key.values()) == {2}
    assert build_training_examples(_corpus(), id_tokenizer, TrainingExamplesConfig(retrieve_ratio=0))["task"] == [MEMORIZE] * 6
    with pytest.raises(ValueError, match="both 0"):
        TrainingExamplesConfig(memorize_ratio=0, retrieve_ratio=0)


def test_images_without_training_captions_are_memorized_and_take_pseudo_queries(id_tokenizer):
    corpus = _corpus(with_split=True)
    config = TrainingExamplesConfig(train_splits=("train",))
    examples = build_training_examples(corpus, id_tokenizer, config, pseudo_queries={"img_1": ["a green star"]})
    memorized = {k for k, t in zip(examples["image_key"], examples["task"]) if t == MEMORIZE}
    retrieved = collections.Counter(k for k, t in zip(examples["image_key"], examples["task"]) if t == RETRIEVE)
    assert memorized == set(corpus["image_key"])
    assert retrieved == {"img_0": 2, "img_2": 2, "img_4": 2, "img_1": 1}
    no_pseudo = build_training_examples(corpus, id_tokenizer, TrainingExamplesConfig(train_splits=("train",), use_pseudo_queries=False), pseudo_queries={"img_1": ["x"]})
    assert "img_1" not in {k for k, t in zip(no_pseudo["image_key"], no_pseudo["task"]) if t == RETRIEVE}
    with pytest.raises(KeyError, match="img_99"):
        build_training_examples(corpus, id_tokenizer, config, pseudo_queries={"img_99": ["x"]})


def test_pseudo_query_column_and_bad_corpus(id_tokenizer):
    corpus = _corpus().add_column("pseudo_queries", [["extra query"]] + [[] for _ in range(5)])
    examples = build_training_examples(corpus, id_tokenizer)
    assert collections.Counter(examples["task"])[RETRIEVE] == 13
    with pytest.raises(ValueError, match="neither 'image' nor 'image_embeds'"):
        build_training_examples(_corpus().remove_columns("image_embeds"), id_tokenizer)
    with pytest.raises(ValueError, match="no 'split' column"):
        build_training_examples(_corpus(), id_tokenizer, TrainingExamplesConfig(train_splits=("train",)))


# ----------------------------------------------------------------------------- Trainer integration


@pytest.fixture(scope="module")
def tiny_setup():
    """A 12-image synthetic corpus, held-out queries, an atomic-id tokenizer and a factory of tiny models."""
    from transformers import T5Config

    from modeling_gcmr import GcmrConfig, GcmrForRetrieval
    from modeling_gcmr.training.data import split_captions
    from modeling_gcmr.training.synthetic import make_synthetic_corpus
    from tokenization_gcmr import ImageIdTokenizer, build_identifiers
    from tokenization_gcmr.builders.text_vocabulary import train_text_tokenizer

    corpus = make_synthetic_corpus(12, captions_per_image=3, seed=0).remove_columns(["image", "attributes"])
    split = split_captions(corpus, num_query_captions=1)
    text_tokenizer = train_text_tokenizer([c for caps in corpus["captions"] for c in caps], vocab_size=80)
    tokenizer = ImageIdTokenizer(text_tokenizer, build_identifiers(corpus["image_key"], "atomic"))

    def make_model(dropout: float = 0.0, **config) -> GcmrForRetrieval:
        torch.manual_seed(0)
        text = T5Config(vocab_size=tokenizer.num_text_tokens, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                        dropout_rate=dropout, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        model = GcmrForRetrieval(GcmrConfig(text_config=text, image_embed_dim=len(corpus[0]["image_embeds"]), num_visual_tokens=2, num_beams=4,
                                            **config))
        model.set_identifier_vocabulary(tokenizer)
        return model

    train = build_training_examples(split.train, tokenizer)
    return {"split": split, "tokenizer": tokenizer, "make_model": make_model, "train": train}


def _args(output_dir, **overrides):
    from transformers import TrainingArguments

    options = dict(
        output_dir=str(output_dir), per_device_train_batch_size=12, per_device_eval_batch_size=12, learning_rate=1e-2,
        max_steps=30, logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def _trainer(setup, model, args, callbacks=()):
    from transformers import Trainer

    return Trainer(
        model=model, args=args, train_dataset=setup["train"],
        eval_dataset=build_query_examples(setup["split"].queries, setup["split"].gold, setup["tokenizer"]),
        data_collator=GcmrDataCollator.from_config(model.config, setup["tokenizer"]),
        processing_class=setup["tokenizer"], callbacks=list(callbacks),
    )


def test_trainer_learns_and_eval_callback_logs_recall(tiny_setup, tmp_path):
    split, tokenizer = tiny_setup["split"], tiny_setup["tokenizer"]
    callback = RetrievalEvalCallback(split.queries, split.gold, tokenizer, num_beams=10)
    args = _args(tmp_path, max_steps=30, eval_strategy="steps", eval_steps=15)
    trainer = _trainer(tiny_setup, tiny_setup["make_model"](), args, [callback])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.7 * losses[0]
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert [entry["step"] for entry in evals] == [15, 30]
    for entry in evals:
        assert {"eval_recall@1", "eval_recall@5", "eval_recall@10", "eval_mrr@10"} <= set(entry)
        assert 0.0 <= entry["eval_recall@1"] <= entry["eval_recall@5"] <= entry["eval_recall@10"] <= 1.0
    metrics = trainer.evaluate()
    # the number matches a direct computation over the same queries
    hits = trainer.model.retrieve(split.queries, tokenizer, top_k=10, num_beams=10)
    found = sum(ranked[0][0] == gold for ranked, gold in zip(hits, split.gold)) / len(split.gold)
    assert metrics["eval_recall@1"] == pytest.approx(found)
    assert metrics["eval_num_queries"] == len(split.queries)


def test_resume_from_checkpoint_continues_exactly(tiny_setup, tmp_path):
    args = dict(max_steps=8, save_strategy="steps", save_steps=4, logging_steps=1)
    full = _trainer(tiny_setup, tiny_setup["make_model"](dropout=0.1), _args(tmp_path / "full", **args))
    full.train()
    resumed = _trainer(tiny_setup, tiny_setup["make_model"](dropout=0.1), _args(tmp_path / "resumed", **args))
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    def losses(trainer):
        return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e and e["step"] > 4}

    assert sorted(losses(resumed)) == sorted(losses(full)) == [5, 6, 7, 8]
    assert losses(resumed) == pytest.approx(losses(full), rel=1e-5)
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_lora_trains_adapters_and_merges_into_a_plain_model(tiny_setup, tmp_path):
    from peft import PeftModel
    from transformers import T5ForConditionalGeneration

    from modeling_gcmr.training.lora import apply_lora, merge_lora

    tokenizer, split = tiny_setup["tokenizer"], tiny_setup["split"]
    model = apply_lora(tiny_setup["make_model"](), r=4, alpha=8)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any(".q.base_layer." in n for n in frozen) and not any("lora_" in n for n in frozen)
    trainer = _trainer(tiny_setup, model, _args(tmp_path, max_steps=20, save_strategy="steps", save_steps=20))
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0]
    for name, parameter in model.named_parameters():
        if name in frozen:
            torch.testing.assert_close(parameter, frozen[name], msg=name)
    assert (tmp_path / "checkpoint-20" / "model.safetensors").is_file()
    before = model.retrieve(split.queries, tokenizer, top_k=3, num_beams=4)
    merged = merge_lora(model, adapter_dir=str(tmp_path / "adapter"))
    assert isinstance(merged.backbone, T5ForConditionalGeneration) and not isinstance(merged.backbone, PeftModel)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    after = merged.retrieve(split.queries, tokenizer, top_k=3, num_beams=4)
    assert [[k for k, _ in r] for r in after] == [[k for k, _ in r] for r in before]
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_lora(merged)


@pytest.mark.parametrize("backbone", ["t5", "encoder_decoder"])
def test_lora_keeps_every_token_matrix_trainable(backbone):
    """LoRA adapters cannot learn new rows: the identifier rows of the input embeddings and of an untied LM
    head (an EncoderDecoder pair has one) must still receive gradients, while the attention stays frozen."""
    from test_modeling import tester

    from modeling_gcmr.training.lora import apply_lora

    model = apply_lora(tester.model(backbone=backbone, vision=None), r=2, target_modules=("query", "value") if backbone != "t5" else ("q", "v"))
    weights = model.token_embedding_weights()
    assert len(weights) == (1 if backbone == "t5" else 2)  # T5 ties all three; a pair has its own encoder matrix
    assert any(weight is model.get_output_embeddings().weight for weight in weights)
    model(**tester.batch("embeds")).loss.backward()
    for weight in weights:
        assert weight.requires_grad and weight.grad is not None and weight.grad.abs().sum() > 0
    frozen = [name for name, p in model.named_parameters() if "attention" in name or "SelfAttention" in name]
    assert frozen and all(
        not p.requires_grad for name, p in model.named_parameters() if name in frozen and "lora_" not in name
    )


# ----------------------------------------------------------------------------- frozen encoder cache, filled up front


def _count_encoder_rows(model) -> list[tuple[int, int]]:
    """(rows, width) of every text-encoder call from now on."""
    calls: list[tuple[int, int]] = []
    model.text_encoder().register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    return calls


@pytest.mark.parametrize("fusion", [None, "coarse_to_fine"])
def test_prefill_caches_what_training_would_encode(tiny_setup, fusion):
    from modeling_gcmr.encoding_gcmr import prefill_encoder_cache

    model = tiny_setup["make_model"](**({"fusion": fusion} if fusion else {}))
    model.freeze_text_encoder(True)
    rows = tiny_setup["train"]["input_ids"]
    distinct = {tuple(row) for row in rows}
    calls = _count_encoder_rows(model)
    assert prefill_encoder_cache(model, rows, batch_size=4) == len(distinct) == len(model.encoder_cache)
    widths = [width for _, width in calls]
    assert widths == sorted(widths) and sum(count for count, _ in calls) == len(distinct)
    assert prefill_encoder_cache(model, rows, batch_size=4) == 0  # everything is cached already

    batch = GcmrDataCollator.from_config(model.config, tiny_setup["tokenizer"])(
        [tiny_setup["train"][i] for i in range(len(tiny_setup["train"]))])
    model.train()
    del calls[:]
    with torch.no_grad():
        torch.manual_seed(0)
        from_prefill = model(**batch).loss
        assert calls == []  # training found every query in the cache
        model.encoder_cache.clear()
        torch.manual_seed(0)
        fresh = model(**batch).loss
    torch.testing.assert_close(from_prefill, fresh, rtol=1e-5, atol=1e-6)


def test_prefill_skips_a_training_encoder_and_rows_the_cache_cannot_hold(tiny_setup):
    from modeling_gcmr.encoding_gcmr import prefill_encoder_cache

    model = tiny_setup["make_model"]()
    rows = tiny_setup["train"]["input_ids"]
    assert prefill_encoder_cache(model, rows) == 0 and len(model.encoder_cache) == 0  # the encoder trains
    model.freeze_text_encoder(True)
    # Room for some of the rows only: training would evict the first ones filled before meeting them.
    model.encoder_cache.max_bytes = 4 * model.text_encoder().get_input_embeddings().embedding_dim * 40
    assert prefill_encoder_cache(model, rows, batch_size=2) == 0 and len(model.encoder_cache) == 0
    # Room for all of them: all are filled, and the estimate was not below what they take.
    model.encoder_cache.max_bytes = 2 << 30
    assert prefill_encoder_cache(model, rows, batch_size=2) == len({tuple(row) for row in rows})
    width = model.text_encoder().get_input_embeddings().embedding_dim
    assert model.encoder_cache.bytes <= sum(4 * width * (len(row) + 1) for row in {tuple(row) for row in rows})


def test_prefill_callback_encodes_each_training_query_once_in_length_order(tiny_setup, tmp_path):
    from modeling_gcmr.training.callbacks import EncoderCachePrefillCallback, TrainingClockCallback

    model = tiny_setup["make_model"]()
    model.freeze_text_encoder(True)
    calls = _count_encoder_rows(model)
    clock = TrainingClockCallback()
    trainer = _trainer(tiny_setup, model, _args(tmp_path, max_steps=4, per_device_train_batch_size=4),
                       [clock, EncoderCachePrefillCallback()])
    trainer.train()
    distinct = {tuple(row) for row in tiny_setup["train"]["input_ids"]}
    widths = [width for _, width in calls]
    assert sum(count for count, _ in calls) == len(distinct)  # none encoded again by the steps
    assert widths == sorted(widths) and len(calls) == -(-len(distinct) // 4)
    assert clock.seconds > 0
