"""examples/run_gcmr.py end to end, as a real subprocess on a tiny on-disk imagefolder corpus."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from subprocess_utils import run_without_package

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "run_gcmr.py"

# A model small enough to train in seconds: tiny T5 + tiny CLIP vision tower on 32 px images.
TINY_MODEL = [
    "--d_model", "32", "--d_ff", "64", "--num_layers", "1", "--num_heads", "4", "--num_visual_tokens", "2",
    "--num_beams", "4", "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0",
]


def run_script(args: list[str], cwd: Path, launcher: list[str] | None = None, timeout: int = 300,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the example script (optionally under a launcher such as torchrun, with `env` added to the environment)
    and fail with its output if it fails."""
    command = [*(launcher or [sys.executable]), str(SCRIPT), *args]
    proc = subprocess.run(command, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory) -> Path:
    from modeling_gcmr.training.synthetic import (
        make_synthetic_corpus,
        write_imagefolder,
    )

    corpus = make_synthetic_corpus(12, image_size=32, captions_per_image=3, seed=1).remove_columns("attributes")
    return write_imagefolder(corpus, tmp_path_factory.mktemp("corpus") / "shapes")


def test_run_gcmr_trains_evaluates_and_saves_a_loadable_retriever(imagefolder, tmp_path):
    out = tmp_path / "out"
    run_script(
        [
            "--corpus", str(imagefolder), "--output_dir", str(out), "--do_train", "--do_eval",
            "--image_input", "pixels", "--image_size", "32", "--vision_hidden_size", "32", "--vision_layers", "1",
            "--id_type", "structured", "--id_options", '{"branching": 4, "leaf_size": 4}',
            "--max_steps", "6", "--per_device_train_batch_size", "12", "--learning_rate", "1e-2",
            "--eval_strategy", "steps", "--eval_steps", "6", "--save_steps", "6", "--logging_steps", "3",
            "--baseline", "--baseline_epochs", "1", *TINY_MODEL,
        ],
        cwd=tmp_path,
    )
    metrics = json.loads((out / "eval_results.json").read_text())
    for prefix in ("eval_", "eval_dense_"):
        assert 0.0 <= metrics[f"{prefix}recall@1"] <= metrics[f"{prefix}recall@5"] <= metrics[f"{prefix}recall@10"] <= 1.0
        assert metrics[f"{prefix}num_queries"] == 12  # one held-out caption per image
    lines = (out / "per_query_results.jsonl").read_text().splitlines()
    assert len(lines) == 12 and len((out / "per_query_results_dense.jsonl").read_text().splitlines()) == 12
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert any("eval_recall@1" in entry for entry in state["log_history"])  # the callback logged during training
    card = (out / "retriever" / "README.md").read_text()
    assert "model-index" in card and "dense-baseline" in card and "identifier-structured" in card

    keys = sorted(p.stem for p in imagefolder.glob("*.png"))
    loaded = run_without_package(
        f"""
        import json
        from transformers import AutoModel, AutoTokenizer
        model = AutoModel.from_pretrained({str(out / "retriever")!r}, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained({str(out / "retriever")!r}, trust_remote_code=True)
        hits = model.retrieve(["a red circle to the left of a blue square"], tokenizer, top_k=5, num_beams=5)
        print(json.dumps({{"hits": [key for key, _ in hits[0]], "class": type(model).__name__}}))
        """,
        cwd=str(tmp_path),
    )
    assert loaded["class"] == "GcmrForRetrieval"
    assert len(loaded["hits"]) == 5 and len(set(loaded["hits"])) == 5 and set(loaded["hits"]) <= set(keys)


