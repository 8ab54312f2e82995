"""Pretrained text backbones (`--text_backbone`): encoder, seq2seq and CLIP folders made here from tiny configs;
run_gcmr trains on one and the saved retriever loads through AutoModel where the package is not installed; a
folder that is not a model, or lacks its tokenizer, and features of the wrong width fail clearly."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from subprocess_utils import run_without_package
from test_run_gcmr import run_script
from transformers import (
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from modeling_gcmr.training.backbones import BackboneError, load_text_backbone
from modeling_gcmr.training.model_setup import build_retriever
from tokenization_gcmr import ImageIdTokenizer, build_identifiers, train_text_tokenizer

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "green", "circle", "square", "star",
         "left", "of", "above", "the", "big", "small", "next", "to"]


def bert_tokenizer(folder):
    """A BERT-style WordPiece tokenizer over WORDS ([CLS] text [SEP], lowercased)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    backend = Tokenizer(models.WordPiece({word: i for i, word in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = bert_tokenizer(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def seq2seq_folder(tmp_path_factory, caption_corpus):
    folder = tmp_path_factory.mktemp("tiny-t5")
    tokenizer = train_text_tokenizer(caption_corpus, vocab_size=150)
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), d_model=16, d_ff=32, d_kv=4, num_heads=4,
                                        num_layers=1, decoder_start_token_id=0)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = bert_tokenizer(folder)
    config = CLIPConfig(text_config=CLIPTextConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32,
                                                   num_hidden_layers=1, num_attention_heads=2,
                                                   max_position_embeddings=64, eos_token_id=3),
                        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, image_size=16, patch_size=8),
                        projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def features(count, dim, seed=0):
    values = np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)
    return values / np.linalg.norm(values, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["encoder", "seq2seq", "clip"])
def test_each_backbone_kind_builds_a_retriever_with_its_pretrained_weights(kind, encoder_folder, seq2seq_folder,
                                                                            clip_folder):
    folder = {"encoder": encoder_folder, "seq2seq": seq2seq_folder, "clip": clip_folder}[kind]
    backbone = load_text_backbone(str(folder))
    assert backbone.kind == kind
    keys = [f"k{i}" for i in range(8)]
    width = backbone.query_width
    embeds = features(8, width)
    tokenizer = ImageIdTokenizer(backbone.tokenizer, build_identifiers(keys, "atomic", embeddings=embeds, seed=0))
    model = build_retriever(tokenizer, backbone=backbone, image_embed_dim=width, identifier_features=embeds)
    encoder = model.text_encoder()
    if kind == "clip":
        pretrained = CLIPModel.from_pretrained(folder)
        torch.testing.assert_close(encoder.state_dict()["embeddings.token_embedding.weight"],
                                   pretrained.text_model.embeddings.token_embedding.weight)
        # CLIP's text projection is the query projection: queries land in CLIP's image space at once
        torch.testing.assert_close(model.query_projection.weight, pretrained.text_projection.weight)
        assert model.config.query_pooling == "pooler"
    elif kind == "encoder":
        pretrained = BertModel.from_pretrained(folder)
        torch.testing.assert_close(encoder.embeddings.word_embeddings.weight, pretrained.embeddings.word_embeddings.weight)
    else:
        pretrained = T5ForConditionalGeneration.from_pretrained(folder)
        torch.testing.assert_close(model.backbone.shared.weight[: pretrained.shared.weight.shape[0]],
                                   pretrained.shared.weight)
    # frozen by default for encoder and CLIP towers, trained for a seq2seq model
    assert model.text_encoder_is_frozen() == (kind != "seq2seq")
    assert model.config.shared_query_space
    hits = model.retrieve(["a red circle left of a blue square"], tokenizer, top_k=3)
    assert len(hits[0]) == 3


