#!/usr/bin/env python
"""Train and evaluate a generative cross-modal retriever (GRACE / ACE) with `transformers.Trainer`.

Build identifiers for every image -> train *memorize* (image -> identifier) and *retrieve* (caption ->
identifier) -> evaluate Recall@1/5/10 and MRR@10 on held-out captions with trie-constrained decoding (and the
dense baseline on the same queries) -> write the model card -> save the checkpoint, or push it to the Hub.

    # real captions and CLIP-style features, with a pretrained text encoder (the recommended defaults):
    python examples/run_gcmr.py --corpus corpus.jsonl --image_encoder precomputed --text_backbone path/to/MiniLM \
        --id_type coarse_fine --num_query_captions 0 --do_train --output_dir out

    # your own image folder (pixels through a small vision tower, identifiers from a dense baseline trained here):
    python examples/run_gcmr.py --corpus path/to/imagefolder --image_encoder dual_encoder --do_train --do_eval \
        --output_dir out --learning_rate 3e-3 --num_train_epochs 60

    # the built-in synthetic corpus:
    python examples/run_gcmr.py --output_dir out --do_train --do_eval --synthetic_num_images 200 --baseline

Everything the Trainer offers applies unchanged: `torchrun --nproc_per_node N examples/run_gcmr.py ...`,
`--deepspeed`, FSDP, `--resume_from_checkpoint PATH|last`, `--eval_strategy epoch` (Recall@K lands in the log history).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from functools import partial

import datasets
import numpy as np
import transformers
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from modeling_gcmr import GcmrForRetrieval
from modeling_gcmr.dense.dual_encoder import DualEncoderArguments, DualEncoderTrainingArguments, train_dual_encoder
from modeling_gcmr.dense.image_embeddings import compute_image_embeddings
from modeling_gcmr.evaluation.metrics import evaluate_retriever, read_query_file
from modeling_gcmr.publishing.checkpoint import push_retriever_to_hub, save_retriever
from modeling_gcmr.publishing.model_card import build_model_card
from modeling_gcmr.training.arguments import DataArguments, GcmrTrainingArguments, IdentifierArguments, ModelArguments
from modeling_gcmr.training.backbones import load_text_backbone
from modeling_gcmr.training.callbacks import (
    BeamNegativesCallback,
    EncoderCachePrefillCallback,
    ProcessSeedCallback,
    RetrievalEvalCallback,
    TrainingClockCallback,
)
from modeling_gcmr.training.collator import GcmrDataCollator
from modeling_gcmr.training.data import split_captions
from modeling_gcmr.training.examples import TrainingExamplesConfig, build_query_examples, build_training_examples
from modeling_gcmr.training.lora import apply_lora, merge_lora
from modeling_gcmr.training.model_setup import ScratchT5, VisionTower, build_retriever, typical_image_size
from modeling_gcmr.training.optimization import optimizer_cls_and_kwargs, part_learning_rates
from tokenization_gcmr import ImageIdTokenizer, build_identifiers
from tokenization_gcmr.builders.text_vocabulary import train_text_tokenizer

logger = logging.getLogger(__name__)
# Identifier types built from image embeddings, and the flags that provide them.
EMBEDDING_ID_TYPES = ("structured", "coarse_fine")


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, id_args, training_args = _parse(argv)
    # The retriever is pushed once, with its tokenizer and card, after evaluation (not the Trainer's checkpoints).
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    set_seed(training_args.seed)
    corpus = _load(data_args, model_args)
    captions = split_captions(corpus, data_args.num_query_captions)
    queries, gold = _held_out_queries(captions, data_args)

    dense, dense_embeddings = None, None
    if data_args.baseline or data_args.image_encoder == "dual_encoder":
        # Every process trains it: the baseline runs a Trainer of its own.
        dense = _train_dense_baseline(captions.train, model_args, data_args, training_args)
        dense_embeddings = dense.index.embeddings
    model, tokenizer = _model_and_tokenizer(corpus, captions.train, dense_embeddings, model_args, data_args, id_args,
                                            training_args)
    trainer = _trainer(model, tokenizer, captions.train, queries, gold, model_args, data_args, training_args)

    results: dict = {}
    if training_args.do_train:
        # "last" resumes from the newest checkpoint in output_dir, a path from that checkpoint.
        checkpoint = True if training_args.resume_from_checkpoint == "last" else training_args.resume_from_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        clock = next(c for c in trainer.callback_handler.callbacks if isinstance(c, TrainingClockCallback))
        train_result.metrics.update(train_minutes=clock.minutes, stopped_by_time_budget=clock.stopped_by_budget)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        results.update(train_result.metrics)

    # What follows runs once: decoding, the baseline and publishing need no other process.
    if not trainer.is_world_process_zero():
        return results
    model = trainer.model
    if model_args.lora_r > 0:
        model = merge_lora(model, adapter_dir=os.path.join(training_args.output_dir, "lora_adapter"))
    if training_args.do_eval:
        if not queries:
            logger.warning("--do_eval: there are no held-out queries (every image has at most "
                           "--num_query_captions captions, and no --eval_query_file); nothing is evaluated")
        else:
            results.update(_evaluate(model, tokenizer, dense if data_args.baseline else None, queries, gold,
                                     model_args, training_args))
            trainer.save_metrics("eval", {k: v for k, v in results.items() if k.startswith("eval_")})
    _publish(model, tokenizer, results, corpus, model_args, data_args, id_args, training_args, push_to_hub)
    _print_summary(results, training_args.output_dir)
    return results


def _parse(argv: list[str] | None):
    parser = HfArgumentParser((ModelArguments, DataArguments, IdentifierArguments, GcmrTrainingArguments))
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, id_args, training_args = parser.parse_json_file(os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, id_args, training_args = parser.parse_args_into_dataclasses(argv)
    _setup_logging(training_args)
    # The collator needs the task and image columns that forward() does not name.
    training_args.remove_unused_columns = False
    if data_args.schedule == "sequential":
        # The curriculum order lives in the dataset; the Trainer must not shuffle it.
        training_args.train_sampling_strategy = "sequential"
    return model_args, data_args, id_args, training_args


def _setup_logging(training_args: TrainingArguments) -> None:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    level = training_args.get_process_log_level()
    logger.setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.warning("process rank: %d, device: %s, world size: %d, distributed training: %s",
                   training_args.process_index, training_args.device, training_args.world_size,
                   training_args.parallel_mode.value == "distributed")


def _load(data_args: DataArguments, model_args: ModelArguments) -> datasets.Dataset:
    corpus = data_args.load()
    columns = corpus.column_names
    if model_args.image_input == "auto":
        model_args.image_input = "embeds" if "image_embeds" in columns else "pixels"
    needed = "image_embeds" if model_args.image_input == "embeds" else "image"
    if needed not in columns:
        raise ValueError(f"--image_input {model_args.image_input} needs a corpus column {needed!r}; the corpus has "
                         f"{columns}: use --image_input {'pixels' if needed == 'image_embeds' else 'embeds'}")
    logger.info("corpus: %d images, %d captions", len(corpus), sum(len(c) for c in corpus["captions"]))
    return corpus


def _held_out_queries(captions, data_args: DataArguments) -> tuple[list[str], list[str]]:
    if data_args.eval_query_file:
        queries, gold = read_query_file(data_args.eval_query_file)
    else:
        queries, gold = captions.queries, captions.gold
    if data_args.max_eval_queries is not None:
        queries, gold = queries[: data_args.max_eval_queries], gold[: data_args.max_eval_queries]
    return queries, gold


def _train_dense_baseline(train_corpus, model_args: ModelArguments, data_args: DataArguments,
                          training_args: TrainingArguments):
    """The library's CLIP-style dual encoder of the same width and image input, on the same training captions."""
    pixels = model_args.image_input == "pixels"
    args = DualEncoderArguments(
        image_input="pixels" if pixels else "embeds",
        hidden_size=model_args.d_model,
        num_layers=model_args.num_layers,
        num_heads=model_args.num_heads,
        image_size=(model_args.image_size or typical_image_size(train_corpus)) if pixels else 32,
        patch_size=model_args.vision_patch_size,
        projection_dim=data_args.baseline_projection_dim,
    )
    baseline_args = DualEncoderTrainingArguments(
        output_dir=os.path.join(training_args.output_dir, "dense_baseline"),
        num_train_epochs=data_args.baseline_epochs,
        learning_rate=data_args.baseline_learning_rate,
        per_device_train_batch_size=training_args.per_device_train_batch_size,
        per_device_eval_batch_size=training_args.per_device_eval_batch_size,
        use_cpu=training_args.use_cpu,
        ddp_backend=training_args.ddp_backend,
        seed=training_args.seed,
        disable_tqdm=training_args.disable_tqdm,
    )
    return train_dual_encoder(train_corpus, args, baseline_args, seed=training_args.seed)


