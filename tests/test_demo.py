"""`make demo` end to end: the demo script as a real subprocess, in its --quick size, and everything it writes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("demo") / "out"
    # One intra-op thread: on a shared 2-core machine, oversubscribed OpenMP threads slow training tenfold.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--output_dir", str(output_dir), "--quick"],
        capture_output=True, text=True, timeout=400, env=env,
    )
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return output_dir, proc.stdout, json.loads((output_dir / "demo_results.json").read_text())


def test_demo_trains_on_an_imagefolder_and_retrieves_through_the_pipeline(demo_run):
    output_dir, _, results = demo_run
    corpus_dir = output_dir / "corpus"
    assert (corpus_dir / "metadata.jsonl").is_file()
    keys = {path.stem for path in corpus_dir.glob("*.png")}
    assert len(keys) == results["num_images"] == 24
    # The reloaded checkpoint, searched through the pipeline, scores exactly what run_gcmr measured in process.
    pipeline_metrics, in_process = results["generative_via_pipeline"], results["run_gcmr"]
    for name in ("recall@1", "recall@5", "recall@10", "mrr@10"):
        assert pipeline_metrics[name] == pytest.approx(in_process[f"eval_{name}"], abs=1e-6)
    assert "eval_dense_recall@1" in in_process
    # 12 held-out paraphrases over 24 images: chance Recall@10 is 10/24; training must beat it.
    assert pipeline_metrics["recall@10"] > 10 / 24
    example = results["example"]
    assert [hit["rank"] for hit in example["hits"]] == list(range(1, len(example["hits"]) + 1))
    assert {hit["image_key"] for hit in example["hits"]} <= keys


def test_demo_saves_a_remote_code_checkpoint_with_its_model_card(demo_run):
    output_dir, _, results = demo_run
    checkpoint = Path(results["paths"]["checkpoint"])
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"]["AutoModel"].startswith("modeling_gcmr.")
    assert (checkpoint / "model.safetensors").is_file()
    assert "Recall@1" in (checkpoint / "README.md").read_text()


def test_demo_draws_its_figures_and_prints_a_summary(demo_run):
    output_dir, stdout, results = demo_run
    for name in ("retrieved_images", "recall_curve", "latency"):
        with Image.open(results["paths"][name]) as image:
            assert image.format == "PNG" and min(image.size) > 100
    for per_beam in results["latency_ms_per_query"].values():
        assert set(per_beam) == {"1", "2", "5", "10"} and all(ms > 0 for ms in per_beam.values())
    assert "Recall@1" in stdout and results["paths"]["recall_curve"] in stdout


def test_demo_writes_a_self_contained_gallery_and_prints_the_search_page_command(demo_run):
    output_dir, stdout, results = demo_run
    gallery = Path(results["paths"]["gallery"])
    assert gallery == output_dir / "gallery.html" and str(gallery) in stdout
    page = gallery.read_text(encoding="utf-8")
    # every thumbnail is inlined: no file or network reference could be missing when the page is opened elsewhere
    sources = [part.split('"', 1)[0] for part in page.split('src="')[1:]]
    assert sources and all(source.startswith("data:image/png;base64,") for source in sources)
    assert "generative (GCMR)" in page and "dense baseline" in page
    command = results["search_page_command"]
    assert command in stdout and "app.py" in command
    assert "--retriever" in command and "--images" in command and str(Path("corpus")) in command
