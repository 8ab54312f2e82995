#!/usr/bin/env python
"""Train and evaluate a generative cross-modal retriever (GRACE / ACE) with `transformers.Trainer`.

Build identifiers for every image -> train *memorize* (image -> identifier) and *retrieve* (caption ->
identifier) -> evaluate Recall@1/5/10 and MRR@10 on held-out captions with trie-constrained decoding (and the
dense baseline on the same queries) -> write the model card -> save the checkpoint, or push it to the Hub.

    python examples/run_gcmr.py --output_dir out --do_train --do_eval \
        --synthetic_num_images 200 --id_type structured --num_train_epochs 30 --baseline

    python examples/run_gcmr.py --corpus path/to/imagefolder --image_encoder path/to/clip --id_type coarse_fine \
        --do_train --do_eval --output_dir out --push_to_hub --hub_model_id you/gcmr-flowers

Everything the Trainer offers applies unchanged: `torchrun --nproc_per_node N examples/run_gcmr.py ...`,
`--deepspeed`, FSDP, `--resume_from_checkpoint PATH|last`, `--eval_strategy epoch` (Recall@K lands in the log history).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import datasets
import numpy as np
import transformers
from transformers import (
    AutoTokenizer,
    BertConfig,
    CLIPVisionConfig,
    HfArgumentParser,
    T5Config,
    Trainer,
    TrainingArguments,
    set_seed,
)

from modeling_gcmr import GcmrConfig, GcmrForRetrieval
from modeling_gcmr.evaluation.metrics import evaluate_retriever
from modeling_gcmr.publishing.checkpoint import push_retriever_to_hub, save_retriever
from modeling_gcmr.publishing.model_card import build_model_card
from modeling_gcmr.training.callbacks import RetrievalEvalCallback
from modeling_gcmr.training.collator import GcmrDataCollator, build_image_processor
from modeling_gcmr.training.data import CorpusArguments, split_captions
from modeling_gcmr.training.examples import (
    TrainingExamplesConfig,
    build_query_examples,
    build_training_examples,
)
from modeling_gcmr.training.lora import apply_lora, merge_lora
from tokenization_gcmr import ImageIdTokenizer, build_identifiers
from tokenization_gcmr.builders.text_vocabulary import train_text_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """The model to train: a new tiny/small T5-based retriever built from these sizes, or a checkpoint to continue."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A GCMR checkpoint (folder or Hub id) to continue training; its tokenizer is reused."}
    )
    text_tokenizer: str | None = field(
        default=None, metadata={"help": "A text tokenizer folder; default: train a WordPiece vocabulary on the captions."}
    )
    text_vocab_size: int = field(default=2000, metadata={"help": "Upper bound of the trained text vocabulary."})
    image_input: Literal["embeds", "pixels"] = field(
        default="embeds",
        metadata={"help": "'embeds': images enter as precomputed features; 'pixels': through a vision tower trained here."},
    )
    d_model: int = field(default=128, metadata={"help": "Hidden size of the T5 backbone."})
    d_ff: int = field(default=256, metadata={"help": "Feed-forward size of the T5 backbone."})
    num_layers: int = field(default=2, metadata={"help": "Encoder layers (and decoder layers) of the T5 backbone."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads of the T5 backbone."})
    dropout_rate: float = field(default=0.1, metadata={"help": "Dropout of the T5 backbone."})
    image_size: int | None = field(
        default=None, metadata={"help": "'pixels': input side of the vision tower; default: the synthetic image size, else 224."}
    )
    vision_hidden_size: int = field(default=64, metadata={"help": "'pixels': hidden size of the CLIP-style vision tower."})
    vision_layers: int = field(default=2, metadata={"help": "'pixels': layers of the vision tower."})
    vision_patch_size: int = field(default=8, metadata={"help": "'pixels': patch size of the vision tower."})
    num_visual_tokens: int = field(default=4, metadata={"help": "Encoder input vectors per image."})
    fusion: Literal["none", "coarse_to_fine"] = field(
        default="none", metadata={"help": "'coarse_to_fine' adds ACE's feature fusion; 'none' is GRACE."}
    )
    consistency_weight: float = field(default=0.0, metadata={"help": "Weight of ACE's R-Drop KL term (0 = off)."})
    identifier_init: Literal["auto", "unit_vectors", "random"] = field(
        default="auto",
        metadata={
            "help": "Initialise identifier-token embeddings from centroids/codebooks (unit_vectors), randomly, or "
            "auto: unit_vectors where the id type has them (structured, coarse_fine), else random."
        },
    )
    num_beams: int = field(default=10, metadata={"help": "Beam width of trie-constrained decoding (GRACE: 10)."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank on the backbone's attention projections; 0 = full fine-tuning."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(
        default="q,v", metadata={"help": "Comma-separated attention projections of the backbone that get LoRA adapters."}
    )


@dataclass
class DataArguments(CorpusArguments):
    """The corpus and held-out queries (see CorpusArguments), and how training examples are drawn from it."""

    image_encoder: str = field(
        default="precomputed",
        metadata={
            "help": "Image embeddings for identifiers: 'precomputed' (the corpus' image_embeds), 'dual_encoder' "
            "(train the dense baseline on the corpus), or a CLIP-style model folder."
        },
    )
    max_eval_queries: int | None = field(default=None, metadata={"help": "Evaluate on at most this many queries."})
    schedule: Literal["joint", "sequential"] = field(
        default="joint", metadata={"help": "'joint': mixed batches (GRACE); 'sequential': memorize first, then retrieve."}
    )
    phase_epochs: int = field(default=1, metadata={"help": "'sequential': passes over each phase per Trainer epoch."})
    memorize_ratio: float = field(default=1.0, metadata={"help": "Expected memorize examples per image."})
    retrieve_ratio: float = field(default=1.0, metadata={"help": "Expected retrieve examples per training caption."})
    use_pseudo_queries: bool = field(default=True, metadata={"help": "Use the corpus' pseudo_queries column as extra queries."})
    memorize_prompt: str = field(default="", metadata={"help": "Text given with the image in memorize examples."})
    max_query_length: int = field(default=64, metadata={"help": "Truncate queries to this many tokens."})
    baseline: bool = field(default=False, metadata={"help": "Also train and evaluate the dense dual-encoder baseline."})
    baseline_epochs: float = field(default=20.0, metadata={"help": "Training epochs of the dense baseline."})
    baseline_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the dense baseline."})


@dataclass
class IdentifierArguments:
    """How each image gets its identifier."""

    id_type: Literal["numeric", "string", "semantic", "structured", "atomic", "coarse_fine"] = field(
        default="structured", metadata={"help": "Identifier type (see tokenization_gcmr.build_identifiers)."}
    )
    id_options: str = field(
        default="{}", metadata={"help": 'JSON object of builder options, e.g. \'{"branching": 10, "leaf_size": 10}\'.'}
    )


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, IdentifierArguments, TrainingArguments))
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, id_args, training_args = parser.parse_json_file(os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, id_args, training_args = parser.parse_args_into_dataclasses(argv)
    _setup_logging(training_args)
    set_seed(training_args.seed)
    # The collator needs the task and image columns that forward() does not name.
    training_args.remove_unused_columns = False
    # The retriever is pushed once, with its tokenizer and card, after evaluation (not the Trainer's checkpoints).
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    if data_args.schedule == "sequential":
        # The curriculum order lives in the dataset; the Trainer must not shuffle it.
        training_args.train_sampling_strategy = "sequential"

    corpus = _load(data_args, model_args)
    captions = split_captions(corpus, data_args.num_query_captions)
    queries, gold = captions.queries, captions.gold
    if data_args.max_eval_queries is not None:
        queries, gold = queries[: data_args.max_eval_queries], gold[: data_args.max_eval_queries]

    # The dense baseline is trained here, by every process, because it runs a Trainer of its own.
    dense, dense_embeddings = None, None
    if model_args.model_name_or_path:
        tokenizer = ImageIdTokenizer.from_pretrained(model_args.model_name_or_path)
        model = GcmrForRetrieval.from_pretrained(model_args.model_name_or_path)
        _check_same_corpus(tokenizer, corpus)
        if data_args.baseline:
            dense, _ = _train_dense_baseline(corpus, captions.train, tokenizer, model_args, data_args, training_args)
    else:
        text_tokenizer = _text_tokenizer(captions.train, model_args)
        if data_args.baseline or data_args.image_encoder == "dual_encoder":
            dense, dense_embeddings = _train_dense_baseline(corpus, captions.train, text_tokenizer, model_args, data_args, training_args)
        embeddings = _identifier_embeddings(corpus, dense_embeddings, data_args)
        tokenizer = _build_tokenizer(corpus, captions.train, text_tokenizer, embeddings, id_args, training_args.seed)
        model = GcmrForRetrieval(_build_config(tokenizer, corpus, model_args, data_args))
        init = model_args.identifier_init
        if init == "auto":
            init = "unit_vectors" if tokenizer.identifier_table.unit_vectors is not None else "random"
        model.set_identifier_vocabulary(tokenizer, init=init)
    model.config.num_beams = model_args.num_beams
    if model_args.lora_r > 0:
        targets = [name.strip() for name in model_args.lora_target_modules.split(",") if name.strip()]
        model = apply_lora(model, model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout, targets)

    example_config = TrainingExamplesConfig(
        schedule=data_args.schedule,
        memorize_ratio=data_args.memorize_ratio,
        retrieve_ratio=data_args.retrieve_ratio,
        use_pseudo_queries=data_args.use_pseudo_queries,
        memorize_prompt=data_args.memorize_prompt,
        phase_epochs=data_args.phase_epochs,
        max_query_length=data_args.max_query_length,
        seed=training_args.seed,
    )
    with training_args.main_process_first(desc="building training examples"):
        train_dataset = build_training_examples(_model_inputs(captions.train, model_args), tokenizer, example_config)
        eval_dataset = build_query_examples(queries, gold, tokenizer, data_args.max_query_length) if queries else None
    logger.info("%d training examples (%s), %d held-out queries", len(train_dataset), data_args.schedule, len(queries))

    callbacks = []
    if queries and training_args.eval_strategy != "no":
        callbacks.append(
            RetrievalEvalCallback(queries, gold, tokenizer, num_beams=model_args.num_beams, batch_size=training_args.per_device_eval_batch_size)
        )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset,
        data_collator=GcmrDataCollator.from_config(model.config, tokenizer),
        processing_class=tokenizer,
        callbacks=callbacks,
    )

    results: dict = {}
    if training_args.do_train:
        # "last" resumes from the newest checkpoint in output_dir, a path from that checkpoint.
        checkpoint = training_args.resume_from_checkpoint
        checkpoint = True if checkpoint == "last" else checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        results.update(train_result.metrics)

    # What follows runs once: decoding, the baseline and publishing need no other process.
    if not trainer.is_world_process_zero():
        return results
    model = trainer.model
    if model_args.lora_r > 0:
        model = merge_lora(model, adapter_dir=os.path.join(training_args.output_dir, "lora_adapter"))
    if training_args.do_eval and queries:
        results.update(_evaluate(model, tokenizer, dense if data_args.baseline else None, queries, gold, model_args, training_args))
        trainer.save_metrics("eval", {k: v for k, v in results.items() if k.startswith("eval_")})
    _publish(model, tokenizer, results, corpus, model_args, data_args, id_args, training_args, push_to_hub)
    return results


def _setup_logging(training_args: TrainingArguments) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    level = training_args.get_process_log_level()
    logger.setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.warning(
        "process rank: %d, device: %s, world size: %d, distributed training: %s",
        training_args.process_index,
        training_args.device,
        training_args.world_size,
        training_args.parallel_mode.value == "distributed",
    )
    logger.info("training arguments: %s", training_args)


def _load(data_args: DataArguments, model_args: ModelArguments) -> datasets.Dataset:
    corpus = data_args.load()
    needed = "image_embeds" if model_args.image_input == "embeds" else "image"
    if needed not in corpus.column_names:
        raise ValueError(
            f"--image_input {model_args.image_input} needs a corpus column {needed!r}; the corpus has {corpus.column_names}"
        )
    logger.info("corpus: %d images, %d captions", len(corpus), sum(len(c) for c in corpus["captions"]))
    return corpus


def _model_inputs(corpus: datasets.Dataset, model_args: ModelArguments) -> datasets.Dataset:
    """Keep the one image column the model reads, so memorize rows carry only what the collator should batch."""
    drop = "image" if model_args.image_input == "embeds" else "image_embeds"
    return corpus.remove_columns(drop) if drop in corpus.column_names else corpus


def _text_tokenizer(train_corpus: datasets.Dataset, model_args: ModelArguments):
    if model_args.text_tokenizer:
        return AutoTokenizer.from_pretrained(model_args.text_tokenizer)
    # Deterministic, so every distributed process trains the very same vocabulary on its own.
    train_captions = [c for caps in train_corpus["captions"] for c in caps]
    return train_text_tokenizer(train_captions, vocab_size=model_args.text_vocab_size)


def _identifier_embeddings(corpus: datasets.Dataset, dense_embeddings, data_args: DataArguments) -> np.ndarray | None:
    """The image embeddings the identifiers are built from (None when the corpus has none and none are asked for)."""
    if data_args.image_encoder == "precomputed":
        return np.asarray(corpus["image_embeds"], dtype=np.float32) if "image_embeds" in corpus.column_names else None
    from modeling_gcmr.dense.image_embeddings import compute_image_embeddings

    if data_args.image_encoder == "dual_encoder":
        return dense_embeddings
    return compute_image_embeddings(corpus, data_args.image_encoder)


def _build_tokenizer(corpus, train_corpus, text_tokenizer, embeddings, id_args, seed: int) -> ImageIdTokenizer:
    options = json.loads(id_args.id_options)
    if not isinstance(options, dict):
        raise ValueError(f"--id_options must be a JSON object, got {id_args.id_options!r}")
    if id_args.id_type in ("string", "semantic"):
        options.setdefault("text_tokenizer", text_tokenizer)
    table = build_identifiers(
        list(corpus["image_key"]), id_args.id_type, embeddings=embeddings, captions=list(train_corpus["captions"]), seed=seed, **options
    )
    logger.info("built %s identifiers for %d images", id_args.id_type, len(table.keys))
    return ImageIdTokenizer(text_tokenizer, table)


def _image_inputs(corpus: datasets.Dataset, model_args: ModelArguments, data_args: DataArguments) -> dict:
    """How images enter both models: `image_embed_dim` of the corpus features, or a tiny CLIP-style vision config."""
    if model_args.image_input == "embeds":
        return {"image_embed_dim": len(corpus[0]["image_embeds"])}
    return {
        "vision_config": CLIPVisionConfig(
            image_size=model_args.image_size or (data_args.synthetic_image_size if data_args.corpus is None else 224),
            patch_size=model_args.vision_patch_size,
            hidden_size=model_args.vision_hidden_size,
            intermediate_size=2 * model_args.vision_hidden_size,
            num_hidden_layers=model_args.vision_layers,
            num_attention_heads=max(1, model_args.vision_hidden_size // 32),
        )
    }


def _build_config(tokenizer, corpus, model_args: ModelArguments, data_args: DataArguments) -> GcmrConfig:
    text_config = T5Config(
        vocab_size=len(tokenizer),
        d_model=model_args.d_model,
        d_kv=model_args.d_model // model_args.num_heads,
        d_ff=model_args.d_ff,
        num_layers=model_args.num_layers,
        num_decoder_layers=model_args.num_layers,
        num_heads=model_args.num_heads,
        dropout_rate=model_args.dropout_rate,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return GcmrConfig(
        text_config=text_config,
        num_visual_tokens=model_args.num_visual_tokens,
        fusion=model_args.fusion,
        consistency_weight=model_args.consistency_weight,
        num_beams=model_args.num_beams,
        **_image_inputs(corpus, model_args, data_args),
    )


def _check_same_corpus(tokenizer: ImageIdTokenizer, corpus: datasets.Dataset) -> None:
    missing = set(corpus["image_key"]) - set(tokenizer.identifier_table.keys)
    if missing:
        raise ValueError(
            f"{len(missing)} corpus images (e.g. {sorted(missing)[:3]}) have no identifier in the checkpoint's "
            "identifier table; continue training only on the corpus the checkpoint was built for"
        )


def _evaluate(model, tokenizer, dense, queries, gold, model_args, training_args) -> dict:
    """Recall@1/5/10 and MRR@10 of trie-constrained decoding (and of the dense baseline) on the held-out queries."""
    output_dir = training_args.output_dir
    model.eval()
    metrics = evaluate_retriever(
        partial(model.retrieve, tokenizer=tokenizer, num_beams=model_args.num_beams),
        queries,
        gold,
        top_k=10,
        batch_size=training_args.per_device_eval_batch_size,
        results_path=os.path.join(output_dir, "per_query_results.jsonl"),
    )
    results = {f"eval_{name}": value for name, value in metrics.items()}
    logger.info("generative retrieval: %s", results)
    if dense is not None:
        baseline = evaluate_retriever(
            dense.retrieve,
            queries,
            gold,
            top_k=10,
            batch_size=training_args.per_device_eval_batch_size,
            results_path=os.path.join(output_dir, "per_query_results_dense.jsonl"),
        )
        results.update({f"eval_dense_{name}": value for name, value in baseline.items()})
        logger.info("dense baseline: %s", {k: v for k, v in results.items() if k.startswith("eval_dense_")})
    return results


def _train_dense_baseline(corpus, train_corpus, text_tokenizer, model_args, data_args, training_args):
    """The CLIP-style dual encoder of the same width and image input, trained on the same training captions.

    Returns a `DualEncoderRetriever` over every corpus image and the image embeddings it indexes.
    """
    from modeling_gcmr.dense.dual_encoder import (
        DenseIndex,
        DualEncoderCollator,
        DualEncoderConfig,
        DualEncoderModel,
        DualEncoderRetriever,
        caption_pairs,
    )
    from modeling_gcmr.dense.image_embeddings import compute_image_embeddings

    config = DualEncoderConfig(
        text_config=BertConfig(
            vocab_size=len(text_tokenizer),
            hidden_size=model_args.d_model,
            num_hidden_layers=model_args.num_layers,
            num_attention_heads=model_args.num_heads,
            intermediate_size=model_args.d_ff,
            pad_token_id=text_tokenizer.pad_token_id,
        ),
        projection_dim=64,
        **_image_inputs(corpus, model_args, data_args),
    )
    set_seed(training_args.seed)
    model = DualEncoderModel(config)
    processor = build_image_processor(config.vision_config) if config.vision_config is not None else None
    image_column = "image" if processor is not None else "image_embeds"
    pairs = caption_pairs(train_corpus.select_columns(["image_key", "captions", image_column]))
    args = TrainingArguments(
        output_dir=os.path.join(training_args.output_dir, "dense_baseline"),
        num_train_epochs=data_args.baseline_epochs,
        learning_rate=data_args.baseline_learning_rate,
        per_device_train_batch_size=training_args.per_device_train_batch_size,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        use_cpu=training_args.use_cpu,
        ddp_backend=training_args.ddp_backend,
        seed=training_args.seed,
        disable_tqdm=training_args.disable_tqdm,
        logging_steps=training_args.logging_steps,
    )
    collator = DualEncoderCollator(text_tokenizer, processor, max_length=data_args.max_query_length)
    Trainer(model=model, args=args, train_dataset=pairs, data_collator=collator).train()
    model.eval()
    embeddings = compute_image_embeddings(corpus.select_columns(["image_key", image_column]), model, image_processor=processor)
    retriever = DualEncoderRetriever(model, text_tokenizer, DenseIndex(corpus["image_key"], embeddings), data_args.max_query_length)
    return retriever, embeddings


def _publish(model, tokenizer, results, corpus, model_args, data_args, id_args, training_args, push_to_hub: bool) -> None:
    """Write the model card and save the retriever to `<output_dir>/retriever` (and push it with --push_to_hub)."""
    metrics = {k[len("eval_"):]: v for k, v in results.items() if k.startswith("eval_") and not k.startswith("eval_dense_")}
    baseline = {k[len("eval_dense_"):]: v for k, v in results.items() if k.startswith("eval_dense_")}
    hyperparameters = {
        "id_type": id_args.id_type,
        "schedule": data_args.schedule,
        "memorize_ratio": data_args.memorize_ratio,
        "retrieve_ratio": data_args.retrieve_ratio,
        "learning_rate": training_args.learning_rate,
        "train_batch_size": training_args.per_device_train_batch_size,
        "num_train_epochs": training_args.num_train_epochs,
        "max_steps": training_args.max_steps,
        "seed": training_args.seed,
        "d_model": model_args.d_model,
        "num_layers": model_args.num_layers,
        "num_beams": model_args.num_beams,
        **({"lora_r": model_args.lora_r, "lora_alpha": model_args.lora_alpha} if model_args.lora_r > 0 else {}),
    }
    name = training_args.hub_model_id or os.path.basename(os.path.abspath(training_args.output_dir))
    card = None
    if metrics:
        card = build_model_card(
            model_name=name,
            id_type=id_args.id_type,
            corpus_size=len(corpus),
            dataset_name=data_args.corpus or "gcmr-synthetic-shapes",
            training_args=hyperparameters,
            metrics=metrics,
            baseline_metrics=baseline or None,
            repo_id=training_args.hub_model_id,
            extra={"identifier_signature": tokenizer.identifier_signature[:16], "held_out_queries": int(metrics["num_queries"])},
            eval_split="held-out captions",
        )
    folder = save_retriever(model, tokenizer, os.path.join(training_args.output_dir, "retriever"), card)
    logger.info("saved the retriever to %s", folder)
    if push_to_hub:
        if not training_args.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (the repo to push to)")
        commit = push_retriever_to_hub(model, tokenizer, training_args.hub_model_id, card, token=getattr(training_args, "hub_token", None))
        logger.info("pushed the retriever to %s (%s)", training_args.hub_model_id, commit.oid)


if __name__ == "__main__":
    main()