def _model_and_tokenizer(corpus, train_corpus, dense_embeddings, model_args, data_args, id_args, training_args):
    if model_args.model_name_or_path:
        tokenizer = ImageIdTokenizer.from_pretrained(model_args.model_name_or_path)
        model = GcmrForRetrieval.from_pretrained(model_args.model_name_or_path)
        missing = set(corpus["image_key"]) - set(tokenizer.keys)
        if missing:
            raise ValueError(f"{len(missing)} corpus images (e.g. {sorted(missing)[:3]}) have no identifier in the "
                             "checkpoint's identifier table; continue training only on the corpus it was built for")
    else:
        backbone = load_text_backbone(model_args.text_backbone) if model_args.text_backbone else None
        text_tokenizer = backbone.tokenizer if backbone is not None else _trained_text_tokenizer(train_corpus, model_args)
        embeddings = _identifier_embeddings(corpus, dense_embeddings, data_args, id_args)
        tokenizer = _build_tokenizer(corpus, train_corpus, text_tokenizer, embeddings, id_args, training_args.seed)
        shared = {"auto": None, "true": True, "false": False}[model_args.shared_query_space]
        model = build_retriever(
            tokenizer,
            backbone=backbone,
            scratch=None if backbone else ScratchT5(model_args.d_model, model_args.d_ff, model_args.num_layers,
                                                    model_args.num_heads, model_args.dropout_rate),
            image_embed_dim=len(corpus[0]["image_embeds"]) if model_args.image_input == "embeds" else None,
            vision=_vision_tower(corpus, model_args),
            identifier_features=embeddings,
            init=model_args.identifier_init,
            freeze_text_encoder=model_args.freeze_text_encoder,
            shared_query_space=shared,
            decoder_layers=model_args.decoder_layers,
            decoder_intermediate_size=model_args.decoder_intermediate_size,
            seed=training_args.seed,
            num_visual_tokens=model_args.num_visual_tokens,
            fusion=model_args.fusion,
            consistency_weight=model_args.consistency_weight,
            score_scale=model_args.score_scale,
            prefix_loss_weight=model_args.prefix_loss_weight,
            shared_eos_vector=model_args.shared_eos_vector,
            interpolation_prob=model_args.interpolation_prob,
            max_query_tokens=model_args.max_query_tokens,
        )
        _store_features_and_distill(model, embeddings, model_args)
    model.config.num_beams = model_args.num_beams
    if model_args.lora_r > 0:
        targets = [name.strip() for name in model_args.lora_target_modules.split(",") if name.strip()]
        model = apply_lora(model, model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout, targets)
    return model, tokenizer


