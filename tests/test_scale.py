"""What keeps the user path linear in the collection size (issue 16); `benchmarks/scale.py` measures it at 1M."""
from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest
import torch

import modeling_gcmr.identifier_head_gcmr as identifier_head_gcmr
from modeling_gcmr import GcmrConfig, GcmrForRetrieval
from tokenization_gcmr import ImageIdTokenizer, build_identifiers

DIM = 8


def _model_and_features(text_tokenizer, id_type: str, count: int = 300):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, DIM))
    features = (centres[rng.integers(0, 6, count)] + 0.3 * rng.normal(size=(count, DIM))).astype(np.float32)
    options = dict(num_coarse=4, num_levels=2, codebook_size=3, fine_quantizer="residual_kmeans") \
        if id_type == "coarse_fine" else dict(branching=3, leaf_size=4) if id_type == "structured" else {}
    table = build_identifiers([f"k{i}" for i in range(count)], id_type, embeddings=features, seed=0, **options)
    tokenizer = ImageIdTokenizer(text_tokenizer, table)
    model = GcmrForRetrieval(GcmrConfig(text_config=dict(
        model_type="t5", vocab_size=tokenizer.num_text_tokens, d_model=16, d_ff=32, d_kv=4, num_heads=4,
        num_layers=1, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0), image_embed_dim=DIM,
        identifier_dim=DIM))
    return model, tokenizer, features


def _reference_edge_vectors(paths: torch.Tensor, features: torch.Tensor, num_edges: int) -> torch.Tensor:
    """The documented start, written plainly: depth by depth, each edge = mean of what is left of its rows."""
    left = features.double().clone()
    vectors = torch.zeros(num_edges, features.shape[1], dtype=torch.float64)
    for depth in range(paths.shape[1]):
        for edge in paths[:, depth].unique().tolist():
            if edge < 0:
                continue
            rows = paths[:, depth] == edge
            vectors[edge] = left[rows].mean(dim=0)
            left[rows] -= vectors[edge]
    return vectors


