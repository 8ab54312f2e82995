"""ACE's coarse-to-fine fusion: starts as a no-op, respects the encoder mask, mixes every layer, learns."""
from __future__ import annotations

import functools

import pytest
import torch
from test_modeling import tester

from modeling_gcmr.fusion_gcmr import CoarseToFineFusion

LAYERS, BATCH, STEPS, LENGTH = 3, 2, 4, 6


@functools.cache
def _initialiser():
    return tester.model(fusion="coarse_to_fine", vision=None)


def _fusion(encoder_width: int = 8, decoder_width: int = 8, randomise: bool = True) -> CoarseToFineFusion:
    """A fusion initialised as the model initialises it; `randomise` then gives the zero-started parts values."""
    torch.manual_seed(0)
    fusion = CoarseToFineFusion(LAYERS, encoder_width, decoder_width, num_heads=2)
    fusion.apply(_initialiser()._init_weights)
    if randomise:
        with torch.no_grad():
            for parameter in fusion.parameters():
                parameter.add_(0.3 * torch.randn_like(parameter))
    return fusion


def _inputs(encoder_width: int = 8, decoder_width: int = 8):
    generator = torch.Generator().manual_seed(1)
    decoder = torch.randn(BATCH, STEPS, decoder_width, generator=generator)
    layers = torch.randn(BATCH, LAYERS, LENGTH, encoder_width, generator=generator)
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    mask[0, 4:] = 0
    return decoder, layers, mask


def test_a_new_fusion_is_an_exact_no_op():
    fusion = _fusion(randomise=False)
    decoder, layers, mask = _inputs()
    assert torch.equal(fusion(decoder, layers, mask), decoder)
    # ... but it is not stuck there: the zero-started output projections get gradient
    fusion(decoder, layers, mask).pow(2).sum().backward()
    assert fusion.coarse_attention.out_proj.weight.grad.abs().sum() > 0
    assert fusion.fine_attention.out_proj.weight.grad.abs().sum() > 0


def test_masked_encoder_positions_do_not_matter():
    fusion = _fusion()
    decoder, layers, mask = _inputs()
    before = fusion(decoder, layers, mask)
    changed = layers.clone()
    changed[0, :, 4:] = 100.0
    torch.testing.assert_close(fusion(decoder, changed, mask), before)
    changed[0, :, 1] = 100.0  # a real position: the output must move
    assert not torch.allclose(fusion(decoder, changed, mask)[0], before[0])


def test_every_layer_contributes_and_all_parts_learn():
    fusion = _fusion()
    decoder, layers, mask = _inputs()
    before = fusion(decoder, layers, mask)
    for layer in range(LAYERS):
        changed = layers.clone()
        changed[:, layer] += torch.randn_like(changed[:, layer])
        assert not torch.allclose(fusion(decoder, changed, mask), before), f"layer {layer} is ignored"
    fusion(decoder, layers, mask).pow(2).sum().backward()
    for name, parameter in fusion.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_fine_route_uses_softmax_layer_weights():
    fusion = _fusion()
    decoder, layers, mask = _inputs()
    with torch.no_grad():
        fusion.coarse_attention.out_proj.weight.zero_()
        fusion.coarse_attention.out_proj.bias.zero_()
        fusion.fine_layer_logits.copy_(torch.tensor([0.0, -1e4, -1e4]))  # only layer 0 in the fine route
    only_first = fusion(decoder, layers, mask)
    changed = layers.clone()
    changed[:, 1:] += torch.randn_like(changed[:, 1:])
    torch.testing.assert_close(fusion(decoder, changed, mask), only_first)


def test_projects_encoder_states_to_a_wider_decoder():
    fusion = _fusion(encoder_width=8, decoder_width=12)
    decoder, layers, mask = _inputs(encoder_width=8, decoder_width=12)
    assert fusion(decoder, layers, mask).shape == (BATCH, STEPS, 12)


def test_wrong_layer_count_is_rejected():
    fusion = _fusion()
    decoder, layers, mask = _inputs()
    with pytest.raises(ValueError, match="expects 3 encoder layers, got 2"):
        fusion(decoder, layers[:, :2], mask)


@pytest.mark.parametrize("backbone", ["t5", "encoder_decoder"])
def test_model_fuses_every_encoder_layer(backbone):
    model = tester.model(backbone=backbone, fusion="coarse_to_fine", vision=None).eval()
    batch = tester.batch("embeds")
    encoded = model.get_encoder()(**{k: v for k, v in batch.items() if k != "labels"})
    depth = model.encoder_depth()
    assert encoded.layer_states.shape[:3] == (tester.batch_size, depth, tester.text_length + 2)
    with torch.no_grad():
        for module in (model.fusion.coarse_attention.out_proj, model.fusion.fine_attention.out_proj):
            module.weight.normal_(0, 0.5)
    plain = model(**batch).logits
    first_layer_changed = encoded.layer_states.clone()
    first_layer_changed[:, 0] += torch.randn_like(first_layer_changed[:, 0])
    encoded.layer_states = first_layer_changed
    assert not torch.allclose(model(encoder_outputs=encoded, labels=batch["labels"]).logits, plain)


def test_fusion_needs_all_layer_states():
    model = tester.model(fusion="coarse_to_fine", vision=None).eval()
    batch = tester.batch("text")
    last = model.backbone.get_encoder()(input_ids=batch["input_ids"]).last_hidden_state
    with pytest.raises(ValueError, match="states of every encoder layer"):
        model(encoder_outputs=(last,), labels=batch["labels"])