def _store_features_and_distill(model: GcmrForRetrieval, embeddings: np.ndarray | None, model_args) -> None:
    """Store the image features (default: whenever there are some) and set the distillation weight (default: 10
    when features are stored and queries share their space; chosen on f30k-dev)."""
    store = model_args.store_image_features
    if store and embeddings is None:
        raise ValueError("--store_image_features needs image features: --image_encoder precomputed (a corpus with "
                         "image_embeds), dual_encoder or a CLIP folder")
    if store or (store is None and embeddings is not None and model.config.identifier_head == "identifier"):
        model.store_image_features(embeddings)
    distill = model_args.distill_weight
    if distill is None:
        distill = 10.0 if model.stored_image_features is not None and model.config.shared_query_space else 0.0
    model.config.distill_weight = float(distill)


def _trained_text_tokenizer(train_corpus: datasets.Dataset, model_args: ModelArguments):
    if model_args.text_tokenizer:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_args.text_tokenizer)
    # Deterministic, so every distributed process trains the very same vocabulary on its own.
    return train_text_tokenizer((c for caps in train_corpus["captions"] for c in caps), vocab_size=model_args.text_vocab_size)


def _identifier_embeddings(corpus, dense_embeddings, data_args: DataArguments, id_args) -> np.ndarray | None:
    """The image embeddings identifiers are built from (None when there are none and the id type needs none)."""
    if data_args.image_encoder == "dual_encoder":
        return dense_embeddings
    if data_args.image_encoder != "precomputed":
        return compute_image_embeddings(corpus, data_args.image_encoder)
    if "image_embeds" in corpus.column_names:
        return np.asarray(corpus["image_embeds"], dtype=np.float32)
    if id_args.id_type in EMBEDDING_ID_TYPES:
        raise ValueError(
            f"--id_type {id_args.id_type} is built from image embeddings, and the corpus has no image_embeds column: "
            "add --image_encoder dual_encoder (trains the dense baseline on your images and embeds them with it) or "
            "--image_encoder path/to/clip (a local CLIP model folder), or use --id_type atomic or numeric"
        )
    return None


