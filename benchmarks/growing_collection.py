#!/usr/bin/env python
"""Collections that grow (issue 10): add images to a trained retriever without retraining, and at scale.

Real captions (the protocol of `real_captions.py`, whose helpers this reuses): a retriever is trained by
`examples/run_gcmr.py` on 80% of the images; the other 20% are added in rounds of 4% with `model.add_images`,
(a) with no training at all and (b) each round followed by `refresh_after_add` (the new images plus replay of old
ones, one short Trainer run). Both are compared, in the same run, with a retriever retrained from scratch on all
images and with dense MiniLM search over all images: R@1 on the test queries of old and of new images.

Synthetic scale: a coarse_fine table of 1M random identifiers (random codes over 256 coarse x 3 levels of 256
fine codes, random centroids), a tiny model on it, then 100,000 images added in one call (placement="centroids"),
1,000 more with the default placement="model" (one beam search per image), and removals timed.

    python benchmarks/growing_collection.py                       # f30k-test, coarse_fine, then the scale part
    python benchmarks/growing_collection.py --max_images 200 --scale_identifiers 20000 --scale_add 2000  # smoke

Writes `docs/growing_collection.md` (tables, commands) and `docs/growing_collection.png`; results JSON under
`benchmarks/results/growing_collection/`. Not in `make test`.
"""
from __future__ import annotations

import os

# Spinning OpenMP threads waste the cores this machine shares; set before torch/faiss load their runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, BertModel, HfArgumentParser  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "examples")]
import run_gcmr  # noqa: E402
from real_captions import (  # noqa: E402
    DEFAULT_DATA_DIR,
    DEFAULT_ID_OPTIONS,
    FEATURE_CAPTIONS,
    QUERY_CAPTIONS,
    embed_sentences,
    image_features,
    minilm_folder,
    read_captions,
    timed,
    write_jsonl,
)
from report import REPO, git_revision, machine, markdown_table, write_section  # noqa: E402

from modeling_gcmr import GcmrConfig, GcmrForRetrieval  # noqa: E402
from modeling_gcmr.dense.dual_encoder import DenseIndex  # noqa: E402
from modeling_gcmr.evaluation.metrics import save_results  # noqa: E402
from modeling_gcmr.training.arguments import GcmrTrainingArguments  # noqa: E402
from modeling_gcmr.training.refresh import refresh_after_add  # noqa: E402
from tokenization_gcmr import IdentifierTable, ImageIdTokenizer, train_text_tokenizer  # noqa: E402

DOC_PATH = REPO / "docs" / "growing_collection.md"
PLOT_PATH = REPO / "docs" / "growing_collection.png"


@dataclass
class GrowingArguments:
    """The growing-collection benchmark (run_gcmr takes everything after `--`)."""

    dataset: str = field(default="f30k-test", metadata={"help": "Caption file `<dataset>.txt` in --data_dir."})
    data_dir: str = field(default=os.environ.get("GCMR_CAPTIONS_DIR", str(DEFAULT_DATA_DIR)))
    id_type: str = field(default="coarse_fine", metadata={"help": "Identifier type of the retrievers."})
    max_images: int | None = field(default=None, metadata={"help": "Only the first N images (smoke runs)."})
    new_fraction: float = field(default=0.2, metadata={"help": "Share of the images added after training."})
    rounds: int = field(default=5, metadata={"help": "Add rounds (each adds new_fraction / rounds of the images)."})
    curve_old_queries: int = field(default=600, metadata={"help": "Old-image queries decoded after every round."})
    num_beams: int = field(default=10)
    batch_size: int = field(default=64)
    refresh_epochs: float = field(default=1.0, metadata={"help": "Epochs of each round's refresh."})
    refresh_learning_rate: list[float] = field(default_factory=lambda: [1e-3], metadata={
        "help": "Learning rate of each round's refresh; several values (`--refresh_learning_rate 1e-5 3e-5 1e-4`) "
                "refresh one copy of the base model each, sharing the base and full trainings (a sweep: tune it "
                "on f30k-dev / coco-dev only). 1e-3 with scope 'new' was chosen on f30k-dev (docs)."})
    refresh_batch_size: int = field(default=32)
    refresh_scope: str = field(default="new", metadata={"help": "refresh_after_add scope: 'all' (the whole model) "
                                                                 "or 'new' (only the new identifiers' own edges)."})
    replay_ratio: float = field(default=1.0, metadata={"help": "Old images replayed per new image in a refresh."})
    placement: str = field(default="model", metadata={"help": "add_images placement of new coarse_fine ids."})
    scale_identifiers: int = field(default=1_000_000, metadata={"help": "Synthetic table size (0: skip)."})
    scale_add: int = field(default=100_000, metadata={"help": "Images added to the synthetic table in one call."})
    scale_dim: int = field(default=32, metadata={"help": "Feature width of the synthetic table."})
    skip_real: bool = field(default=False, metadata={"help": "Only the synthetic scale part."})
    output_dir: str = field(default=str(REPO / "benchmarks" / "results" / "growing_collection"))
    write_doc: bool = field(default=True)


