"""Helpers of the search-page tests: a tiny saved checkpoint with its images, and `examples/app.py` as a server process.

The checkpoint follows tests/test_pipeline.py: a tiny T5, coarse_fine identifiers over the synthetic corpus, untrained
(trie-constrained decoding still returns only real keys), plus a tiny CLIP vision tower so image-to-image works.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
from transformers import CLIPVisionConfig

from modeling_gcmr import GcmrConfig, GcmrForRetrieval
from modeling_gcmr.publishing.checkpoint import save_retriever
from modeling_gcmr.training.synthetic import FEATURE_DIM, make_synthetic_corpus, write_imagefolder
from tokenization_gcmr import ImageIdTokenizer, build_identifiers

APP = Path(__file__).resolve().parent.parent / "examples" / "app.py"
NUM_IMAGES = 12
# Images deleted from the served folder, so the page's handling of a folder that lacks some images is exercised.
MISSING_KEYS = ("syn_00004", "syn_00009")


def tiny_retriever(text_tokenizer, corpus, vision: bool = True, seed: int = 0):
    """An untrained tiny model (with a CLIP vision tower when `vision`) and its tokenizer over `corpus`."""
    torch.manual_seed(seed)
    table = build_identifiers(corpus["image_key"], "coarse_fine", embeddings=corpus["image_embeds"], seed=0)
    tokenizer = ImageIdTokenizer(text_tokenizer, table)
    text_config = dict(model_type="t5", vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_heads=2,
                       num_layers=1, num_decoder_layers=1, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    vision_config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=16) if vision else None
    config = GcmrConfig(text_config=text_config, vision_config=vision_config, image_embed_dim=FEATURE_DIM,
                        num_visual_tokens=2, num_beams=4)
    model = GcmrForRetrieval(config)
    model.set_identifier_vocabulary(tokenizer)
    return model.eval(), tokenizer


def saved_collection(folder: Path, text_tokenizer) -> tuple[Path, Path]:
    """Save a tiny vision checkpoint to `folder/retriever` and its images, less MISSING_KEYS, to `folder/images`."""
    corpus = make_synthetic_corpus(NUM_IMAGES, captions_per_image=2, seed=3)
    model, tokenizer = tiny_retriever(text_tokenizer, corpus)
    checkpoint = save_retriever(model, tokenizer, folder / "retriever")
    images = write_imagefolder(corpus, folder / "images")
    for key in MISSING_KEYS:
        (images / f"{key}.png").unlink()
    return checkpoint, images


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class AppServer:
    """An app file in a subprocess on 127.0.0.1 (a free port); `stop()` ends it and returns what it printed.

    `args` are its command-line arguments besides `--port`, e.g. `["--retriever", DIR, "--images", DIR]`; none for
    the Space layout, where the app serves the `retriever/` and `images/` folders next to itself.
    """

    def __init__(self, app_file: Path, args: list[str], log: Path, timeout: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = log
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("SPACE_ID", None)
        with open(log, "wb") as handle:
            self.process = subprocess.Popen(
                [sys.executable, str(app_file), *args, "--port", str(self.port)],
                stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=log.parent,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the app exited with {self.process.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the app did not answer on {self.url} within {timeout:.0f} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.output()