def _build_tokenizer(corpus, train_corpus, text_tokenizer, embeddings, id_args, seed: int) -> ImageIdTokenizer:
    options = json.loads(id_args.id_options)
    if not isinstance(options, dict):
        raise ValueError(f"--id_options must be a JSON object, got {id_args.id_options!r}")
    if id_args.id_type in ("string", "semantic"):
        options.setdefault("text_tokenizer", text_tokenizer)
    table = build_identifiers(list(corpus["image_key"]), id_args.id_type, embeddings=embeddings,
                              captions=list(train_corpus["captions"]), seed=seed, **options)
    logger.info("built %s identifiers for %d images", id_args.id_type, len(table.keys))
    return ImageIdTokenizer(text_tokenizer, table)


def _vision_tower(corpus: datasets.Dataset, model_args: ModelArguments) -> VisionTower | None:
    if model_args.image_input != "pixels":
        return None
    return VisionTower(image_size=model_args.image_size or typical_image_size(corpus),
                       hidden_size=model_args.vision_hidden_size, num_layers=model_args.vision_layers,
                       patch_size=model_args.vision_patch_size)


def _trainer(model, tokenizer, train_corpus, queries, gold, model_args, data_args, training_args) -> Trainer:
    rates = part_learning_rates(model.config, training_args)
    # --hard_negatives, else the config's (GcmrConfig's default for a new model), else 0 for a fixed decoder.
    if model_args.hard_negatives is not None:
        model.config.hard_negatives = model_args.hard_negatives
    elif rates["decoder"] == 0:
        # A fixed decoder scores every negative with the query the softmax already used: nothing to score again.
        model.config.hard_negatives = 0
    example_config = TrainingExamplesConfig(
        schedule=data_args.schedule,
        memorize_ratio=data_args.memorize_ratio,
        retrieve_ratio=data_args.retrieve_ratio,
        use_pseudo_queries=data_args.use_pseudo_queries,
        memorize_prompt=data_args.memorize_prompt,
        phase_epochs=data_args.phase_epochs,
        seed=training_args.seed,
    )
    limit = model.config.query_token_limit
    drop = "image" if model_args.image_input == "embeds" else "image_embeds"
    train_corpus = train_corpus.remove_columns(drop) if drop in train_corpus.column_names else train_corpus
    with training_args.main_process_first(desc="building training examples"):
        train_dataset = build_training_examples(train_corpus, tokenizer, example_config, query_token_limit=limit)
        eval_dataset = build_query_examples(queries, gold, tokenizer, limit) if queries else None
    logger.info("%d training examples (%s), %d held-out queries", len(train_dataset), data_args.schedule, len(queries))
    # The prefill after the clock: its encoding counts in the training minutes, as the first epoch's did.
    callbacks = [TrainingClockCallback(data_args.max_train_minutes), EncoderCachePrefillCallback(),
                 ProcessSeedCallback()]
    if queries and training_args.eval_strategy != "no":
        callbacks.append(RetrievalEvalCallback(queries, gold, tokenizer, num_beams=model_args.num_beams,
                                               batch_size=training_args.per_device_eval_batch_size))
    if model_args.beam_negatives > 0 and training_args.do_train:
        if model.config.identifier_head != "identifier" or model.config.hard_negatives == 0:
            raise ValueError("--beam_negatives needs the identifier head and --hard_negatives > 0 (the mined "
                             "negatives are scored by the hard-negative loss)")
        captions_of = [(caption, row["image_key"]) for row in train_corpus for caption in row["captions"]]
        callbacks.append(BeamNegativesCallback([c for c, _ in captions_of], [k for _, k in captions_of], tokenizer,
                                               model_args.beam_negatives, num_beams=model_args.num_beams,
                                               batch_size=training_args.per_device_eval_batch_size,
                                               max_queries=model_args.beam_negative_queries))
    optimizer = optimizer_cls_and_kwargs(model, training_args, **{f"{part}_learning_rate": rate
                                                                  for part, rate in rates.items()})
    return Trainer(model=model, args=training_args, train_dataset=train_dataset if training_args.do_train else None,
                   eval_dataset=eval_dataset, data_collator=GcmrDataCollator.from_config(model.config, tokenizer),
                   processing_class=tokenizer, callbacks=callbacks, optimizer_cls_and_kwargs=optimizer)