# ------------------------------------------------------------------------------------------------ real captions
def _train(corpus: Path, work: Path, args: GrowingArguments, run_args: list[str]) -> tuple[Path, float]:
    """Train a retriever with run_gcmr exactly as a user would; returns its folder and the training seconds."""
    options = json.dumps(DEFAULT_ID_OPTIONS.get(args.id_type, {}))
    command = ["--corpus", str(corpus), "--image_encoder", "precomputed", "--text_backbone", minilm_folder(),
               "--id_type", args.id_type, "--id_options", options, "--num_query_captions", "0", "--do_train",
               "--output_dir", str(work), "--num_beams", str(args.num_beams), "--seed", "0",
               "--disable_tqdm", "true", *run_args]
    metrics = run_gcmr.main(command)
    return work / "retriever", float(metrics["train_runtime"])


def _load(folder: Path) -> tuple[GcmrForRetrieval, ImageIdTokenizer]:
    return GcmrForRetrieval.from_pretrained(folder).eval(), ImageIdTokenizer.from_pretrained(folder)


def _recall_at_1(hits: list[list], gold: list[str]) -> float:
    return float(np.mean([bool(row) and row[0][0] == key for row, key in zip(hits, gold)])) if gold else float("nan")


def _evaluate(search, queries: dict[str, tuple[list[str], list[str]]]) -> dict[str, float]:
    """R@1 (in %) of `search(texts)` on each named query set."""
    return {name: 100 * _recall_at_1(search(texts), gold) for name, (texts, gold) in queries.items()}


def _corpus(keys, captions, features) -> datasets.Dataset:
    return datasets.Dataset.from_dict({
        "image_key": list(keys), "captions": [[caps[j] for j in FEATURE_CAPTIONS] for caps in captions],
        "image_embeds": [row.tolist() for row in features]})


