"""Pretrained text backbones for a new retriever: an encoder (BERT/MiniLM), a seq2seq model (T5) or CLIP.

    backbone = load_text_backbone("path/to/all-MiniLM-L6-v2")     # a local folder, or a Hub id when online
    config = GcmrConfig(text_config=backbone.text_config(decoder_layers=2), ...)
    model = GcmrForRetrieval(config)
    backbone.load_weights(model)                                  # after set_identifier_vocabulary

- An **encoder** folder (BERT, MiniLM, RoBERTa, ...) is paired with a new BERT decoder with cross-attention (an
  `EncoderDecoderConfig`); its weights fill the encoder.
- A **seq2seq** folder (T5, BART, ...) is the whole backbone, decoder included.
- A **CLIP** folder gives its text tower as the encoder and its text projection as the query projection, so that
  queries land in CLIP's image space from the first step; pooling is CLIP's own (the end-of-text state).

The folder's tokenizer is the text vocabulary of the retriever.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from huggingface_hub import is_offline_mode
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BertConfig,
    CLIPModel,
    EncoderDecoderConfig,
    PreTrainedConfig,
)

KINDS = ("encoder", "seq2seq", "clip")
# Files that hold a tokenizer's vocabulary, one of which a backbone folder must have.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


class BackboneError(ValueError):
    """A `--text_backbone` that is not a usable model folder (missing files, unsupported kind)."""


@dataclass
class TextBackbone:
    """A pretrained text model to build a retriever on: its kind, config and tokenizer (weights load on demand)."""

    name_or_path: str
    kind: str
    config: PreTrainedConfig
    tokenizer: Any

    @property
    def encoder_config(self) -> PreTrainedConfig:
        """The config of the tower that encodes queries."""
        if self.kind == "clip":
            return self.config.text_config
        return self.config.get_text_config(encoder=True) if self.kind == "seq2seq" else self.config

    @property
    def hidden_size(self) -> int:
        return int(getattr(self.encoder_config, "hidden_size", None) or self.encoder_config.d_model)

    @property
    def query_width(self) -> int:
        """Width of the query vector the backbone itself produces (CLIP: its projection)."""
        return int(self.config.projection_dim) if self.kind == "clip" else self.hidden_size

    @property
    def query_pooling(self) -> str:
        return "pooler" if self.kind == "clip" else "mean"

    def text_config(self, decoder_layers: int = 1, decoder_intermediate_size: int = 512) -> PreTrainedConfig:
        """The `text_config` of a `GcmrConfig`: the seq2seq config, or the encoder paired with a new decoder."""
        special = dict(pad_token_id=self.tokenizer.pad_token_id, eos_token_id=_eos_id(self.tokenizer))
        if self.kind == "seq2seq":
            config = self.config
            config.vocab_size = max(int(config.vocab_size), len(self.tokenizer))
            return config
        width = self.hidden_size
        decoder = BertConfig(
            vocab_size=8,  # the identifier head never reads the decoder's token embeddings
            hidden_size=width,
            num_hidden_layers=decoder_layers,
            num_attention_heads=max(1, width // 64),
            intermediate_size=decoder_intermediate_size,
            max_position_embeddings=64,
            is_decoder=True,
            add_cross_attention=True,
            pad_token_id=0,
        )
        return EncoderDecoderConfig.from_encoder_decoder_configs(
            self.encoder_config, decoder, decoder_start_token_id=0, **special)

    @torch.no_grad()
    def load_weights(self, model: Any) -> None:
        """Copy the pretrained weights into `model` (a `GcmrForRetrieval` built from `text_config()`)."""
        local = {"local_files_only": True} if is_offline_mode() or os.path.isdir(self.name_or_path) else {}
        if self.kind == "seq2seq":
            pretrained = AutoModelForSeq2SeqLM.from_pretrained(self.name_or_path, **local)
            target, state = model.backbone, pretrained.state_dict()
        elif self.kind == "clip":
            pretrained = CLIPModel.from_pretrained(self.name_or_path, **local)
            target, state = model.backbone.encoder, pretrained.text_model.state_dict()
            projection = model.query_projection
            if projection is not None and projection.weight.shape == pretrained.text_projection.weight.shape:
                projection.weight.copy_(pretrained.text_projection.weight)
                projection.bias.zero_()
        else:
            pretrained = AutoModel.from_pretrained(self.name_or_path, **local)
            target, state = model.backbone.encoder, pretrained.state_dict()
        own = target.state_dict()
        # Vocabulary-sized matrices may have grown to the tokenizer; copy the pretrained rows into them.
        for name, value in state.items():
            if name in own and own[name].shape != value.shape and own[name].shape[1:] == value.shape[1:]:
                grown = own[name].clone()
                grown[: value.shape[0]] = value
                state[name] = grown
        missing, unexpected = target.load_state_dict(state, strict=False)
        missing = [name for name in missing if "lm_head" not in name and "position_ids" not in name]
        if missing or unexpected:
            raise BackboneError(f"the weights of {self.name_or_path} do not fit the model built from its config: "
                                f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.encoder_cache.clear()


def load_text_backbone(name_or_path: str) -> TextBackbone:
    """Read a backbone's config and tokenizer; a `BackboneError` names what is wrong with the folder."""
    name = str(name_or_path)
    local = os.path.isdir(name)
    if not local and (os.path.exists(name) or name.startswith((".", "/", "~")) or is_offline_mode()):
        where = "is not a folder" if os.path.exists(name) else "does not exist"
        hint = " (and Hub ids cannot be used offline: HF_HUB_OFFLINE is set)" if is_offline_mode() else ""
        raise BackboneError(f"--text_backbone {name!r} {where}{hint}; pass a local model folder")
    options = {"local_files_only": True} if local or is_offline_mode() else {}
    if local and not os.path.isfile(os.path.join(name, "config.json")):
        raise BackboneError(f"--text_backbone {name!r} is not a model folder: it has no config.json")
    try:
        config = AutoConfig.from_pretrained(name, **options)
    except (OSError, ValueError, KeyError) as error:
        raise BackboneError(f"--text_backbone {name!r}: its config cannot be read ({error})") from error
    kind = _kind(config, name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **options)
    except (OSError, ValueError, TypeError) as error:
        raise BackboneError(f"--text_backbone {name!r} has no usable tokenizer (tokenizer.json / vocab files and "
                            f"tokenizer_config.json): {error}") from error
    # Without tokenizer files transformers builds an empty tokenizer of special tokens only: no usable vocabulary.
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)) or (local and not any(
            os.path.isfile(os.path.join(name, file)) for file in TOKENIZER_FILES)):
        raise BackboneError(f"--text_backbone {name!r} has no usable tokenizer: none of {', '.join(TOKENIZER_FILES)} "
                            "is in the folder; save the model's tokenizer next to it (tokenizer.save_pretrained)")
    if isinstance(tokenizer, bool) or not getattr(tokenizer, "is_fast", False):
        raise BackboneError(f"--text_backbone {name!r}: its tokenizer has no fast (tokenizers) version, which the "
                            "identifier tokenizer wraps")
    return TextBackbone(name, kind, config, tokenizer)


def _kind(config: PreTrainedConfig, name: str) -> str:
    if config.model_type == "clip":
        return "clip"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if getattr(config, "is_decoder", False) or config.model_type in {"gpt2", "llama", "mistral", "qwen2", "gemma"}:
        raise BackboneError(f"--text_backbone {name!r} is a decoder-only model ({config.model_type}); pass an encoder "
                            "(BERT/MiniLM style), a seq2seq model (T5 style) or a CLIP model")
    if not hasattr(config, "hidden_size"):
        raise BackboneError(f"--text_backbone {name!r} ({config.model_type}) is not a text encoder with a hidden_size")
    return "encoder"


def _eos_id(tokenizer: Any) -> int:
    """The token that ends an identifier: the tokenizer's EOS, else its SEP (BERT)."""
    token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if token_id is None:
        raise BackboneError(f"{type(tokenizer).__name__} has neither an EOS nor a SEP token to end identifiers with")
    return int(token_id)


__all__ = ["KINDS", "BackboneError", "TextBackbone", "load_text_backbone"]
