"""The model on a CUDA device (issue 16's GPU run): search, a bf16 training step, LazyAdamW and saving agree with the
CPU. Skipped where torch sees no CUDA device (CI's machines); `benchmarks/device_check.sh` runs them on a lent GPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import dense_start_retriever, synthetic_captions

from modeling_gcmr import GcmrForRetrieval
from modeling_gcmr.training.lazy_adamw import LazyAdamW
from tokenization_gcmr import ImageIdTokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

DIM, COUNT = 8, 40
OPTIONS = {
    "coarse_fine": dict(num_coarse=4, num_levels=2, codebook_size=4, fine_quantizer="residual_kmeans"),
    "structured": dict(branching=3, leaf_size=4),
    "atomic": {},
}


def _retriever(text_tokenizer, id_type: str) -> tuple[GcmrForRetrieval, ImageIdTokenizer, np.ndarray, list[str]]:
    features = np.random.default_rng(0).normal(size=(COUNT, DIM)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    model, tokenizer = dense_start_retriever(text_tokenizer, [f"img{i}" for i in range(COUNT)], features, id_type,
                                             **OPTIONS[id_type])
    return model, tokenizer, features, synthetic_captions(COUNT, seed=3)


def _hits(model, tokenizer, features, queries, **kwargs):
    by_text = model.retrieve(queries, tokenizer, top_k=5, num_beams=5, show_progress=False, **kwargs)
    by_image = model.retrieve(tokenizer=tokenizer, image_embeds=features, top_k=5, num_beams=5, show_progress=False,
                              **kwargs)
    return by_text + by_image


@pytest.mark.parametrize("id_type", sorted(OPTIONS))
@pytest.mark.parametrize("rerank", [None, "features", "hybrid"])
def test_search_on_cuda_ranks_as_on_the_cpu(text_tokenizer, id_type, rerank):
    model, tokenizer, features, queries = _retriever(text_tokenizer, id_type)
    on_cpu = _hits(model, tokenizer, features, queries, rerank=rerank)
    on_gpu = _hits(model.to("cuda"), tokenizer, features, queries, rerank=rerank)
    assert [[key for key, _ in row] for row in on_gpu] == [[key for key, _ in row] for row in on_cpu]
    np.testing.assert_allclose([score for row in on_gpu for _, score in row],
                               [score for row in on_cpu for _, score in row], rtol=1e-3, atol=1e-3)


def test_a_bf16_training_step_on_cuda_follows_the_fp32_one(text_tokenizer):
    model, tokenizer, features, _ = _retriever(text_tokenizer, "coarse_fine")
    labels = tokenizer.encode_identifiers(tokenizer.keys[:16])
    width = max(len(row) for row in labels)
    batch_labels = torch.full((16, width), -100, dtype=torch.long)
    for row, ids in enumerate(labels):
        batch_labels[row, : len(ids)] = torch.as_tensor(ids)
    inputs = dict(image_embeds=torch.from_numpy(features[:16]), labels=batch_labels)
    model.train()
    torch.manual_seed(0)
    reference = model(**inputs).loss
    model.to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.manual_seed(0)
        loss = model(**{name: value.cuda() for name, value in inputs.items()}).loss
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - reference.item()) <= 0.05 * abs(reference.item()) + 0.05
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast leaves the weights in fp32


@pytest.mark.parametrize("group", [{}, {"row_wise": True}, {"trainable_rows": [0, 3, 7]}])
def test_lazy_adamw_on_cuda_updates_the_rows_it_did_on_the_cpu(group):
    def train(device: str) -> torch.Tensor:
        torch.manual_seed(0)
        table = torch.nn.Parameter(torch.randn(12, 5, device=device))
        options = dict(group)
        if "trainable_rows" in options:  # a mask on the CPU, as a refresh makes it before the Trainer moves the model
            options["trainable_rows"] = torch.isin(torch.arange(12), torch.tensor(options["trainable_rows"]))
        optimizer = LazyAdamW([{"params": [table], **options}], lr=0.05, weight_decay=0.1)
        for step in range(5):
            rows = torch.tensor([step, step + 3, 7], device=device)
            (F.embedding(rows, table, sparse=True) ** 2).sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return table.detach().cpu()

    torch.testing.assert_close(train("cuda"), train("cpu"), rtol=1e-5, atol=1e-6)


def test_a_retriever_saved_from_cuda_reloads_on_the_cpu(text_tokenizer, tmp_path):
    from modeling_gcmr.publishing.checkpoint import save_retriever

    model, tokenizer, features, queries = _retriever(text_tokenizer, "coarse_fine")
    expected = _hits(model, tokenizer, features, queries)
    save_retriever(model.to("cuda"), tokenizer, tmp_path / "retriever")
    reloaded = GcmrForRetrieval.from_pretrained(tmp_path / "retriever").eval()
    assert reloaded.device.type == "cpu"
    got = _hits(reloaded, ImageIdTokenizer.from_pretrained(tmp_path / "retriever"), features, queries)
    assert [[key for key, _ in row] for row in got] == [[key for key, _ in row] for row in expected]


def test_adds_on_cuda_grow_the_tables_in_place_as_on_the_cpu(text_tokenizer):
    new = np.random.default_rng(1).normal(size=(6, DIM)).astype(np.float32)
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    found, vectors = {}, {}
    for device in ("cpu", "cuda"):
        model, tokenizer, features, _ = _retriever(text_tokenizer, "coarse_fine")
        model.to(device)
        model.add_images(["new0", "new1", "new2"], tokenizer, image_embeds=new[:3])
        pointer = model.identifier_head.edge_vectors.data_ptr()
        model.add_images(["new3", "new4", "new5"], tokenizer, image_embeds=new[3:])
        assert model.identifier_head.edge_vectors.data_ptr() == pointer  # the second add wrote into the room
        assert model.identifier_head.edge_vectors.device.type == device
        found[device] = model.retrieve(tokenizer=tokenizer, image_embeds=new, top_k=5, num_beams=5, show_progress=False)
        vectors[device] = model.identifier_head.edge_vectors.detach().cpu()
    assert [[key for key, _ in row] for row in found["cuda"]] == [[key for key, _ in row] for row in found["cpu"]]
    torch.testing.assert_close(vectors["cuda"], vectors["cpu"], rtol=1e-4, atol=1e-5)
