"""Training runs under `torchrun --nproc_per_node 2` on CPU (gloo): the Trainer's own DDP, nothing home-made."""
from __future__ import annotations

import json
import sys

from test_run_gcmr import TINY_MODEL, run_script


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
        launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
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