@pytest.mark.parametrize("id_type", ["coarse_fine", "structured", "atomic"])
@pytest.mark.parametrize("chunk", [7, identifier_head_gcmr.INIT_CHUNK])
def test_edge_vectors_start_as_documented_whatever_the_chunk_size(text_tokenizer, monkeypatch, id_type, chunk):
    monkeypatch.setattr(identifier_head_gcmr, "INIT_CHUNK", chunk)
    model, tokenizer, features = _model_and_features(text_tokenizer, id_type)
    untouched = features.copy()
    model.set_identifier_vocabulary(tokenizer, image_embeds=features)
    head = model.identifier_head
    paths = head.paths.long()
    assert paths.shape[1] > 2 or id_type == "atomic"  # several depths, where the type has them
    expected = _reference_edge_vectors(paths, torch.from_numpy(features), head.edge_vectors.shape[0])
    torch.testing.assert_close(head.edge_vectors.detach().double(), expected, atol=1e-5, rtol=1e-5)
    sums = (head.edge_vectors.detach()[paths.clamp(min=0)] * (paths >= 0)[..., None]).sum(dim=1)
    torch.testing.assert_close(sums, torch.from_numpy(features), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(features, untouched)  # the caller's features are read, never written


def test_set_identifiers_keeps_no_second_set_of_edge_vectors(text_tokenizer):
    model, tokenizer, features = _model_and_features(text_tokenizer, "coarse_fine", count=120)
    model.set_identifier_vocabulary(tokenizer, image_embeds=features)
    head = model.identifier_head
    paths, rows, edges = head.paths.clone(), head.token_rows.clone(), head.edge_vectors.shape[0]
    storage = head.edge_vectors.data_ptr()
    head.set_identifiers(paths, rows, edges)  # same size: the same memory, zeroed
    assert head.edge_vectors.data_ptr() == storage and not head.edge_vectors.any()
    grown = torch.randn(edges + 5, DIM)
    head.set_identifiers(paths, rows, edges + 5, grown)  # given vectors: owned as they are, not copied
    assert head.edge_vectors.data_ptr() == grown.data_ptr() and head.edge_vectors.requires_grad
    head.edge_vectors.requires_grad_(False)
    head.set_identifiers(paths, rows, edges)
    assert head.edge_vectors.shape == (edges, DIM) and not head.edge_vectors.any()


def test_added_images_start_at_their_features_after_the_head_takes_the_grown_vectors(text_tokenizer):
    model, tokenizer, features = _model_and_features(text_tokenizer, "coarse_fine", count=100)
    model.set_identifier_vocabulary(tokenizer, image_embeds=features)
    new = features[:20] + np.float32(0.05) * np.random.default_rng(1).normal(size=(20, DIM)).astype(np.float32)
    model.add_images([f"n{i}" for i in range(len(new))], tokenizer, image_embeds=new, placement="centroids")
    head = model.identifier_head
    paths = head.paths.long()[-len(new):]
    sums = (head.edge_vectors.detach()[paths.clamp(min=0)] * (paths >= 0)[..., None]).sum(dim=1)
    torch.testing.assert_close(sums, torch.from_numpy(new), atol=1e-4, rtol=1e-4)


def test_images_added_under_one_identifier_take_the_free_uniqueness_tokens_in_order(text_tokenizer):
    _, tokenizer, features = _model_and_features(text_tokenizer, "coarse_fine", count=100)
    old = tokenizer.identifier_table
    copies = np.concatenate([np.repeat(features[:1], 4, axis=0), np.repeat(features[1:2], 3, axis=0)])
    edit = tokenizer.prepare_add([f"n{i}" for i in range(len(copies))], copies)

    def spelled(table, row: int) -> tuple:
        return tuple(table.units[code] for code in table.codes[row] if code >= 0)

    taken = {spelled(old, row) for row in range(len(old.keys))}
    new = [spelled(edit.table, row) for row in edit.rows]
    for identifier in new:  # what probing j = 0, 1, ... row by row gives: the smallest free <u_j>, in row order
        base = identifier[:-1] if identifier[-1].startswith("<u_") else identifier
        j = 0
        while (base + (f"<u_{j}>",) if base in taken or j else base) in taken:
            j += 1
        expected = base if base not in taken else base + (f"<u_{j}>",)
        assert identifier == expected
        taken.add(identifier)
    assert len(set(new)) == len(new)


def _scale_script():
    import sys
    from pathlib import Path

    benchmarks = str(Path(__file__).resolve().parent.parent / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    import scale
    import scale_report

    return scale, scale_report


def test_scale_script_runs_the_whole_path_in_two_processes(tmp_path):
    """benchmarks/scale.py at 2,000 images, training under bf16 autocast (the CUDA run's setting, here on the CPU)
    with a shared EOS vector and the row-wise edge optimizer state: every step runs and reports, and its row renders.
    A smoke run: the figures are not judged."""
    scale, scale_report = _scale_script()
    result = scale.run_one("atomic", 2000, tmp_path / "work", 2, 8.0, bf16=True, results_dir=tmp_path / "results",
                           shared_eos_vector=True, edge_optimizer_state="row_wise")
    assert not [key for key in result if key.endswith("_error")], result
    assert result["train_steps"] == 2 and result["bf16"] and result["device"] == "cpu"
    assert result["edge_optimizer_state"] == "row_wise"
    # Atomic identifiers: one token and a forced EOS each, so 2,000 EOS edges become one row.
    assert result["edge_vector_rows"] == result["trie_edges"] - 2000 + 1
    assert result["checkpoint_bytes"] > result["stored_feature_bytes"]
    assert result["retrieve_hits_per_query"] == 10 and result["added_found_by_own_feature_r1"] >= 0.9
    for step in ("build", "fit", "train", "save", "load", "retrieve", "add", "remove"):
        assert result[f"{step}_seconds"] >= 0 and result[f"{step}_peak_rss_gb"] > 0
    assert (tmp_path / "results" / "atomic_2000_shared_eos_row_wise.json").is_file()
    assert not (tmp_path / "work" / "atomic_2000").exists()
    table = scale_report.table([result])
    assert "| atomic | 2,000 (shared EOS vector, row-wise edge optimizer state) |" in table and "peak GPU" not in table
    # A CUDA run's rows carry each step's peak GPU memory, and the table shows the largest.
    on_gpu = {**result, "train_peak_gpu_gb": 1.5, "retrieve_peak_gpu_gb": 0.25}
    assert "peak GPU GB (step)" in scale_report.table([on_gpu]) and "1.50 (train)" in scale_report.table([on_gpu])


@pytest.mark.parametrize("device", ["tpu", *([] if torch.cuda.is_available() else ["cuda"])])
def test_scale_script_refuses_a_device_it_cannot_use(device, capsys):
    scale, _ = _scale_script()
    with pytest.raises(SystemExit):
        scale.main(["--device", device, "--sizes", "10", "--work", "/nonexistent"])
    assert "--device" in capsys.readouterr().err


def _file_rss() -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("RssFile:"))


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status and madvise: Linux")


@linux_only
def test_released_pages_of_a_mapped_file_leave_the_process_and_read_back_the_same(tmp_path):
    from modeling_gcmr.collection_edits_gcmr import release_mapped_pages

    values = torch.arange(8 << 20, dtype=torch.float32)  # 32 MB
    values.numpy().tofile(tmp_path / "values.bin")
    mapped = torch.from_file(str(tmp_path / "values.bin"), shared=False, size=values.numel(), dtype=torch.float32)
    assert float(mapped.sum()) == float(values.sum())  # every page read
    before = _file_rss()
    assert release_mapped_pages([mapped]) >= values.nbytes - 2 * mmap.PAGESIZE
    assert before - _file_rss() >= values.nbytes * 0.9
    assert torch.equal(mapped, values)  # a reference still held reads the file again


def test_release_leaves_anonymous_memory_alone():
    from modeling_gcmr.collection_edits_gcmr import release_mapped_pages

    values = torch.randn(1 << 20)
    copy = values.clone()
    assert release_mapped_pages([values, torch.zeros(0)]) == 0
    assert torch.equal(values, copy)


@linux_only
def test_an_add_to_a_loaded_checkpoint_gives_back_the_file_pages_it_copied(text_tokenizer, tmp_path):
    """A checkpoint loads memory-mapped; an add copies its edge vectors and features into grown tensors. The pages
    it read stay mapped while the file does (the backbone's tensors keep it open): at a million images that held
    2.3 GB more than the model, until the add released them."""
    from modeling_gcmr.publishing.checkpoint import save_retriever

    count, width = 20_000, 128
    features = np.random.default_rng(0).normal(size=(count, width)).astype(np.float32)
    table = build_identifiers([f"k{i}" for i in range(count)], "atomic", embeddings=features, seed=0)
    tokenizer = ImageIdTokenizer(text_tokenizer, table)
    model = GcmrForRetrieval(GcmrConfig(text_config=dict(
        model_type="t5", vocab_size=tokenizer.num_text_tokens, d_model=16, d_ff=32, d_kv=4, num_heads=4,
        num_layers=1, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0), image_embed_dim=width))
    model.set_identifier_vocabulary(tokenizer, image_embeds=features)
    model.store_image_features(features)
    save_retriever(model, tokenizer, tmp_path / "saved")
    del model
    loaded = GcmrForRetrieval.from_pretrained(tmp_path / "saved").eval()
    tokenizer = ImageIdTokenizer.from_pretrained(tmp_path / "saved")
    old = loaded.identifier_head.edge_vectors.detach()
    copied = old.nbytes + loaded.image_features.nbytes  # 20 + 10 MB
    float(old.sum()), float(loaded.image_features.sum())  # both read, as the add's copy reads them
    before = _file_rss()
    new = np.random.default_rng(1).normal(size=(10, width)).astype(np.float32)
    loaded.add_images([f"n{i}" for i in range(10)], tokenizer, image_embeds=new, placement="centroids")
    assert before - _file_rss() >= 0.8 * copied
    assert torch.equal(loaded.identifier_head.edge_vectors[: len(old)], old)  # the grown table kept every old row
    assert [row[0][0] for row in loaded.retrieve(tokenizer=tokenizer, image_embeds=new, top_k=1,
                                                 show_progress=False)] == [f"n{i}" for i in range(10)]
