"""LoRA on the backbone with peft, keeping every token matrix trainable (identifier tokens are new rows)."""
from __future__ import annotations

from collections.abc import Sequence

from transformers.utils import logging

logger = logging.get_logger(__name__)


def apply_lora(model, r: int = 8, alpha: int = 16, dropout: float = 0.0, target_modules: Sequence[str] = ("q", "v")):
    """Wrap `model.backbone` with peft LoRA adapters on its attention projections; return `model`.

    Only the backbone is wrapped, so GCMR's own new parts (image projectors, vision tower, fusion) keep training
    fully. The token embedding matrices (input embeddings and LM head, tied or not) stay trainable as well: the
    identifier tokens are new rows that no adapter can learn. The Trainer saves the whole model, adapters
    included, so `resume_from_checkpoint` works as usual; `merge_lora` folds the adapters in for publishing.
    """
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules))
    model.backbone = get_peft_model(model.backbone, config)
    # Every token matrix, so an untied LM head (an EncoderDecoder pair) learns the identifier rows too.
    for weight in model.token_embedding_weights():
        weight.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("LoRA r=%d on %s: %d of %d parameters train (%.1f%%)", r, list(target_modules), trainable, total, 100 * trainable / total)
    return model


def merge_lora(model, adapter_dir: str | None = None):
    """Fold the backbone's LoRA adapters into its weights (saving them to `adapter_dir` first, when given); return `model`."""
    from peft import PeftModel

    if not isinstance(model.backbone, PeftModel):
        raise ValueError("the model's backbone has no LoRA adapters to merge (apply_lora was not called)")
    if adapter_dir is not None:
        model.backbone.save_pretrained(adapter_dir, save_embedding_layers=True)
    model.backbone = model.backbone.merge_and_unload()
    return model


__all__ = ["apply_lora", "merge_lora"]
