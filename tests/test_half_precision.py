"""Half precision for serving (issue 16): a retriever cast to bfloat16 saves at about half the size, reloads in
bfloat16 without being asked, ranks as the float32 one does within rounding, and grows and shrinks like it.

Training stays in float32 (bf16 autocast on a GPU: `benchmarks/scale.py --bf16`); this is the checkpoint a user
serves. Measured at 1M images in docs/benchmarks.md."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import dense_start_retriever
from safetensors import safe_open

from modeling_gcmr import GcmrForRetrieval
from modeling_gcmr.publishing.checkpoint import save_retriever
from tokenization_gcmr import ImageIdTokenizer

DIM, COUNT = 16, 120


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


FEATURES = _unit(np.random.default_rng(0).normal(size=(COUNT, DIM)))
KEYS = [f"img{i}" for i in range(COUNT)]


@pytest.fixture
def saved(text_tokenizer, tmp_path):
    """A float32 retriever (coarse_fine, stored features) saved as it is and cast to bfloat16."""
    model, tokenizer = dense_start_retriever(text_tokenizer, KEYS, FEATURES, "coarse_fine", num_coarse=6,
                                             num_levels=2, codebook_size=4)
    save_retriever(model, tokenizer, tmp_path / "fp32")
    save_retriever(model.to(torch.bfloat16), tokenizer, tmp_path / "bf16")
    return tmp_path / "fp32", tmp_path / "bf16"


def _load(folder):
    return GcmrForRetrieval.from_pretrained(folder).eval(), ImageIdTokenizer.from_pretrained(folder)


def _tensors(folder) -> dict[str, str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return {name: str(handle.get_slice(name).get_dtype()) for name in handle.keys()}


def test_a_bf16_checkpoint_is_half_the_size_and_reloads_in_bf16(saved):
    fp32, bf16 = saved
    floats = {name: dtype for name, dtype in _tensors(bf16).items() if dtype not in ("I32", "I64", "BOOL")}
    assert floats and set(floats.values()) == {"BF16"}
    assert {name for name, dtype in _tensors(fp32).items() if dtype == "F32"} == set(floats)
    # The same names; int32 trie paths are left as they are.
    assert (bf16 / "model.safetensors").stat().st_size < 0.6 * (fp32 / "model.safetensors").stat().st_size
    model, _ = _load(bf16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.image_features.dtype == torch.bfloat16 == model.identifier_head.edge_vectors.dtype
    assert model.identifier_head.paths.dtype == torch.int32


@pytest.mark.parametrize("rerank", [None, "features", "hybrid"])
def test_bf16_search_ranks_as_fp32_within_rounding(saved, rerank):
    fp32, bf16 = (_load(folder) for folder in saved)
    noise = np.random.default_rng(1).normal(size=FEATURES.shape).astype(np.float32)
    queries = _unit(FEATURES + 0.15 * noise)
    want, got = (model.retrieve(tokenizer=tokenizer, image_embeds=queries, top_k=5, num_beams=5, rerank=rerank,
                                show_progress=False) for model, tokenizer in (fp32, bf16))
    top1 = [(w[0][0], g[0][0]) for w, g in zip(want, got)]
    assert np.mean([a == b for a, b in top1]) >= 0.95
    for w, g in zip(want, got):  # where they differ, bf16's pick is within rounding of fp32's best
        assert g[0][0] in [key for key, _ in w]
        assert abs(g[0][1] - w[0][1]) <= 0.02 * abs(w[0][1]) + 0.02


def test_a_bf16_retriever_grows_shrinks_and_saves_in_bf16(saved, tmp_path):
    model, tokenizer = _load(saved[1])
    new = _unit(np.random.default_rng(2).normal(size=(8, DIM)))
    new_keys = [f"new{i}" for i in range(8)]
    model.add_images(new_keys, tokenizer, image_embeds=new)
    assert model.identifier_head.edge_vectors.dtype == torch.bfloat16 == model.image_features.dtype
    hits = model.retrieve(tokenizer=tokenizer, image_embeds=new, top_k=1, num_beams=5, show_progress=False)
    assert [row[0][0] for row in hits] == new_keys
    model.remove_images(KEYS[:4], tokenizer)
    hits = model.retrieve(tokenizer=tokenizer, image_embeds=FEATURES[:4], top_k=5, num_beams=5, show_progress=False)
    assert not {key for row in hits for key, _ in row} & set(KEYS[:4])
    save_retriever(model, tokenizer, tmp_path / "edited")
    again, again_tokenizer = _load(tmp_path / "edited")
    assert again.identifier_head.edge_vectors.dtype == torch.bfloat16
    hits = again.retrieve(tokenizer=again_tokenizer, image_embeds=new, top_k=1, num_beams=5, show_progress=False)
    assert [row[0][0] for row in hits] == new_keys


@pytest.mark.parametrize("cast_at_load", [False, True])
def test_remote_code_loads_bf16_and_ranks_as_in_process(saved, cast_at_load):
    """Through the Hub's custom-code path, in a process without this package: the bf16 folder as saved, or the fp32
    folder cast at load (`dtype=torch.bfloat16`), searches in bf16 as the in-process bf16 model does."""
    import json

    from subprocess_utils import run_without_package

    folder = saved[0] if cast_at_load else saved[1]
    model, tokenizer = _load(saved[1])
    expected = model.retrieve(tokenizer=tokenizer, image_embeds=FEATURES[:10], top_k=3, num_beams=5,
                              show_progress=False)
    dtype = ", dtype=torch.bfloat16" if cast_at_load else ""
    remote = run_without_package(
        f"""
        import json, torch
        from transformers import AutoModel, AutoTokenizer
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True{dtype}).eval()
        tokenizer = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)
        hits = model.retrieve(tokenizer=tokenizer, image_embeds=torch.tensor({FEATURES[:10].tolist()!r}), top_k=3,
                              num_beams=5, show_progress=False)
        print(json.dumps({{"hits": hits, "dtype": str(model.identifier_head.edge_vectors.dtype),
                          "module": type(model).__module__}}))
        """,
        cwd=str(folder),
    )
    assert remote["module"].startswith("transformers_modules") and remote["dtype"] == "torch.bfloat16"
    expected = json.loads(json.dumps(expected))
    assert [[key for key, _ in row] for row in remote["hits"]] == [[key for key, _ in row] for row in expected]
    np.testing.assert_allclose([s for row in remote["hits"] for _, s in row], [s for row in expected for _, s in row],
                               rtol=2e-2, atol=2e-2)


def test_refresh_refuses_a_half_precision_model_and_changes_nothing(saved, text_tokenizer, tmp_path):
    import datasets

    from modeling_gcmr.training.arguments import GcmrTrainingArguments
    from modeling_gcmr.training.refresh import refresh_after_add

    model, tokenizer = _load(saved[1])
    new = _unit(np.random.default_rng(3).normal(size=(4, DIM)))
    new_keys = [f"new{i}" for i in range(4)]
    model.add_images(new_keys, tokenizer, image_embeds=new)
    corpus = datasets.Dataset.from_dict({"image_key": new_keys, "captions": [["a red circle"]] * 4,
                                         "image_embeds": new.tolist()})
    args = GcmrTrainingArguments(output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=4,
                                 save_strategy="no", disable_tqdm=True, learning_rate=1e-3, dataloader_pin_memory=False)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"trains in float32, but this model holds torch.bfloat16 weights"):
        refresh_after_add(model, tokenizer, corpus, None, args)
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    model.float()  # the advice in the message: refresh in float32
    assert refresh_after_add(model, tokenizer, corpus, None, args)["train_loss"] > 0


def test_the_pipeline_loads_a_folder_in_bf16_and_answers_as_the_model(saved):
    from transformers import pipeline

    from modeling_gcmr.pipeline_gcmr import PIPELINE_TASK

    pipe = pipeline(PIPELINE_TASK, model=str(saved[0]), trust_remote_code=True, device="cpu", dtype=torch.bfloat16)
    assert pipe.model.dtype == torch.bfloat16
    model, tokenizer = _load(saved[1])
    query = "a red circle to the left of a blue square"
    expected = model.retrieve([query], tokenizer, top_k=3, num_beams=5, show_progress=False)[0]
    results = pipe(query, top_k=3, num_beams=5)
    assert [r["image_key"] for r in results] == [key for key, _ in expected]
    assert [r["score"] for r in results] == pytest.approx([score for _, score in expected], abs=1e-3)
