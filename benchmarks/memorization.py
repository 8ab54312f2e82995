#!/usr/bin/env python
"""Memorization: does a retriever trained in the demo's budget answer its own training captions?

GRACE's first step is *learning to memorize*: a generative retriever should find the image of every caption it
was trained on. Two corpora, both trained by `examples/run_gcmr.py` with the settings `make demo` uses (a small T5
from scratch, 60 epochs, learning rate 3e-3):

- `shapes`: the built-in synthetic corpus (300 images, 3 captions each), images as precomputed features;
- `glyphs`: a coloured letter or digit per image (200 images, 3 captions each), images as *pixels* through a tiny
  CLIP-style vision tower, GRACE's structured identifiers built from colour features only (which character an
  image shows is only in its pixels and captions).

Reported: R@1 on the training captions (the target: at least 0.95), R@1 of each image's own pixels or features
(memorize rows), and R@1 on a caption phrasing never trained on (generalization), with the curve of training-
caption R@1 against training minutes.

    python benchmarks/memorization.py                  # both corpora
    python benchmarks/memorization.py --corpora glyphs
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "examples")]
import demo  # noqa: E402
import run_gcmr  # noqa: E402
from report import REPO, git_revision, machine, markdown_table, write_section  # noqa: E402

from modeling_gcmr import GcmrForRetrieval  # noqa: E402
from modeling_gcmr.evaluation.metrics import retrieval_metrics, save_results  # noqa: E402
from modeling_gcmr.evaluation.plotting import plot_training_curves  # noqa: E402
from modeling_gcmr.training.collator import build_image_processor  # noqa: E402
from modeling_gcmr.training.glyphs import make_glyph_corpus  # noqa: E402
from modeling_gcmr.training.synthetic import make_synthetic_corpus, write_imagefolder  # noqa: E402
from tokenization_gcmr import ImageIdTokenizer  # noqa: E402

DOC_PATH = REPO / "docs" / "memorization.md"
# What `make demo` trains with, so "in the demo's budget" means exactly this.
DEMO_TRAINING = [*demo.training_options(demo.SIZES["full"], seed=0), "--disable_tqdm", "true"]
CORPORA = {
    # name: (corpus maker, images, run_gcmr arguments)
    "shapes": (make_synthetic_corpus, 300, ["--id_type", "coarse_fine", "--image_input", "embeds"]),
    "glyphs": (make_glyph_corpus, 200, ["--id_type", "structured", "--id_options", '{"branching": 10, "leaf_size": 10}',
                                        "--image_input", "pixels", "--image_encoder", "precomputed"]),
}


@dataclass
class MemorizationArguments:
    corpora: str = field(default="shapes,glyphs", metadata={"help": "Comma-separated corpora: shapes, glyphs."})
    output_dir: str = field(default=str(REPO / "benchmarks" / "results" / "memorization"),
                            metadata={"help": "Where runs, results and plots go."})
    write_doc: bool = field(default=True, metadata={"help": "Write the results into docs/memorization.md."})


def run(name: str, out: Path) -> dict:
    maker, count, options = CORPORA[name]
    corpus = maker(count, captions_per_image=4, seed=0)
    train = corpus.map(lambda row: {"captions": row["captions"][:3]}).remove_columns("attributes")
    folder = write_imagefolder(train, out / "corpus")
    captions = [(caption, key) for key, caps in zip(train["image_key"], train["captions"]) for caption in caps]
    curve_file = out / "training_captions.jsonl"
    step = max(1, len(captions) // 300)  # the curve decodes a fixed share of them after each evaluation
    curve_file.write_text("".join(json.dumps({"query": q, "image_key": k}) + "\n" for q, k in captions[::step]))
    command = ["--corpus", str(folder), "--output_dir", str(out / "run"), "--do_train", "--num_query_captions", "0",
               "--eval_query_file", str(curve_file), "--eval_strategy", "steps", "--eval_steps", "0.1",
               "--save_strategy", "no", *options, *DEMO_TRAINING]
    training = run_gcmr.main(command)
    state = json.loads((out / "run" / "trainer_state.json").read_text())
    model = GcmrForRetrieval.from_pretrained(out / "run" / "retriever").eval()
    tokenizer = ImageIdTokenizer.from_pretrained(out / "run" / "retriever")
    keys = list(corpus["image_key"])
    trained = model.retrieve([q for q, _ in captions], tokenizer, top_k=10)
    unseen = model.retrieve([caps[3] for caps in corpus["captions"]], tokenizer, top_k=10)
    if model.config.vision_config is not None:
        processor = build_image_processor(model.config.vision_config)
        pixels = processor([image.convert("RGB") for image in corpus["image"]], return_tensors="pt")["pixel_values"]
        own = model.retrieve(tokenizer=tokenizer, pixel_values=pixels, top_k=10)
    else:
        own = model.retrieve(tokenizer=tokenizer, image_embeds=torch.tensor(corpus["image_embeds"]), top_k=10)

    def score(hits, gold):
        return retrieval_metrics([[key for key, _ in row] for row in hits], gold)

    return {
        "corpus": name,
        "images": count,
        "run_gcmr_command": shlex.join(["python", "examples/run_gcmr.py", *command]),
        "train_minutes": training.get("train_minutes"),
        "training_captions": score(trained, [key for _, key in captions]),
        "own_image": score(own, keys),
        "unseen_phrasing": score(unseen, keys),
        "curve": [{"train_minutes": e["train_minutes"], "recall@1": e["eval_recall@1"]}
                  for e in state["log_history"] if "eval_recall@1" in e],
    }


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(MemorizationArguments).parse_args_into_dataclasses(argv)
    out = Path(args.output_dir)
    runs = [run(name, out / name) for name in args.corpora.split(",")]
    results = {"runs": runs, "machine": machine(), "revision": git_revision(),
               "command": shlex.join(["python", "benchmarks/memorization.py", *(sys.argv[1:] if argv is None else argv)])}
    save_results(out / "results.json", results)
    plot = plot_training_curves({r["corpus"]: r["curve"] for r in runs}, out / "memorization.png")
    rows = [[r["corpus"], r["images"], f"{r['train_minutes']:.1f}",
             *(f"{100 * r[part]['recall@1']:.1f}" for part in ("training_captions", "own_image", "unseen_phrasing"))]
            for r in runs]
    table = markdown_table(["corpus", "images", "train min", "R@1 training captions", "R@1 own image",
                            "R@1 unseen phrasing"], rows)
    print(table)
    if args.write_doc:
        figure = DOC_PATH.parent / "memorization.png"
        figure.write_bytes(Path(plot).read_bytes())
        os.chmod(figure, 0o644)
        section = "\n".join([table, "", "![training-caption R@1 against training minutes](memorization.png)", "",
                             f"- Command: `{results['command']}` (revision {results['revision']})",
                             *(f"- {r['corpus']}: `{r['run_gcmr_command'].replace(str(REPO) + '/', '')}`" for r in runs),
                             f"- Machine: {results['machine']}"])
        write_section(DOC_PATH, "memorization", section, HEADER)
    return results


HEADER = """# Memorization

Written by `benchmarks/memorization.py`. GRACE's *learning to memorize*: after training in the demo's budget
(`make demo`'s settings: a small T5 from scratch, 60 epochs), does the retriever find the image of every caption
it was trained on? Target: R@1 on the training captions of at least 0.95. "Own image" searches with each
image's own features or pixels; "unseen phrasing" with a fourth caption per image that training never saw.
"""


if __name__ == "__main__":
    main()
