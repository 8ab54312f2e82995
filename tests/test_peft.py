"""LoRA on the text backbone: trains, saves and reloads as an adapter, merges, and retrieve() works in each state."""
from __future__ import annotations

import os

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from test_modeling import id_tokenizer, retriever
from transformers import AutoModel

QUERIES = ["a small red circle left of a blue square", "a big green star"]


def test_lora_trains_saves_reloads_and_merges(tmp_path, make_id_tokenizer):
    tokenizer = id_tokenizer(make_id_tokenizer)
    base = retriever(tokenizer, fusion="coarse_to_fine", dropout=0.0)
    base.save_pretrained(tmp_path / "base")

    # T5's attention projections are q/k/v/o; the fusion's own projections (query_proj, ...) are not targeted
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q", "v"]))
    adapted = {name for name, module in lora.named_modules() if hasattr(module, "lora_A")}
    assert adapted and all(".backbone." in name and name.rsplit(".", 1)[-1] in ("q", "v") for name in adapted)
    trainable = [name for name, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)

    keys = list(tokenizer.identifier_table.keys[:4])
    inputs = tokenizer(["red circle", "blue square", "green star", "pink ring"], padding=True, return_tensors="pt")
    labels = torch.tensor(tokenizer.encode_identifiers(keys))
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=3e-2)
    lora.train()
    losses = []
    for _ in range(12):
        loss = lora(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    lora.eval()

    trained = lora.retrieve(QUERIES, tokenizer, top_k=3, num_beams=4)
    assert all(len(hits) == 3 for hits in trained)

    lora.save_pretrained(tmp_path / "adapter")
    assert "adapter_model.safetensors" in os.listdir(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModel.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    assert reloaded.retrieve(QUERIES, tokenizer, top_k=3, num_beams=4) == trained

    merged = reloaded.merge_and_unload()
    assert type(merged).__name__ == "GcmrForRetrieval"
    assert not any(hasattr(module, "lora_A") for module in merged.modules())
    merged_hits = merged.retrieve(QUERIES, tokenizer, top_k=3, num_beams=4)
    assert [[key for key, _ in hits] for hits in merged_hits] == [[key for key, _ in hits] for hits in trained]
    for merged_row, row in zip(merged_hits, trained):
        torch.testing.assert_close([score for _, score in merged_row], [score for _, score in row], atol=1e-4, rtol=0)
