"""Training runs under `torchrun --nproc_per_node 2` on CPU (gloo): the Trainer's own DDP, nothing home-made; and two
processes with half the batch each train to the same result as one process with the whole batch."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch.distributed
from test_run_gcmr import TINY_MODEL, run_script

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="this torch build has no distributed gloo backend: torchrun cannot start CPU processes",
)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def test_run_gcmr_under_torchrun_two_processes(tmp_path):
    out = tmp_path / "out"
    proc = run_script(
        [
            "--output_dir", str(out), "--do_train", "--synthetic_num_images", "12", "--id_type", "atomic",
            "--identifier_init", "random", "--schedule", "sequential", "--lora_r", "4",
            "--max_steps", "4", "--per_device_train_batch_size", "6", "--learning_rate", "1e-2",
            "--eval_strategy", "steps", "--eval_steps", "4", "--save_steps", "4", "--logging_steps", "1",
            "--ddp_backend", "gloo", "--log_level", "info", *TINY_MODEL,
        ],
        cwd=tmp_path,
        launcher=TORCHRUN,
    )
    log = proc.stdout + proc.stderr
    for rank in (0, 1):
        assert f"process rank: {rank}, device: cpu:0, world size: 2, distributed training: True" in log
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    train_entries = [entry for entry in state["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in train_entries] == [1, 2, 3, 4]
    # both processes decoded a share of the 12 held-out queries; the gathered metrics count all of them
    evals = [entry for entry in state["log_history"] if "eval_recall@1" in entry]
    assert len(evals) == 1 and evals[0]["eval_num_queries"] == 12
    assert (out / "lora_adapter" / "adapter_model.safetensors").is_file()

    from modeling_gcmr import GcmrForRetrieval
    from tokenization_gcmr import ImageIdTokenizer

    for folder in (out / "checkpoint-4", out / "retriever"):
        tokenizer = ImageIdTokenizer.from_pretrained(str(folder))
        if folder.name == "retriever":
            model = GcmrForRetrieval.from_pretrained(str(folder))
            hits = model.retrieve(["a red circle to the left of a blue square"], tokenizer, top_k=3, num_beams=3)
            assert len(hits[0]) == 3 and {key for key, _ in hits[0]} <= set(tokenizer.identifier_table.keys)
        else:
            assert (folder / "model.safetensors").is_file() and (folder / "optimizer.pt").is_file()


def write_feature_corpus(path, num_images: int = 16, dim: int = 16) -> None:
    """The contract's corpus form: captions and precomputed image features per image (seeded, normalised)."""
    from modeling_gcmr.training.synthetic import make_synthetic_corpus

    corpus = make_synthetic_corpus(num_images, captions_per_image=3, seed=1)
    features = np.random.default_rng(0).normal(size=(num_images, dim))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row, vector in zip(corpus, features):
            record = {"image_key": row["image_key"], "captions": row["captions"], "image_embeds": vector.tolist()}
            handle.write(json.dumps(record) + "\n")


def test_two_processes_with_half_the_batch_train_like_one_process_with_all_of_it(tmp_path):
    """Same global batch (1 x 8 = 2 x 4), seed and data order (the Trainer's seedable sampler, shared by both
    processes, each taking every other batch of 4): the losses and the final recall agree. Dropout is off, the only
    randomness that differs (each process draws its own masks); coarse_fine identifiers of different lengths and
    the distillation term are on, the loss terms whose batch means once depended on how the batch was split."""
    corpus = tmp_path / "corpus.jsonl"
    write_feature_corpus(corpus)
    common = [
        "--corpus", str(corpus), "--image_encoder", "precomputed", "--num_query_captions", "2",
        "--id_type", "coarse_fine", "--id_options", '{"num_coarse": 2, "codebook_size": 2, "num_levels": 2}',
        "--do_train", "--do_eval", "--max_steps", "6", "--learning_rate", "3e-3", "--logging_steps", "1",
        "--save_strategy", "no", "--dropout_rate", "0", *TINY_MODEL,
    ]
    # one thread per process, as torchrun sets for each of its processes: two processes then share two cores
    run_script([*common, "--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "8"], cwd=tmp_path,
               env={"OMP_NUM_THREADS": "1"})
    proc = run_script([*common, "--output_dir", str(tmp_path / "two"), "--per_device_train_batch_size", "4",
                       "--ddp_backend", "gloo"], cwd=tmp_path, launcher=TORCHRUN)
    # each process draws its own training randomness (dropout masks, sampled candidates)
    for rank in (0, 1):
        assert f"process {rank} of 2: training randomness seeded with {rank}" in proc.stdout + proc.stderr

    def results(name: str) -> tuple[list[float], dict]:
        history = json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
        return [entry["loss"] for entry in history if "loss" in entry], json.loads(
            (tmp_path / name / "all_results.json").read_text())

    (one_losses, one), (two_losses, two) = results("one"), results("two")
    assert len(one_losses) == len(two_losses) == 6
    # 32 examples (16 memorize, 16 retrieve on the first caption): 6 steps of 8 cross an epoch and a reshuffle
    assert one["epoch"] == two["epoch"] == 1.5
    np.testing.assert_allclose(two_losses, one_losses, rtol=1e-4)
    for metric in ("eval_recall@1", "eval_recall@5", "eval_recall@10", "eval_mrr@10"):
        assert abs(two[metric] - one[metric]) < 1e-6, metric
    assert one["eval_num_queries"] == two["eval_num_queries"] == 32  # two held-out captions per image