def test_run_gcmr_trains_on_an_encoder_folder_and_the_retriever_loads_without_the_package(encoder_folder, tmp_path):
    rows = [{"image_key": f"img{i}", "captions": [f"a {c} {s}", f"the {c} {s} next to a star"],
             "image_embeds": vector.tolist()}
            for i, ((c, s), vector) in enumerate(zip([("red", "circle"), ("blue", "square"), ("green", "star"),
                                                      ("red", "square"), ("blue", "circle"), ("green", "circle")],
                                                     features(6, 16)))]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    # The design's command, as written, plus a short budget.
    run_script(["--corpus", str(corpus), "--image_encoder", "precomputed", "--text_backbone", str(encoder_folder),
                "--id_type", "coarse_fine", "--id_options", '{"num_coarse": 2, "num_levels": 1, "codebook_size": 2}',
                "--num_query_captions", "0", "--do_train", "--output_dir", str(out), "--max_steps", "3",
                "--per_device_train_batch_size", "6", "--report_to", "none", "--disable_tqdm", "true"], cwd=tmp_path)
    loaded = run_without_package(
        f"""
        import json
        from transformers import AutoModel, AutoTokenizer
        model = AutoModel.from_pretrained({str(out / "retriever")!r}, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained({str(out / "retriever")!r}, trust_remote_code=True)
        hits = model.retrieve(["a red circle", "the green star next to a star"], tokenizer, top_k=3)
        print(json.dumps({{"hits": hits, "stored": model.stored_image_features is not None,
                          "distill": model.config.distill_weight, "hard_negatives": model.config.hard_negatives,
                          "decoder": model.identifier_head.reads_decoder_states}}))
        """,
        cwd=str(tmp_path),
    )
    assert all(len(row) == 3 and {k for k, _ in row} <= {r["image_key"] for r in rows} for row in loaded["hits"])
    # the recommended defaults: features stored (rerank works) and distillation on, as the features share the space
    assert loaded["stored"] and loaded["distill"] == 10.0
    # a dense-aware start keeps its decoder fixed at the zero correction: no hard negatives, and search runs no decoder
    assert loaded["hard_negatives"] == 0 and loaded["decoder"] is False
    # no held-out queries, yet the checkpoint carries its card: what was trained, and that nothing was measured
    card = (out / "retriever" / "README.md").read_text()
    assert "identifier-coarse-fine" in card and "Not evaluated" in card and "model-index" not in card


def test_a_folder_that_is_not_a_model_or_lacks_its_tokenizer_is_named(encoder_folder, tmp_path):
    with pytest.raises(BackboneError, match="has no config.json"):
        load_text_backbone(str(tmp_path))
    with pytest.raises(BackboneError, match="does not exist"):
        load_text_backbone(str(tmp_path / "missing"))
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(encoder_folder, no_tokenizer)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (no_tokenizer / name).unlink(missing_ok=True)
    with pytest.raises(BackboneError, match="has no usable tokenizer"):
        load_text_backbone(str(no_tokenizer))
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(BackboneError, match="decoder-only model"):
        load_text_backbone(str(gpt))


def test_features_of_another_width_than_the_backbone_space_are_refused(clip_folder):
    backbone = load_text_backbone(str(clip_folder))
    keys = [f"k{i}" for i in range(4)]
    embeds = features(4, 12)  # CLIP's projection is 8-d
    tokenizer = ImageIdTokenizer(backbone.tokenizer, build_identifiers(keys, "atomic", embeddings=embeds, seed=0))
    with pytest.raises(ValueError, match=r"image features are 12-d.*projects queries to 8-d"):
        build_retriever(tokenizer, backbone=backbone, image_embed_dim=12, identifier_features=embeds,
                        shared_query_space=True)


def test_a_trained_text_tokenizer_is_not_a_backbone(tmp_path, caption_corpus):
    folder = tmp_path / "only-tokenizer"
    tokenizer = train_text_tokenizer(caption_corpus, vocab_size=120)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    tokenizer.save_pretrained(folder)
    with pytest.raises(BackboneError, match="has no config.json"):
        load_text_backbone(str(folder))