def _evaluate(model, tokenizer, dense, queries, gold, model_args, training_args) -> dict:
    """Recall@1/5/10 and MRR@10 of trie-constrained decoding (and of the dense baseline) on the held-out queries."""
    output_dir = training_args.output_dir
    model.eval()
    metrics = evaluate_retriever(partial(model.retrieve, tokenizer=tokenizer, num_beams=model_args.num_beams),
                                 queries, gold, batch_size=training_args.per_device_eval_batch_size,
                                 results_path=os.path.join(output_dir, "per_query_results.jsonl"))
    results = {f"eval_{name}": value for name, value in metrics.items()}
    if dense is not None:
        baseline = evaluate_retriever(dense.retrieve, queries, gold, batch_size=training_args.per_device_eval_batch_size,
                                      results_path=os.path.join(output_dir, "per_query_results_dense.jsonl"))
        results.update({f"eval_dense_{name}": value for name, value in baseline.items()})
    return results


def _publish(model, tokenizer, results, corpus, model_args, data_args, id_args, training_args, push_to_hub) -> None:
    """Write the model card and save the retriever to `<output_dir>/retriever` (and push it with --push_to_hub)."""
    metrics = {k[len("eval_"):]: v for k, v in results.items() if k.startswith("eval_") and not k.startswith("eval_dense_")}
    baseline = {k[len("eval_dense_"):]: v for k, v in results.items() if k.startswith("eval_dense_")}
    hyperparameters = {
        "id_type": id_args.id_type,
        "text_backbone": model_args.text_backbone or "t5 from scratch",
        "schedule": data_args.schedule,
        "memorize_ratio": data_args.memorize_ratio,
        "retrieve_ratio": data_args.retrieve_ratio,
        "learning_rate": training_args.learning_rate,
        "train_batch_size": training_args.per_device_train_batch_size,
        "num_train_epochs": training_args.num_train_epochs,
        "max_steps": training_args.max_steps,
        "seed": training_args.seed,
        "num_beams": model_args.num_beams,
        **({"lora_r": model_args.lora_r, "lora_alpha": model_args.lora_alpha} if model_args.lora_r > 0 else {}),
    }
    name = training_args.hub_model_id or os.path.basename(os.path.abspath(training_args.output_dir))
    extra = {"identifier_signature": tokenizer.identifier_signature[:16]}
    if metrics:
        extra["held_out_queries"] = int(metrics["num_queries"])
    # A card even without held-out queries (the real-caption contract command): what was trained, and how to load it.
    card = build_model_card(
        model_name=name,
        id_type=id_args.id_type,
        corpus_size=len(corpus),
        dataset_name=data_args.corpus or "gcmr-synthetic-shapes",
        training_args=hyperparameters,
        metrics=metrics or None,
        baseline_metrics=(baseline or None) if metrics else None,
        repo_id=training_args.hub_model_id,
        extra=extra,
        eval_split="held-out captions",
    )
    folder = save_retriever(model, tokenizer, os.path.join(training_args.output_dir, "retriever"), card)
    logger.info("saved the retriever to %s", folder)
    if push_to_hub:
        if not training_args.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (the repo to push to)")
        commit = push_retriever_to_hub(model, tokenizer, training_args.hub_model_id, card,
                                       token=getattr(training_args, "hub_token", None))
        logger.info("pushed the retriever to %s (%s)", training_args.hub_model_id, commit.oid)


def _print_summary(results: dict, output_dir: str) -> None:
    shown = {name: value for name, value in results.items()
             if name.startswith(("eval_recall", "eval_mrr", "eval_dense_recall", "eval_dense_mrr", "train_runtime"))}
    for name, value in sorted(shown.items()):
        print(f"{name:>24}: {value:.4f}" if isinstance(value, float) else f"{name:>24}: {value}")
    print(f"{'retriever':>24}: {os.path.join(output_dir, 'retriever')}")


if __name__ == "__main__":
    main()