def real_captions(args: GrowingArguments, run_args: list[str], out_dir: Path) -> dict:
    source = Path(args.data_dir) / f"{args.dataset}.txt"
    captions = read_captions(source)[: args.max_images]
    keys = [f"img_{i:05d}" for i in range(len(captions))]
    features = image_features(captions, minilm_folder(), Path(args.output_dir).parent / "cache", source)
    order = np.random.default_rng(0).permutation(len(keys))
    num_new = int(round(args.new_fraction * len(keys)))
    old_rows, new_rows = np.sort(order[num_new:]), order[:num_new]
    rounds = np.array_split(new_rows, args.rounds)

    def queries_of(rows) -> tuple[list[str], list[str]]:
        pairs = [(captions[r][j], keys[r]) for r in rows for j in QUERY_CAPTIONS]
        return [q for q, _ in pairs], [k for _, k in pairs]

    final_sets = {"old": queries_of(old_rows), "new": queries_of(new_rows)}
    curve_old = queries_of(old_rows[:: max(1, len(old_rows) // max(1, args.curve_old_queries // 3))])

    # dense search over every image, in the same run
    folder = minilm_folder()
    encoder, text_tokenizer = BertModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    index = DenseIndex(keys, features)

    def dense_over(over: DenseIndex):
        return lambda texts: over.search(embed_sentences(encoder, text_tokenizer, texts, args.batch_size, "dense"),
                                         top_k=1)

    results: dict = {"dense (all images)": _evaluate(dense_over(index), final_sets)}
    # Old queries facing 25% more candidates lose points in any retriever: dense over the first 80% shows how many.
    results["dense on 80% (before adding)"] = _evaluate(
        dense_over(DenseIndex([keys[r] for r in old_rows], features[old_rows])), {"old": final_sets["old"]})

    base_corpus = write_jsonl(out_dir / "corpus_old.jsonl", [
        {"image_key": keys[r], "captions": [captions[r][j] for j in FEATURE_CAPTIONS],
         "image_embeds": features[r].tolist()} for r in old_rows])
    full_corpus = write_jsonl(out_dir / "corpus_all.jsonl", [
        {"image_key": keys[r], "captions": [captions[r][j] for j in FEATURE_CAPTIONS],
         "image_embeds": features[r].tolist()} for r in range(len(keys))])
    base_folder, base_seconds = _train(base_corpus, out_dir / "base", args, run_args)
    full_folder, full_seconds = _train(full_corpus, out_dir / "full", args, run_args)

    def generative(model, tokenizer):
        return lambda texts: model.retrieve(texts, tokenizer, top_k=1, num_beams=args.num_beams,
                                            batch_size=args.batch_size)

    model, tokenizer = _load(full_folder)
    results["full retrain (all images)"] = _evaluate(generative(model, tokenizer), final_sets)
    model, tokenizer = _load(base_folder)
    results["trained on 80% (before adding)"] = _evaluate(generative(model, tokenizer), {"old": final_sets["old"]})

    # One refresh mode per learning rate; a single rate keeps the plain name the report reads.
    rates = {("refresh" if len(args.refresh_learning_rate) == 1 else f"refresh lr={rate:g}"): rate
             for rate in args.refresh_learning_rate}
    curve: dict[str, list] = {"no training": [], **{mode: [] for mode in rates}}
    timing = {"add_seconds": 0.0, "added": 0, **{f"{mode} seconds": 0.0 for mode in rates}}
    for mode in curve:
        refresh_args = GcmrTrainingArguments(
            output_dir=str(out_dir / "refresh"), num_train_epochs=args.refresh_epochs,
            learning_rate=rates.get(mode, 0.0), save_strategy="no", disable_tqdm=True, seed=0, warmup_steps=0,
            per_device_train_batch_size=args.refresh_batch_size, logging_steps=1000, dataloader_pin_memory=False)
        model, tokenizer = _load(base_folder)
        added: list[int] = []
        replay_rows = old_rows
        for number, rows in enumerate(rounds, start=1):
            new_keys = [keys[r] for r in rows]
            _, seconds = timed(model.add_images, new_keys, tokenizer, image_embeds=features[rows],
                               placement=args.placement)
            added.extend(rows.tolist())
            if mode == "no training":
                timing["add_seconds"] += seconds
                timing["added"] += len(rows)
            else:
                # Replay draws from every image added before this round too, not only the first 80%.
                pool = _corpus([keys[r] for r in replay_rows], [captions[r] for r in replay_rows],
                               features[replay_rows])
                _, seconds = timed(refresh_after_add, model, tokenizer,
                                   _corpus(new_keys, [captions[r] for r in rows], features[rows]),
                                   pool, refresh_args, replay_ratio=args.replay_ratio, scope=args.refresh_scope)
                timing[f"{mode} seconds"] += seconds
                replay_rows = np.concatenate([replay_rows, rows])
                model.eval()
            sets = {"old": curve_old, "new": queries_of(added)} if number < len(rounds) else final_sets
            point = _evaluate(generative(model, tokenizer), sets)
            curve[mode].append({"round": number, "images_added": len(added), **point})
            print(f"{mode} round {number}: {point}", flush=True)
        results[f"added, {mode}"] = curve[mode][-1]
    return {
        "num_images": len(keys), "num_old": len(old_rows), "num_new": num_new,
        "num_queries": {name: len(texts) for name, (texts, _) in final_sets.items()},
        "systems": results, "curve": curve,
        "seconds": {"base training": base_seconds, "full retrain": full_seconds, **timing},
        "ms_per_added_image": 1000 * timing["add_seconds"] / max(1, timing["added"]),
        "refresh_share_of_base_training": {mode: timing[f"{mode} seconds"] / base_seconds for mode in rates},
    }


def plot(curve: dict, reference: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for (mode, points), color in zip(curve.items(), ("tab:orange", "tab:blue", "tab:green", "tab:red", "tab:purple")):
        added = [p["images_added"] for p in points]
        axis.plot(added, [p["old"] for p in points], "o-", color=color, label=f"old images, {mode}")
        axis.plot(added, [p["new"] for p in points], "s--", color=color, label=f"new images, {mode}")
    for name, style in (("full retrain (all images)", ":"), ("dense (all images)", "-.")):
        for part, color in (("old", "grey"), ("new", "black")):
            axis.axhline(reference[name][part], linestyle=style, color=color, linewidth=0.8,
                         label=f"{name.split(' (')[0]}, {part}")
    axis.set_xlabel("images added (rounds of 4% of the collection)")
    axis.set_ylabel("R@1 (%)")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    figure.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    os.chmod(path, 0o644)


# ------------------------------------------------------------------------------------------------ synthetic scale
def synthetic_table(count: int, dim: int, seed: int = 0, coarse: int = 256, levels: int = 3,
                    codebook: int = 256) -> IdentifierTable:
    """A coarse_fine table of `count` unique random identifiers, with random centroids and codebooks."""
    rng = np.random.default_rng(seed)
    codes = np.unique(np.stack([rng.integers(0, coarse, int(count * 1.01))]
                               + [rng.integers(0, codebook, int(count * 1.01)) for _ in range(levels)], 1), axis=0)
    codes = codes[rng.permutation(len(codes))[:count]]
    offsets = np.cumsum([0, coarse] + [codebook] * (levels - 1))
    units = [f"<c_{k}>" for k in range(coarse)] + [f"<f{level}_{k}>" for level in range(1, levels + 1)
                                                   for k in range(codebook)]
    vectors = rng.normal(size=(len(units), dim)).astype(np.float32)
    vectors[:coarse] /= np.linalg.norm(vectors[:coarse], axis=1, keepdims=True)
    vectors[coarse:] *= 0.3 / np.sqrt(dim)
    return IdentifierTable(keys=[f"s{i}" for i in range(count)], codes=(codes + offsets).astype(np.int32),
                           units=units, unit_is_text=np.zeros(len(units), bool), id_type="coarse_fine",
                           options={"fine_quantizer": "residual_kmeans", "num_levels": levels},
                           unit_vectors=vectors)


def _normalized(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def synthetic_scale(args: GrowingArguments) -> dict:
    torch.manual_seed(0)
    (table, build_seconds) = timed(synthetic_table, args.scale_identifiers, args.scale_dim)
    text = train_text_tokenizer(["a photo of a dog", "a red car on a street"], vocab_size=60)
    tokenizer = ImageIdTokenizer(text, table)
    model = GcmrForRetrieval(GcmrConfig(text_config=dict(model_type="t5", vocab_size=tokenizer.num_text_tokens,
                                                         d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=1),
                                        image_embed_dim=args.scale_dim)).eval()
    # Every image's feature is its codes' vectors summed (L2-normalised): the model starts dense-aware on them.
    old_features = _normalized(table.unit_vectors[table.codes].sum(axis=1))
    _, setup_seconds = timed(model.set_identifier_vocabulary, tokenizer, init="dense", image_embeds=old_features)
    del old_features
    rng = np.random.default_rng(1)
    # New images like the old ones: random codes of the same centroids and codebooks, plus a little noise.
    codes = np.stack([rng.integers(0, 256, args.scale_add) + offset for offset in (0, 256, 512, 768)], axis=1)
    features = _normalized(table.unit_vectors[codes].sum(axis=1)
                           + 0.02 * rng.normal(size=(args.scale_add, args.scale_dim)).astype(np.float32))
    new_keys = [f"new{i}" for i in range(args.scale_add)]
    _, add_seconds = timed(model.add_images, new_keys, tokenizer, image_embeds=features, placement="centroids")
    def own_feature_r1(queries: np.ndarray, keys: list[str]) -> float:
        found = model.retrieve(tokenizer=tokenizer, image_embeds=queries, top_k=1, num_beams=10, show_progress=False)
        return float(np.mean([bool(row) and row[0][0] == key for row, key in zip(found, keys)]))

    self_r1 = own_feature_r1(features[:200], new_keys[:200])
    old_r1 = own_feature_r1(_normalized(table.unit_vectors[table.codes[:200]].sum(axis=1)), list(table.keys[:200]))
    single = []
    for key in new_keys[:20]:
        single.append(timed(model.remove_images, [key], tokenizer)[1])
    _, batch_seconds = timed(model.remove_images, new_keys[20:1020], tokenizer)
    _, one_more = timed(model.add_images, ["one-more"], tokenizer, image_embeds=features[:1], placement="centroids")
    routed = _normalized(features[:1000] + 0.05 * rng.normal(size=(1000, args.scale_dim)).astype(np.float32))
    _, routed_seconds = timed(model.add_images, [f"routed{i}" for i in range(1000)], tokenizer, image_embeds=routed)
    return {
        "identifiers": args.scale_identifiers, "added": args.scale_add, "dim": args.scale_dim,
        "trie_edges": tokenizer.prefix_trie.num_edges, "table_build_seconds": build_seconds,
        "set_vocabulary_seconds": setup_seconds, "add_seconds": add_seconds,
        "add_ms_per_image": 1000 * add_seconds / args.scale_add, "added_found_by_own_feature_r1": self_r1,
        "old_found_by_own_feature_r1": old_r1,
        "remove_one_ms_median": 1000 * float(np.median(single[1:])), "remove_first_ms": 1000 * single[0],
        "remove_1000_ms_per_image": batch_seconds,
        "add_one_image_seconds": one_more, "add_1000_model_placement_ms_per_image": routed_seconds,
    }


# ------------------------------------------------------------------------------------------------ report
def summary(results: dict) -> str:
    parts = []
    real = results.get("real")
    if real:
        systems = real["systems"]
        full = systems["full retrain (all images)"]
        rows = []
        for name, point in systems.items():
            old, new = point.get("old", float("nan")), point.get("new", float("nan"))
            rows.append([name, f"{old:.1f}", f"{new:.1f}" if new == new else "-",
                         f"{old - full['old']:+.1f}", f"{new / full['new']:.2f}" if new == new else "-"])
        parts.append(markdown_table(["system", "R@1 old images", "R@1 new images", "old vs full retrain",
                                     "new / full retrain"], rows))
        base_old = systems["trained on 80% (before adding)"]["old"]
        dense_lost = systems["dense on 80% (before adding)"]["old"] - systems["dense (all images)"]["old"]
        seconds = real["seconds"]
        lost = ", ".join(f"{mode} {base_old - systems[f'added, {mode}']['old']:+.1f}" for mode in real["curve"])
        refreshes = "; ".join(f"{mode} {seconds[f'{mode} seconds']:.0f} s in all = {100 * share:.1f}%"
                              for mode, share in real["refresh_share_of_base_training"].items())
        parts.append(
            f"\nOld images lose (against the model before adding, points; positive = lost): {lost}; dense search "
            f"loses {dense_lost:+.1f} from the added candidates alone.\n"
            f"Time: {real['ms_per_added_image']:.2f} ms per added image (no training); {refreshes} of the base "
            f"training ({seconds['base training']:.0f} s); full retrain {seconds['full retrain']:.0f} s.")
        curve_rows = [[mode, str(p["round"]), str(p["images_added"]), f"{p['old']:.1f}", f"{p['new']:.1f}"]
                      for mode, points in real["curve"].items() for p in points]
        parts.append("\n" + markdown_table(["mode", "round", "images added", "R@1 old", "R@1 new"], curve_rows))
    scale = results.get("scale")
    if scale:
        parts.append("\n" + markdown_table(["synthetic coarse_fine", "value"], [
            ["identifiers before / added", f"{scale['identifiers']:,} / {scale['added']:,}"],
            ["trie edges after", f"{scale['trie_edges']:,}"],
            ["add (one call)", f"{scale['add_seconds']:.1f} s = {scale['add_ms_per_image']:.3f} ms per image"],
            ["add one image (one call)", f"{1000 * scale['add_one_image_seconds']:.0f} ms"],
            ["add 1,000 images with placement='model' (one call, a beam search each)",
             f"{scale['add_1000_model_placement_ms_per_image']:.2f} ms per image"],
            ["remove one image (median of calls 2-20)", f"{scale['remove_one_ms_median']:.2f} ms"],
            ["first removal (counts the live identifiers under every edge once)", f"{scale['remove_first_ms']:.0f} ms"],
            ["remove 1,000 images (one call)", f"{scale['remove_1000_ms_per_image']:.3f} ms per image"],
            ["found by their own feature, R@1 (200 each): added / old images",
             f"{100 * scale['added_found_by_own_feature_r1']:.1f} / {100 * scale['old_found_by_own_feature_r1']:.1f}"],
        ]))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> dict:
    args, run_args = HfArgumentParser(GrowingArguments).parse_args_into_dataclasses(argv, return_remaining_strings=True)
    run_args = [a for a in run_args if a != "--"]
    out_dir = Path(args.output_dir) / f"{args.dataset}-{args.id_type}"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"command": shlex.join(["python", "benchmarks/growing_collection.py",
                                      *(sys.argv[1:] if argv is None else argv)]),
               "revision": git_revision(), "machine": machine(), "setup": asdict(args)}
    if not args.skip_real:
        results["real"] = real_captions(args, run_args, out_dir)
        plot(results["real"]["curve"], results["real"]["systems"], out_dir / "curve.png")
    if args.scale_identifiers:
        results["scale"] = synthetic_scale(args)
    save_results(out_dir / "results.json", results)
    text = summary(results)
    print(text)
    if args.write_doc:
        if "real" in results:
            plot(results["real"]["curve"], results["real"]["systems"], PLOT_PATH)
        write_section(DOC_PATH, "growing_collection", "\n".join([
            f"## {args.dataset}, {args.id_type}", "", text, "",
            f"![R@1 of old and new images against add rounds]({PLOT_PATH.name})" if "real" in results else "",
            f"- Command: `{results['command']}` (revision {results['revision']})",
            f"- Machine: {results['machine']}"]), "# Growing collections\n")
    return results


if __name__ == "__main__":
    main()
