#!/usr/bin/env python
"""How well can the demo's text encoder tell "a red circle above a blue square" from "a red square above a blue circle"?

`memorization.py` found that the demo's retriever misses its training captions only on images whose partner scene
(the same two colours and shapes, bound the other way round) is also in the collection. This probe asks whether that
is the generative retriever's fault or its text encoder's: it trains the same encoder (a T5 encoder from scratch with
the demo's sizes, masked-mean pooling, the demo's optimizer, schedule, batch and epochs) as a plain classifier over the
same 300 images of the built-in shapes corpus, on the same training captions, and reports its accuracy on all of them
and on the captions of images that have such a partner. No identifiers, no decoder: an upper bound of what the
encoder learns to separate in the demo's budget, per attention-head count and dropout.

    python benchmarks/binding_probe.py                          # heads 4, 8, 16 x dropout 0.1, 0
    python benchmarks/binding_probe.py --settings 4:0.1,16:0
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import HfArgumentParser, T5Config, T5EncoderModel, get_cosine_schedule_with_warmup  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memorization import CORPORA, DOC_PATH, HEADER, demo  # noqa: E402
from report import git_revision, machine, markdown_table, write_section  # noqa: E402

from tokenization_gcmr.builders.text_vocabulary import train_text_tokenizer  # noqa: E402


@dataclass
class ProbeArguments:
    settings: str = field(default="4:0.1,4:0,8:0.1,8:0,16:0.1,16:0",
                          metadata={"help": "Comma-separated heads:dropout pairs (the demo: 16:0, before: 4:0.1)."})
    epochs: int = field(default=demo.SIZES["full"]["epochs"], metadata={"help": "Training epochs (the demo's)."})
    seed: int = field(default=0)
    write_doc: bool = field(default=True, metadata={"help": "Write the table into docs/memorization.md."})


def swapped_partners(attributes: list[dict]) -> set[int]:
    """Rows whose scene, with the two shapes exchanged between the two colours, is another row of the corpus."""
    scenes = {(a["colour_a"], a["shape_a"], a["colour_b"], a["shape_b"], a["layout"]) for a in attributes}
    return {row for row, a in enumerate(attributes)
            if (a["colour_a"], a["shape_b"], a["colour_b"], a["shape_a"], a["layout"]) in scenes}


def probe(captions: list[tuple[str, int]], num_images: int, heads: int, dropout: float, epochs: int,
          seed: int) -> tuple[np.ndarray, float]:
    """Train the encoder + a linear classifier; returns per-caption correctness and the training seconds."""
    torch.manual_seed(seed)
    tokenizer = train_text_tokenizer([text for text, _ in captions])
    # The sizes `examples/demo.py` gives run_gcmr.py (its d_ff is twice d_model).
    width, layers = demo.SIZES["full"]["d_model"], demo.SIZES["full"]["num_layers"]
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_ff=2 * width, d_kv=width // heads, num_layers=layers,
                      num_heads=heads, dropout_rate=dropout)
    encoder, classifier = T5EncoderModel(config), torch.nn.Linear(width, num_images)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *classifier.parameters()], lr=3e-3, weight_decay=0.0)
    batches = len(captions) // 32
    schedule = get_cosine_schedule_with_warmup(optimizer, int(0.05 * epochs * batches), epochs * batches)

    def logits(texts: list[str]) -> torch.Tensor:
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        states = encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        mask = batch.attention_mask.unsqueeze(-1).float()
        return classifier((states * mask).sum(1) / mask.sum(1))

    labels = torch.tensor([image for _, image in captions])
    order = np.random.default_rng(seed)
    started = time.perf_counter()
    encoder.train()
    for _ in range(epochs):
        for rows in np.array_split(order.permutation(len(captions)), batches):
            loss = torch.nn.functional.cross_entropy(logits([captions[r][0] for r in rows]), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    seconds = time.perf_counter() - started
    encoder.eval()
    with torch.no_grad():
        predicted = torch.cat([logits([text for text, _ in captions[i:i + 256]]).argmax(-1)
                               for i in range(0, len(captions), 256)])
    return (predicted == labels).numpy(), seconds


def main(argv: list[str] | None = None) -> list[dict]:
    (args,) = HfArgumentParser(ProbeArguments).parse_args_into_dataclasses(argv)
    # memorization.py's shapes corpus; the first 3 of its 4 captions per image are the training captions.
    maker, count, _ = CORPORA["shapes"]
    corpus = maker(count, captions_per_image=4, seed=0)
    captions = [(text, image) for image, texts in enumerate(corpus["captions"]) for text in texts[:3]]
    partners = swapped_partners(corpus["attributes"])
    partnered = np.array([image in partners for _, image in captions])
    results = []
    for setting in args.settings.split(","):
        heads, dropout = setting.split(":")
        correct, seconds = probe(captions, len(corpus), int(heads), float(dropout), args.epochs, args.seed)
        results.append({"heads": int(heads), "dropout": float(dropout), "seconds": seconds, "all": float(correct.mean()),
                        "partnered": float(correct[partnered].mean()), "others": float(correct[~partnered].mean())})
        print(results[-1], flush=True)
    table = markdown_table(
        ["heads", "dropout", "train s", f"accuracy, all {len(captions)} training captions",
         f"captions of the {len(partners)} images with a swapped partner", "other captions"],
        [[r["heads"], r["dropout"], f"{r['seconds']:.0f}",
          *(f"{100 * r[part]:.1f}" for part in ("all", "partnered", "others"))] for r in results])
    print(table)
    if args.write_doc:
        command = "python benchmarks/binding_probe.py" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
        write_section(DOC_PATH, "binding_probe", "\n".join([
            table, "", f"- Command: `{command}` (revision {git_revision()})", f"- Machine: {machine()}"]), HEADER)
    return results


if __name__ == "__main__":
    main()