def test_run_gcmr_rejects_bad_arguments(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import run_gcmr
    finally:
        sys.path.remove(str(SCRIPT.parent))
    common = ["--output_dir", str(tmp_path), "--do_train", "--synthetic_num_images", "4", *TINY_MODEL]
    with pytest.raises(ValueError, match="--id_options must be a JSON object"):
        run_gcmr.main([*common, "--id_options", "[1, 2]"])
    corpus = str(_captions_only_corpus(tmp_path))
    with pytest.raises(ValueError, match="--image_input embeds needs a corpus column 'image_embeds'.*--image_input pixels"):
        run_gcmr.main([*common, "--corpus", corpus, "--image_input", "embeds"])
    # An image folder without features: the default id type needs embeddings, and the error names the flags.
    with pytest.raises(ValueError, match="no image_embeds column: add --image_encoder dual_encoder"):
        run_gcmr.main([*common, "--corpus", corpus])


def _captions_only_corpus(tmp_path: Path) -> Path:
    """A JSONL corpus with images but no precomputed features."""
    from PIL import Image

    rows = []
    for index in range(3):
        Image.new("RGB", (16, 16), (80 * index, 0, 0)).save(tmp_path / f"img{index}.png")
        rows.append({"image": f"img{index}.png", "captions": [f"image number {index}"]})
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_run_gcmr_picks_an_embedding_init_every_id_type_supports(tmp_path):
    """Atomic ids carry no centroid vectors: the default `--identifier_init auto` falls back to random rows."""
    out = tmp_path / "out"
    run_script(
        [
            "--output_dir", str(out), "--do_train", "--synthetic_num_images", "10", "--image_input", "embeds",
            "--id_type", "atomic", "--max_steps", "2", "--per_device_train_batch_size", "8", "--save_strategy", "no",
            *TINY_MODEL,
        ],
        cwd=tmp_path,
    )
    assert (out / "retriever" / "model.safetensors").is_file()


def _run_gcmr_module():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import run_gcmr
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return run_gcmr


def test_memorize_ratio_zero_trains_on_captions_alone(tmp_path):
    # Issue 8: crashed with "Failed to concatenate on axis=1" after the baseline had trained.
    results = _run_gcmr_module().main([
        "--output_dir", str(tmp_path / "out"), "--do_train", "--synthetic_num_images", "6", "--memorize_ratio", "0",
        "--id_type", "atomic", "--max_steps", "2", "--per_device_train_batch_size", "4", "--save_strategy", "no",
        *TINY_MODEL])
    assert results["epoch"] > 0
    assert (tmp_path / "out" / "retriever" / "model.safetensors").is_file()


def test_do_eval_without_held_out_queries_says_so_and_metrics_are_printed(tmp_path, capsys, caplog):
    run_gcmr = _run_gcmr_module()
    common = ["--do_train", "--do_eval", "--id_type", "atomic", "--max_steps", "2", "--per_device_train_batch_size",
              "4", "--save_strategy", "no", *TINY_MODEL]
    with caplog.at_level("WARNING"):
        run_gcmr.main(["--output_dir", str(tmp_path / "one"), "--synthetic_num_images", "6",
                       "--synthetic_captions_per_image", "1", *common])
    assert any("there are no held-out queries" in record.getMessage() for record in caplog.records)
    results = run_gcmr.main(["--output_dir", str(tmp_path / "two"), "--synthetic_num_images", "6", *common])
    printed = capsys.readouterr().out
    assert f"eval_recall@1: {results['eval_recall@1']:.4f}" in printed
    assert f"retriever: {tmp_path / 'two' / 'retriever'}" in printed


def test_the_vision_tower_is_sized_for_the_corpus_images(imagefolder, tmp_path):
    # Issue 8: --image_size defaulted to 224 for a corpus of 32-pixel images.
    from modeling_gcmr import GcmrForRetrieval

    _run_gcmr_module().main([
        "--corpus", str(imagefolder), "--output_dir", str(tmp_path / "out"), "--do_train", "--image_input", "pixels",
        "--vision_hidden_size", "32", "--vision_layers", "1", "--id_type", "atomic", "--max_steps", "1",
        "--per_device_train_batch_size", "4", "--save_strategy", "no", *TINY_MODEL])
    model = GcmrForRetrieval.from_pretrained(tmp_path / "out" / "retriever")
    assert model.config.vision_config.image_size == 32


def test_a_one_image_corpus_trains_with_hard_negatives_off(tmp_path):
    """Issue 17: one image left hard_negative_loss no negative to score (a 0-row decoder pass: cannot reshape)."""
    results = _run_gcmr_module().main([
        "--output_dir", str(tmp_path / "out"), "--do_train", "--do_eval", "--synthetic_num_images", "1",
        "--id_type", "atomic", "--max_steps", "2", "--per_device_train_batch_size", "4", "--save_strategy", "no",
        *TINY_MODEL])
    assert results["epoch"] > 0 and results["eval_recall@1"] == 1.0
    assert (tmp_path / "out" / "retriever" / "model.safetensors").is_file()
