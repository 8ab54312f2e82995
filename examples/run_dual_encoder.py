#!/usr/bin/env python
"""Train and evaluate the dense dual-encoder baseline with `transformers.Trainer`.

Load a corpus (default: the built-in synthetic one) -> hold out the last caption of each image as a query ->
train a CLIP-style dual encoder on the remaining (image, caption) pairs -> index every image with exact faiss
inner-product search -> Recall@1/5/10 and MRR@10 with the same function as the generative retriever.

    python examples/run_dual_encoder.py --output_dir out/dense --do_train --do_eval --synthetic_num_images 200

    python examples/run_dual_encoder.py --corpus path/to/imagefolder --skip_bad_rows --output_dir out/dense \
        --do_train --do_eval --num_train_epochs 20

    python examples/run_dual_encoder.py --model_name_or_path out/dense --do_eval --output_dir out/dense-eval

Writes to `output_dir`: the model, tokenizer and image processor (`--do_train`), `dual_encoder_results.json`
(metrics and settings), `per_query_results.jsonl` (query, gold key, ranked keys with scores), and
`image_embeddings.safetensors` (the corpus image embeddings, usable for identifiers).
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import asdict, dataclass, field

import transformers
from transformers import HfArgumentParser

from modeling_gcmr.dense.dual_encoder import (
    DualEncoderArguments,
    DualEncoderRetriever,
    DualEncoderTrainingArguments,
    train_dual_encoder,
)
from modeling_gcmr.dense.image_embeddings import save_image_embeddings
from modeling_gcmr.evaluation.metrics import evaluate_retriever, save_results
from modeling_gcmr.training.data import CorpusArguments, split_captions

logger = logging.getLogger(__name__)


@dataclass
class DataArguments(CorpusArguments):
    """The corpus and the held-out queries (see CorpusArguments), and a model to evaluate."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A folder written by this script, to evaluate without training."}
    )


def main(argv: list[str] | None = None) -> dict:
    # DualEncoderTrainingArguments: TrainingArguments with the baseline's defaults (30 epochs, lr 2e-3, batch 64, ...).
    parser = HfArgumentParser((DualEncoderArguments, DataArguments, DualEncoderTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", handlers=[logging.StreamHandler(sys.stdout)])
    logger.setLevel(training_args.get_process_log_level())
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    if not (training_args.do_train or training_args.do_eval):
        parser.error("nothing to do: pass --do_train and/or --do_eval")
    if not training_args.do_train and data_args.model_name_or_path is None:
        parser.error("--do_eval without --do_train needs --model_name_or_path (a folder written by this script)")

    corpus = data_args.load()
    split = split_captions(corpus, data_args.num_query_captions)
    logger.info("corpus: %d images, %d held-out queries", len(corpus), len(split.queries))

    if training_args.do_train:
        retriever = train_dual_encoder(split.train, model_args, training_args)
        retriever.save_pretrained(training_args.output_dir)
    else:
        retriever = DualEncoderRetriever.from_pretrained(data_args.model_name_or_path, split.train, model_args.max_length)
    save_image_embeddings(
        os.path.join(training_args.output_dir, "image_embeddings.safetensors"), retriever.index.keys, retriever.index.embeddings
    )

    results: dict = {"settings": {"model": asdict(model_args), "data": asdict(data_args), "seed": training_args.seed}}
    if training_args.do_eval:
        if not split.queries:
            raise ValueError("no held-out queries: every image needs more than --num_query_captions captions")
        metrics = evaluate_retriever(
            retriever.retrieve,
            split.queries,
            split.gold,
            top_k=10,
            batch_size=training_args.per_device_eval_batch_size,
            results_path=os.path.join(training_args.output_dir, "per_query_results.jsonl"),
        )
        results.update({f"eval_{name}": value for name, value in metrics.items()})
        logger.info("dense baseline: %s", metrics)
        print(" ".join(f"{name}={value:.4f}" for name, value in metrics.items() if name != "num_queries"))
    save_results(os.path.join(training_args.output_dir, "dual_encoder_results.json"), results)
    return results


if __name__ == "__main__":
    main()
