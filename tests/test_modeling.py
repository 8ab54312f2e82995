"""GcmrConfig and GcmrForRetrieval on tiny configs: forward/backward for every input kind and backbone, generate()
with the multimodal encoder and the cache, R-Drop, identifier embeddings, save/load and bad input."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    BertConfig,
    CLIPVisionConfig,
    EncoderDecoderConfig,
    SiglipVisionConfig,
    T5Config,
    ViTConfig,
)

from modeling_gcmr import GcmrConfig, GcmrForRetrieval, GcmrSeq2SeqOutput

VOCAB = 48
EMBED_DIM = 12
IMAGE_SIZE = 16


class GcmrModelTester:
    """Builds tiny GCMR configs, models and batches (the pattern of transformers' ModelTester classes)."""

    batch_size = 3
    text_length = 5
    label_length = 4

    @staticmethod
    def text_config(backbone: str, dropout: float = 0.1, vocab: int = VOCAB):
        if backbone == "t5":
            return T5Config(
                vocab_size=vocab, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                dropout_rate=dropout, decoder_start_token_id=0,
            )
        shared = dict(vocab_size=vocab, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                      max_position_embeddings=32, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        # the decoder is wider than the encoder, so the enc->dec projection and the fusion projection are exercised
        return EncoderDecoderConfig.from_encoder_decoder_configs(
            BertConfig(hidden_size=16, **shared), BertConfig(hidden_size=24, **shared),
            pad_token_id=0, decoder_start_token_id=2,
        )

    @staticmethod
    def vision_config(kind: str | None):
        if kind == "clip":
            return CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=IMAGE_SIZE, patch_size=8)
        if kind == "vit":
            return ViTConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             image_size=IMAGE_SIZE, patch_size=8)
        if kind == "siglip":
            return SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=8)
        return None

    def config(self, backbone="t5", fusion="none", vision="clip", dropout=0.1, vocab=VOCAB, **kwargs) -> GcmrConfig:
        return GcmrConfig(
            text_config=self.text_config(backbone, dropout, vocab), vision_config=self.vision_config(vision),
            image_embed_dim=EMBED_DIM, num_visual_tokens=2, fusion=fusion, **kwargs,
        )

    def model(self, seed: int = 0, **kwargs) -> GcmrForRetrieval:
        torch.manual_seed(seed)
        return GcmrForRetrieval(self.config(**kwargs))

    def batch(self, images: str = "text", seed: int = 0) -> dict[str, torch.Tensor]:
        """images: "text" (no image), "embeds", "pixels" or "mixed" (embeds with rows 0 and 2 carrying an image)."""
        generator = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(3, VOCAB, (self.batch_size, self.text_length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, 3:] = 0
        labels = torch.randint(3, VOCAB, (self.batch_size, self.label_length), generator=generator)
        labels[1, 2:] = -100
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if images in ("embeds", "mixed"):
            batch["image_embeds"] = torch.randn(self.batch_size, EMBED_DIM, generator=generator)
        if images == "pixels":
            batch["pixel_values"] = torch.randn(self.batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        if images == "mixed":
            batch["image_mask"] = torch.tensor([True, False, True])
        return batch


tester = GcmrModelTester()


# ------------------------------------------------------------------------------------------------------------ config
def test_config_defaults_and_token_ids_come_from_the_text_config():
    config = GcmrConfig()
    assert config.text_config.model_type == "t5" and config.vision_config is None
    assert (config.pad_token_id, config.eos_token_id, config.decoder_start_token_id) == (0, 1, 0)
    assert config.num_beams == 10 and config.fusion == "none" and config.is_encoder_decoder
    pair = tester.config(backbone="encoder_decoder")
    assert pair.get_text_config(decoder=True).model_type == "bert"
    assert pair.get_text_config(decoder=True).hidden_size == 24 and pair.encoder_hidden_size == 16
    assert (pair.pad_token_id, pair.decoder_start_token_id) == (0, 2)


def test_config_round_trips_through_json(tmp_path):
    config = tester.config(backbone="encoder_decoder", fusion="coarse_to_fine", vision="vit", consistency_weight=0.5)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, GcmrConfig)
    assert {**loaded.to_dict(), "_name_or_path": ""} == config.to_dict()
    assert type(loaded.vision_config).__name__ == "ViTConfig"
    assert type(loaded.text_config).__name__ == "EncoderDecoderConfig"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fusion": "dense"}, "fusion"),
        ({"projector": "conv"}, "projector"),
        ({"num_visual_tokens": 0}, "num_visual_tokens"),
        ({"consistency_weight": -1.0}, "consistency_weight"),
        ({"fusion": "coarse_to_fine", "fusion_num_heads": 3}, "fusion_num_heads"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(Exception, match=message):
        GcmrConfig(**kwargs)


# ------------------------------------------------------------------------------------------- forward and backward
FORWARD_CASES = [
    (backbone, fusion, images)
    for backbone in ("t5", "encoder_decoder")
    for fusion in ("none", "coarse_to_fine")
    for images in ("text", "embeds", "pixels", "mixed")
]


@pytest.mark.parametrize("backbone, fusion, images", FORWARD_CASES)
def test_forward_backward(backbone, fusion, images):
    model = tester.model(backbone=backbone, fusion=fusion)
    model.train()
    batch = tester.batch(images)
    out = model(**batch)
    assert isinstance(out, GcmrSeq2SeqOutput) and list(out.keys())[0] == "loss"
    assert out.logits.shape == (tester.batch_size, tester.label_length, VOCAB)
    assert torch.isfinite(out.loss)
    visual = 0 if images == "text" else 2
    assert out.encoder_last_hidden_state.shape[1] == tester.text_length + visual
    out.loss.backward()

    def has_grad(module):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    assert has_grad(model.backbone)
    assert has_grad(model.embed_projector) == (images in ("embeds", "mixed"))
    assert has_grad(model.vision_tower) == (images == "pixels")
    assert has_grad(model.vision_projector) == (images == "pixels")
    if fusion == "coarse_to_fine":
        assert has_grad(model.fusion)


def test_rows_without_image_ignore_their_image_slot():
    model = tester.model(fusion="coarse_to_fine").eval()
    batch = tester.batch("mixed")
    before = model(**batch).logits
    batch["image_embeds"] = batch["image_embeds"].clone()
    batch["image_embeds"][1] += 5.0  # row 1 has image_mask False
    after = model(**batch).logits
    torch.testing.assert_close(after[1], before[1])
    batch["image_embeds"][0] += 5.0  # row 0 carries an image: its output must move
    assert not torch.allclose(model(**batch).logits[0], before[0])


@pytest.mark.parametrize("vision", ["vit", "siglip"])
def test_other_vision_towers_forward(vision):
    model = tester.model(vision=vision).train()
    out = model(**tester.batch("pixels"))
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision_tower.parameters())


def test_several_feature_vectors_per_image_are_averaged():
    model = tester.model(vision=None).eval()
    batch = tester.batch("text")
    features = torch.randn(tester.batch_size, 3, EMBED_DIM)
    torch.testing.assert_close(model(**batch, image_embeds=features).logits,
                               model(**batch, image_embeds=features.mean(dim=1)).logits)


def test_vision_tower_runs_only_on_rows_with_an_image():
    model = tester.model().eval()
    calls = []
    original = model.vision_tower.forward

    def spy(pixel_values=None, **kwargs):
        calls.append(pixel_values.shape[0])
        return original(pixel_values=pixel_values, **kwargs)

    model.vision_tower.forward = spy
    batch = tester.batch("pixels")
    batch["image_mask"] = torch.tensor([False, True, False])
    model(**batch)
    batch["image_mask"] = torch.tensor([False, False, False])
    model(**batch)
    assert calls == [1]


# ------------------------------------------------------------------------------------------------------ generation
GENERATE_CASES = [
    (backbone, fusion, images)
    for backbone in ("t5", "encoder_decoder")
    for fusion in ("none", "coarse_to_fine")
    for images in ("text", "mixed")
]


@pytest.mark.parametrize("backbone, fusion, images", GENERATE_CASES)
def test_generate_with_cache_matches_teacher_forcing(backbone, fusion, images):
    """Greedy and beam search (encoder once, cached decoder steps, beam-expanded encoder tensors) give the tokens
    and scores that a full forward pass gives."""
    model = tester.model(backbone=backbone, fusion=fusion).eval()
    inputs = {k: v for k, v in tester.batch(images).items() if k != "labels"}
    greedy = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                            return_dict_in_generate=True, output_logits=True)
    assert greedy.sequences.shape == (tester.batch_size, 5)
    teacher_forced = model(**inputs, decoder_input_ids=greedy.sequences[:, :-1]).logits
    torch.testing.assert_close(torch.stack(greedy.logits, dim=1), teacher_forced, atol=1e-4, rtol=1e-4)

    beams = model.generate(
        **inputs, max_new_tokens=3, min_new_tokens=3, num_beams=3, num_return_sequences=3, do_sample=False,
        length_penalty=0.0, return_dict_in_generate=True, output_scores=True,
    )
    expanded = {k: v.repeat_interleave(3, dim=0) for k, v in inputs.items()}
    log_probs = torch.log_softmax(model(**expanded, decoder_input_ids=beams.sequences[:, :-1]).logits, dim=-1)
    summed = log_probs.gather(-1, beams.sequences[:, 1:, None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(summed, beams.sequences_scores, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------- R-Drop
def test_rdrop_adds_a_positive_consistency_term_and_gradients_flow():
    model = tester.model(consistency_weight=2.0, dropout=0.3).train()
    out = model(**tester.batch("embeds"))
    assert out.consistency_loss is not None and out.consistency_loss > 0
    assert out.logits.shape[0] == tester.batch_size
    ce = out.loss - 2.0 * out.consistency_loss
    assert out.loss > ce
    out.loss.backward()
    assert model.embed_projector.proj[0].weight.grad.abs().sum() > 0


def test_rdrop_is_zero_without_dropout_and_off_in_eval():
    model = tester.model(consistency_weight=1.0, dropout=0.0).train()
    batch = tester.batch("embeds")
    out = model(**batch)
    assert out.consistency_loss.item() == pytest.approx(0.0, abs=1e-6)
    model.eval()
    evaluated = model(**batch)
    assert evaluated.consistency_loss is None
    torch.testing.assert_close(evaluated.loss, out.loss)


# -------------------------------------------------------------------------------------------- identifier vocabulary
def _text_vocab_model(tokenizer, **kwargs) -> GcmrForRetrieval:
    kwargs.setdefault("vision", None)
    return tester.model(vocab=tokenizer.num_text_tokens, **kwargs)


def id_tokenizer(make_id_tokenizer, num_keys: int = 10, seed: int = 0):
    """An ImageIdTokenizer over `num_keys` images with coarse-to-fine identifiers from random embeddings."""
    from tokenization_gcmr import build_identifiers

    keys = [f"img{i}" for i in range(num_keys)]
    embeddings = np.random.default_rng(seed).normal(size=(num_keys, EMBED_DIM)).astype(np.float32)
    table = build_identifiers(keys, "coarse_fine", embeddings=embeddings, seed=seed)
    return make_id_tokenizer(table)


def retriever(tokenizer, seed: int = 0, **kwargs) -> GcmrForRetrieval:
    """A tiny model (T5 by default, precomputed image features) sized for `tokenizer`'s identifiers."""
    model = _text_vocab_model(tokenizer, seed=seed, **kwargs)
    model.set_identifier_vocabulary(tokenizer, init="unit_vectors")
    return model.eval()


def semantic_tokenizer(make_id_tokenizer, text_tokenizer, num_keys: int = 10):
    """Identifiers spelled with text pieces (semantic)."""
    from conftest import synthetic_captions
    from tokenization_gcmr import build_identifiers

    keys = [f"img{i}" for i in range(num_keys)]
    table = build_identifiers(keys, "semantic", captions=synthetic_captions(num_keys, seed=4), seed=0,
                              text_tokenizer=text_tokenizer)
    return make_id_tokenizer(table)


@pytest.mark.parametrize("backbone", ["t5", "encoder_decoder"])
def test_identifier_head_takes_the_tries_paths_and_records_the_vocabulary(make_id_tokenizer, backbone):
    tokenizer = id_tokenizer(make_id_tokenizer)
    model = _text_vocab_model(tokenizer, backbone=backbone)
    model.set_identifier_vocabulary(tokenizer)
    head, trie = model.identifier_head, tokenizer.prefix_trie
    assert model.config.identifier_head == "identifier"
    assert (model.config.num_identifiers, model.config.num_identifier_edges) == (len(tokenizer.keys), trie.num_edges)
    np.testing.assert_array_equal(head.paths.numpy(), trie.paths(tokenizer.identifier_token_rows))
    np.testing.assert_array_equal(head.token_rows.numpy(), tokenizer.identifier_token_rows)
    assert head.edge_vectors.shape == (trie.num_edges, model.config.identifier_dim)
    # the encoder reads text only: its vocabulary is not grown by the identifier tokens
    assert model.get_input_embeddings().weight.shape[0] == tokenizer.num_text_tokens
    assert model.config.identifier_signature == tokenizer.identifier_signature
    assert model.config.max_identifier_length == tokenizer.max_identifier_length
    assert type(model.config.max_identifier_length) is int


def test_text_pieces_get_the_identifier_head_unless_the_config_asks_for_the_text_head(make_id_tokenizer,
                                                                                      text_tokenizer):
    tokenizer = semantic_tokenizer(make_id_tokenizer, text_tokenizer)
    model = _text_vocab_model(tokenizer)
    model.set_identifier_vocabulary(tokenizer)
    assert model.config.identifier_head == "identifier"
    np.testing.assert_array_equal(model.identifier_head.paths.numpy(),
                                  tokenizer.prefix_trie.paths(tokenizer.identifier_token_rows))
    # the encoder keeps its text vocabulary; no LM head is grown for identifiers
    assert model.get_input_embeddings().weight.shape[0] == tokenizer.num_text_tokens


def test_text_head_resizes_every_token_matrix(make_id_tokenizer, text_tokenizer):
    tokenizer = semantic_tokenizer(make_id_tokenizer, text_tokenizer)
    for backbone in ("t5", "encoder_decoder"):
        model = _text_vocab_model(tokenizer, backbone=backbone, identifier_head="text")
        model.set_identifier_vocabulary(tokenizer)
        assert model.config.identifier_head == "text" and model.identifier_head is None
        assert model.vocab_size == len(tokenizer)
        assert all(w.shape[0] == len(tokenizer) for w in model.token_embedding_weights())
        with pytest.raises(ValueError, match="scores identifiers with the text head"):
            model.set_identifier_vocabulary(tokenizer, init="dense")


def test_dense_init_makes_every_path_sum_to_its_feature(make_id_tokenizer):
    tokenizer = id_tokenizer(make_id_tokenizer)
    features = np.random.default_rng(3).normal(size=(len(tokenizer.keys), EMBED_DIM)).astype(np.float32)
    model = _text_vocab_model(tokenizer)
    model.set_identifier_vocabulary(tokenizer, image_embeds=features)
    head = model.identifier_head
    paths = head.paths.long()
    summed = (head.edge_vectors[paths.clamp(min=0)] * (paths >= 0)[..., None]).sum(1)
    torch.testing.assert_close(summed, torch.as_tensor(features), atol=1e-5, rtol=1e-5)
    # the first step's vectors are the means of the images below them (the coarse centroids' role)
    first = paths[:, 0]
    for edge in first.unique().tolist():
        torch.testing.assert_close(head.edge_vectors[edge], torch.as_tensor(features)[first == edge].mean(0))
    with pytest.raises(ValueError, match=r"one row per key of the tokenizer: shape \(10, D\)"):
        model.set_identifier_vocabulary(tokenizer, image_embeds=features[:3])
    bad = features.copy()
    bad[4, 0] = np.nan
    with pytest.raises(ValueError, match="image_embeds row 4 holds NaN"):
        model.set_identifier_vocabulary(tokenizer, image_embeds=bad)


def test_unit_vector_init_is_deterministic(make_id_tokenizer):
    tokenizer = id_tokenizer(make_id_tokenizer)
    first, second = _text_vocab_model(tokenizer, seed=0), _text_vocab_model(tokenizer, seed=1)
    first.set_identifier_vocabulary(tokenizer, init="unit_vectors")
    second.set_identifier_vocabulary(tokenizer, init="unit_vectors")
    # the vectors come from the table's unit vectors, not from the model's random state
    torch.testing.assert_close(first.identifier_head.edge_vectors, second.identifier_head.edge_vectors)
    assert first.identifier_head.edge_vectors.abs().sum() > 0


def test_unit_vector_init_needs_unit_vectors(make_id_tokenizer):
    from tokenization_gcmr import build_identifiers

    table = build_identifiers([f"k{i}" for i in range(5)], "atomic", seed=0)
    tokenizer = make_id_tokenizer(table)
    with pytest.raises(ValueError, match="unit_vectors"):
        _text_vocab_model(tokenizer).set_identifier_vocabulary(tokenizer, init="unit_vectors")


@pytest.mark.parametrize("backbone", ["t5", "encoder_decoder"])
def test_gradient_reaches_the_gold_edges_and_the_decoder(make_id_tokenizer, backbone):
    tokenizer = id_tokenizer(make_id_tokenizer)
    model = _text_vocab_model(tokenizer, backbone=backbone).train()
    model.set_identifier_vocabulary(tokenizer)
    labels = torch.tensor(tokenizer.encode_identifiers(["img3", "img7"]))
    inputs = tokenizer(["a red circle", "a big star"], padding=True, return_tensors="pt")
    head = model.identifier_head
    model(**inputs, labels=labels).loss.backward()
    gold_edges = head.paths[[3, 7]].long()
    assert head.edge_vectors.grad[gold_edges[gold_edges >= 0]].abs().sum(-1).gt(0).all()
    # The step correction starts at zero (step 0 is dense search), so only it learns in the first step ...
    assert head.step_query.weight.grad.abs().sum() > 0
    # ... and once it is not zero, the decoder's layers learn too.
    model.zero_grad()
    torch.nn.init.normal_(head.step_query.weight, std=0.1)
    model(**inputs, labels=labels).loss.backward()
    decoder = model.backbone.decoder
    layers = [p for name, p in decoder.named_parameters() if "embed" not in name and "lm_head" not in name]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layers)


# --------------------------------------------------------------------------------------------- save, load, registry
def test_auto_classes_build_the_model():
    config = tester.config(vision=None)
    assert isinstance(AutoModel.from_config(config), GcmrForRetrieval)
    assert AutoConfig.for_model("gcmr").model_type == "gcmr"


@pytest.mark.parametrize("backbone", ["t5", "encoder_decoder"])
def test_save_and_load_give_equal_logits(tmp_path, backbone):
    model = tester.model(backbone=backbone, fusion="coarse_to_fine").eval()
    model.resize_token_embeddings(VOCAB + 7)
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "generation_config.json", "configuration_gcmr.py",
            "modeling_gcmr.py", "fusion_gcmr.py", "prefix_trie_logits_processor.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, GcmrForRetrieval) and loaded.vocab_size == VOCAB + 7
    batch = tester.batch("pixels")
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_missing_and_truncated_weights_give_clear_errors(tmp_path):
    tester.model(vision=None).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="model.safetensors is truncated or corrupt"):
        AutoModel.from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModel.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "shape, vision",
    [((3, 3, 32, 32), "clip"), ((3, 1, IMAGE_SIZE, IMAGE_SIZE), "clip"), ((3, 3, IMAGE_SIZE), "vit")],
)
def test_pixel_values_of_the_wrong_shape_are_rejected(shape, vision):
    model = tester.model(vision=vision).eval()
    batch = tester.batch("text")
    expected = rf"pixel_values must have shape \(batch, 3, {IMAGE_SIZE}, {IMAGE_SIZE}\).*got"
    with pytest.raises(ValueError, match=expected):
        model(**batch, pixel_values=torch.zeros(shape))


