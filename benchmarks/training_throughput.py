#!/usr/bin/env python
"""Training throughput, old path against new, side by side in one run (examples per second of training steps).

The real-caption benchmark's model (frozen all-MiniLM-L6-v2 encoder, 2-layer decoder, batch 64) on the same
f30k-test training examples (one memorize row per image, captions 0 and 1 as retrieve rows), two ways:

- `format 1` (the code before the identifier head, still what format 1 checkpoints run): image features are
  projected and prepended to the text, so every memorize row runs the frozen encoder *and* back-propagates through
  it; the LM head scores the whole 30.6k-token vocabulary; nothing is cached.
- `format 2` (now): images enter the decoder memory directly; the frozen encoder's states are computed once per
  distinct query and cached (the first epoch pays for them, so both the first and a later epoch are timed); the
  identifier head scores trie edges only.

    python benchmarks/training_throughput.py                 # f30k-test, coarse_fine, 20 timed steps each
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import torch  # noqa: E402
from transformers import GenerationConfig, HfArgumentParser  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from real_captions import DEFAULT_DATA_DIR, DEFAULT_ID_OPTIONS, FEATURE_CAPTIONS, image_features, minilm_folder, read_captions  # noqa: E402
from report import REPO, git_revision, machine, markdown_table, write_section  # noqa: E402

from modeling_gcmr import GcmrConfig, GcmrForRetrieval  # noqa: E402
from modeling_gcmr.evaluation.metrics import save_results  # noqa: E402
from modeling_gcmr.training.backbones import load_text_backbone  # noqa: E402
from modeling_gcmr.training.collator import GcmrDataCollator  # noqa: E402
from modeling_gcmr.training.examples import TrainingExamplesConfig, build_training_examples  # noqa: E402
from modeling_gcmr.training.model_setup import build_retriever  # noqa: E402
from tokenization_gcmr import ImageIdTokenizer, build_identifiers  # noqa: E402

DOC_PATH = REPO / "docs" / "benchmarks.md"


@dataclass
class ThroughputArguments:
    dataset: str = field(default="f30k-test", metadata={"help": "Caption file of the real-caption protocol."})
    id_type: str = field(default="coarse_fine", metadata={"help": "Identifier type of both models."})
    steps: int = field(default=20, metadata={"help": "Timed optimizer steps per measurement."})
    batch_size: int = field(default=64, metadata={"help": "Training batch size (the benchmark's)."})
    output_dir: str = field(default=str(REPO / "benchmarks" / "results" / "training_throughput"))
    write_doc: bool = field(default=True, metadata={"help": "Write the table into docs/benchmarks.md."})


def format1_model(backbone, tokenizer, features) -> GcmrForRetrieval:
    """The model as the code before the identifier head built it: format 1, text head, no cache."""
    config = GcmrConfig(text_config=backbone.text_config(2, 1024), image_embed_dim=features.shape[1],
                        format_version=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                        decoder_start_token_id=tokenizer.cls_token_id)
    model = GcmrForRetrieval(config)
    model.set_identifier_vocabulary(tokenizer, init="random")
    backbone.load_weights(model)
    model.generation_config = GenerationConfig(decoder_start_token_id=tokenizer.cls_token_id)
    model.freeze_text_encoder(True)
    return model


def timed_steps(model, batches, steps: int) -> float:
    """Seconds for `steps` optimizer steps (forward, backward, AdamW), after one untimed warm-up step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    for index in range(steps + 1):
        if index == 1:
            start = time.perf_counter()
        loss = model(**batches[index % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(ThroughputArguments).parse_args_into_dataclasses(argv)
    torch.manual_seed(0)
    source = Path(DEFAULT_DATA_DIR) / f"{args.dataset}.txt"
    captions = read_captions(source)
    keys = [f"img_{i:05d}" for i in range(len(captions))]
    folder = minilm_folder()
    features = image_features(captions, folder, REPO / "benchmarks" / "results" / "cache", source)
    backbone = load_text_backbone(folder)
    table = build_identifiers(keys, args.id_type, embeddings=features, seed=0, **DEFAULT_ID_OPTIONS.get(args.id_type, {}))
    tokenizer = ImageIdTokenizer(backbone.tokenizer, table)
    corpus = datasets.Dataset.from_dict({"image_key": keys, "image_embeds": features.tolist(),
                                         "captions": [[caps[j] for j in FEATURE_CAPTIONS] for caps in captions]})
    examples = build_training_examples(corpus, tokenizer, TrainingExamplesConfig(seed=0), query_token_limit=512)
    collate = GcmrDataCollator(tokenizer)
    # Enough distinct batches that the new path meets each query once (its first epoch) before any repeats.
    batches = [collate([examples[i] for i in range(start, start + args.batch_size)])
               for start in range(0, (args.steps + 1) * args.batch_size, args.batch_size)]
    measured = {}
    old = format1_model(backbone, tokenizer, features)
    measured["format 1 (before)"] = timed_steps(old, batches, args.steps)
    del old
    new = build_retriever(tokenizer, backbone=backbone, image_embed_dim=features.shape[1], identifier_features=features)
    measured["format 2, first epoch (states computed)"] = timed_steps(new, batches, args.steps)
    measured["format 2, later epochs (states cached)"] = timed_steps(new, batches, args.steps)
    base = args.steps * args.batch_size / measured["format 1 (before)"]
    rows = [[name, f"{seconds / args.steps:.3f}", f"{args.steps * args.batch_size / seconds:.0f}",
             f"{args.steps * args.batch_size / seconds / base:.1f}x"] for name, seconds in measured.items()]
    result = {"rows": rows, "machine": machine(), "revision": git_revision(), "setup": vars(args),
              "command": shlex.join(["python", "benchmarks/training_throughput.py", *(sys.argv[1:] if argv is None else argv)])}
    save_results(Path(args.output_dir) / "results.json", result)
    text = markdown_table(["path", "s / step", "examples / s", "vs format 1"], rows)
    print(text)
    if args.write_doc:
        section = "\n".join([
            "## Training throughput: before and after the identifier head", "",
            f"{args.dataset}, {args.id_type} identifiers, frozen MiniLM encoder, batch {args.batch_size}, "
            f"{args.steps} timed AdamW steps per row, measured one after the other in one process. Format 1 is the "
            "benchmark's old model (2-layer decoder, FFN 1024, LM head over the whole vocabulary); format 2 is what "
            "the benchmark trains now (run_gcmr's defaults: 1-layer decoder, FFN 512, identifier head, 4 hard "
            "negatives scored with their own decoder states).",
            "", text, "", f"- Command: `{result['command']}` (revision {result['revision']})",
            f"- Machine: {result['machine']}"])
        write_section(DOC_PATH, "training_throughput", section, "# Benchmarks\n")
    return result


if __name__ == "__main__":
    main()
