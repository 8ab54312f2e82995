"""The fine-tuned dense peer of the real-caption benchmark: MiniLM's query encoder fine-tuned on the training captions.

The generative model learns from the training captions (captions 0 and 1 of each image) and the image features;
a dense retriever given the same data is the fair peer for "beats dense". Here the whole MiniLM query encoder is
fine-tuned contrastively: each training caption against *all* image features of the corpus (a full softmax over
the fixed features, as the image side is not trained), temperature `1 / scale`. Search is then the same exact
inner product over the same features as the zero-shot baseline.
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import BertModel


def finetune_query_encoder(encoder: BertModel, tokenizer, texts: list[str], gold_rows: list[int],
                           features: np.ndarray, epochs: float = 1.0, learning_rate: float = 2e-5,
                           batch_size: int = 64, scale: float = 20.0, seed: int = 0) -> tuple[BertModel, dict]:
    """A copy of `encoder` fine-tuned so that mean-pooled, L2-normalised caption embeddings rank their own image's
    feature first among all `features` (N, D). Returns the encoder (eval mode) and {"minutes", "steps", "loss"}.
    AdamW with linear decay after a 5% warm-up; the original encoder is not changed."""
    if len(texts) != len(gold_rows) or not texts:
        raise ValueError(f"{len(texts)} training captions and {len(gold_rows)} gold rows: need as many, at least one")
    model = copy.deepcopy(encoder).train()
    generator = torch.Generator().manual_seed(seed)
    targets = torch.as_tensor(features, dtype=torch.float32)
    gold = torch.as_tensor(gold_rows, dtype=torch.long)
    per_epoch = -(-len(texts) // batch_size)
    total = max(1, round(epochs * per_epoch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    warmup = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup))))
    order = torch.empty(0, dtype=torch.long)
    start, losses = time.perf_counter(), []
    for step in tqdm(range(total), desc="dense fine-tune", unit="step"):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(texts), generator=generator)])
        rows, order = order[:batch_size], order[batch_size:]
        batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=128, return_tensors="pt")
        states = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        queries = F.normalize((states * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=-1)
        loss = F.cross_entropy(scale * queries @ targets.T, gold[rows])
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return model.eval(), {"minutes": (time.perf_counter() - start) / 60, "steps": total, "epochs": epochs,
                          "learning_rate": learning_rate, "loss_first": losses[0],
                          "loss_last": float(np.mean(losses[-10:]))}


__all__ = ["finetune_query_encoder"]