def test_bad_image_inputs_are_rejected():
    model = tester.model(vision=None).eval()
    batch = tester.batch("text")
    with pytest.raises(ValueError, match="no vision tower"):
        model(**batch, pixel_values=torch.zeros(3, 3, IMAGE_SIZE, IMAGE_SIZE))
    with pytest.raises(ValueError, match=rf"image_embeds must have shape \(batch, {EMBED_DIM}\)"):
        model(**batch, image_embeds=torch.zeros(3, EMBED_DIM + 1))
    with pytest.raises(ValueError, match="image_mask must have shape"):
        model(**batch, image_embeds=torch.zeros(3, EMBED_DIM), image_mask=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"disagree on the batch size \(\[2, 3\]\)"):
        model(**batch, image_embeds=torch.zeros(2, EMBED_DIM))
    with pytest.raises(ValueError, match="not both"):
        tester.model()(**batch, image_embeds=torch.zeros(3, EMBED_DIM),
                       pixel_values=torch.zeros(3, 3, IMAGE_SIZE, IMAGE_SIZE))


@pytest.mark.parametrize("images", ["pixels", "embeds"])
def test_distillation_teaches_the_rows_whose_query_lives_in_the_feature_space(make_id_tokenizer, images):
    # identifier width = text width, so text queries have a dense teacher; image features given as pixels have
    # none and take no part (they used to crash the default distillation), features of that width do.
    tokenizer = id_tokenizer(make_id_tokenizer)
    features = torch.nn.functional.normalize(torch.randn(len(tokenizer.keys), 16), dim=-1)
    losses = {}
    for weight in (0.0, 10.0):
        torch.manual_seed(0)
        config = tester.config(vision="clip" if images == "pixels" else None, vocab=tokenizer.num_text_tokens,
                               shared_query_space=True, distill_weight=weight, hard_negatives=0, dropout=0.0)
        if images == "embeds":
            config.image_embed_dim = 16
        model = GcmrForRetrieval(config)
        model.set_identifier_vocabulary(tokenizer, init="dense", image_embeds=features.numpy())
        model.store_image_features(features.numpy())
        # At the dense-aware start the student *is* the teacher; move the decoder's step correction off zero.
        torch.nn.init.normal_(model.identifier_head.step_query.weight, std=0.5)
        model.train()
        labels = torch.tensor(tokenizer.encode_identifiers(["img3", "img7", "img1"]))
        batch = dict(tokenizer(["a red circle", "a big star", "two dots"], padding=True, return_tensors="pt"))
        pictures = (torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE) if images == "pixels" else features[[3, 7, 1]])
        image_key = "pixel_values" if images == "pixels" else "image_embeds"
        image_only = model(**{image_key: pictures}, labels=labels).loss
        mixed = model(**batch, **{image_key: pictures}, image_mask=torch.tensor([True, False, True]),
                      labels=labels).loss
        assert torch.isfinite(image_only) and torch.isfinite(mixed)
        mixed.backward()
        losses[weight] = (image_only.item(), mixed.item())
    # KL to the teacher is positive wherever a row is taught: the text row always, image rows only as features.
    assert losses[10.0][1] > losses[0.0][1] + 1e-4
    if images == "pixels":
        assert losses[10.0][0] == pytest.approx(losses[0.0][0], rel=1e-5)
    else:
        assert losses[10.0][0] > losses[0.0][0] + 1e-4
