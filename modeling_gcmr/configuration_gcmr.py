"""GcmrConfig: the composite configuration of a generative cross-modal retriever."""
from __future__ import annotations

import os
import re
from typing import Any, Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .config_sizes_gcmr import check_config_values, check_folder_values

FORMAT_VERSION = 2
# Queries of an encoder without a position limit (T5's relative positions) are cut here: T5 was pretrained on
# 512-token inputs, and a longer query only costs memory (a 21k-token query took 21 GB on CPU).
DEFAULT_QUERY_TOKENS = 512
# An auto_map value as transformers unpacks it: "<module file>.<class>", optionally "<repo id>--" before it.
_CLASS_REFERENCE = re.compile(r"^[A-Za-z_]\w*\.[A-Za-z_]\w*$")
_REPO_ID = re.compile(r"^[\w.-]+(?:/[\w.-]+)?$")


@strict
class GcmrConfig(PreTrainedConfig):
    r"""
    Configuration of [`GcmrForRetrieval`]: a sequence-to-sequence backbone that generates image identifiers,
    an optional image tower, and the options of GRACE and ACE/CART.

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the sequence-to-sequence backbone: any config that `AutoModelForSeq2SeqLM.from_config`
            builds. A T5 config (t5-small shape) by default; an `EncoderDecoderConfig` pairs an encoder such as
            BERT/MiniLM with a new decoder that has cross-attention.
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of an image tower built with `AutoModel.from_config` (CLIP vision, ViT or SigLIP vision). `None`
            means images only enter as precomputed `image_embeds`.
        image_embed_dim (`int`, *optional*):
            Width of precomputed `image_embeds` (e.g. 512 for CLIP ViT-B/32 features). `None` means the model takes
            no precomputed features.
        num_visual_tokens (`int`, *optional*, defaults to 4):
            How many encoder input vectors one image becomes; they are prepended to the text tokens. The projector
            maps one feature vector (the tower's pooled output, or `image_embeds`, averaged over its `n` axis when
            it has one) to this many vectors.
        projector (`"linear"` or `"mlp"`, *optional*, defaults to `"mlp"`):
            The map from image features to encoder input vectors: one linear layer, or linear-GELU-linear.
        fusion (`"none"` or `"coarse_to_fine"`, *optional*, defaults to `"none"`):
            `"coarse_to_fine"` adds ACE's fusion of all encoder layers into the decoder output (see
            `fusion_gcmr.py`); `"none"` is the plain backbone (GRACE).
        fusion_num_heads (`int`, *optional*, defaults to 4):
            Attention heads of the fusion cross-attentions; must divide the decoder hidden size.
        consistency_weight (`float`, *optional*, defaults to 0.0):
            Weight of the R-Drop consistency term (bidirectional KL between two dropout passes) added to the
            cross-entropy while training. 0 turns it off (one pass).
        max_identifier_length (`int`, *optional*, defaults to 0):
            Longest identifier in tokens (without EOS), recorded by `set_identifier_vocabulary`; decoding stops
            after it plus EOS. 0 means not set yet.
        identifier_signature (`str`, *optional*):
            Signature of the identifier vocabulary the embeddings were sized for (`tokenizer.identifier_signature`).
            `retrieve()` refuses a tokenizer with a different one.
        num_beams (`int`, *optional*, defaults to 10):
            Default beam width of constrained decoding (10 in GRACE).
        identifier_head (`"identifier"`, `"text"` or `None`, *optional*):
            How identifiers are scored. `None` or `"identifier"`: `set_identifier_vocabulary` gives every id type
            (string and semantic too) the identifier head: an identifier's score is the sum over its steps of the dot
            product between a query vector and the vector of the trie edge taken (see `identifier_head_gcmr.py`),
            decoded by `trie_beam_search_gcmr`. `"text"` (asked for by the user, saved by string/semantic models
            fitted before they moved to the identifier head, implied by format 1): the LM head over the whole
            vocabulary, decoded by `generate()` under `PrefixTrieLogitsProcessor`.
        format_version (`int`, *optional*):
            2 for models made by this version: images enter the decoder memory without passing the text encoder.
            Checkpoints saved before (no `format_version`, an identifier signature set) are 1: images are
            prepended to the text and encoded with it, and the text head scores identifiers.
        identifier_dim (`int`, *optional*):
            Width of the identifier space (query vectors and trie-edge vectors); set by `set_identifier_vocabulary`
            from the image features it is given (else `image_embed_dim`, else the decoder width).
        num_identifiers (`int`, *optional*, defaults to 0):
            Identifiers the identifier head scores (rows of the identifier table); set by `set_identifier_vocabulary`.
        num_identifier_edges (`int`, *optional*, defaults to 0):
            Rows of the identifier head's edge vectors: one per trie edge, fewer with `shared_eos_vector`; set by
            `set_identifier_vocabulary`.
        shared_eos_vector (`bool`, *optional*, defaults to `False`):
            Every forced EOS edge (an identifier that no other identifier extends) scores with one shared vector
            instead of a vector of its own. The edge before such an EOS leads to that identifier alone, so it
            already carries what sets the identifier apart: before training every id type scores exactly as without
            the option, and the checkpoint stores about one vector per image fewer (at a million coarse_fine images
            1.13M edge vectors instead of 2.13M). For large collections (docs/user_guide.md); read by
            `set_identifier_vocabulary` and `add_images`.
        shared_query_space (`bool`, *optional*, defaults to `False`):
            The text encoder already embeds queries in the space of the image features (a CLIP-style text tower with
            its projection, or the sentence encoder the features come from): the query projection starts as the
            identity, so that before any training step 0 of beam search is inner-product search over the identifiers.
        query_pooling (`"mean"`, `"first"` or `"pooler"`, *optional*, defaults to `"mean"`):
            How the text encoder's states become one query vector: the masked mean (sentence-transformers), the first
            token (BERT's [CLS]) or the encoder's own `pooler_output` (CLIP's end-of-text state).
        score_scale (`float`, *optional*, defaults to 20.0):
            Initial inverse temperature of the identifier head's scores (learned).
        prefix_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the per-depth prefix losses, which train the partial sums that beam search prunes with.
        hard_negatives (`int`, *optional*, defaults to 4):
            In training, the identifiers that score best against each query (the gold one aside) are scored again
            with their own decoder states and the gold identifier must beat them: the guard against a decoder that
            boosts paths it was never trained on. 0 turns it off; off by itself for a collection of one identifier.
        interpolation_prob (`float`, *optional*, defaults to 0.0):
            Share of text queries replaced in training by GENIUS's query/target interpolation
            `sqrt(s) q + sqrt(1 - s) p`, `s ~ Beta(2, 2)`, with `p` the target identifier's vector.
        distill_weight (`float`, *optional*, defaults to 0.0):
            Weight of the distillation term from the dense teacher (stored image features against the query's own
            pooled encoding); needs `stores_image_features` and `shared_query_space`.
        stores_image_features (`bool`, *optional*, defaults to `False`):
            The checkpoint keeps each image's feature vector (`store_image_features`), for `retrieve(rerank=...)`
            and distillation; costs `identifier_dim` floats per image.
        max_query_tokens (`int`, *optional*):
            Queries are cut to this many tokens; default: the encoder's position limit, or 512 when it has none (T5).
        pad_token_id (`int`, *optional*):
            Padding id; taken from the text config when not given.
        eos_token_id (`int`, *optional*):
            End-of-identifier id; taken from the text config (or its decoder) when not given.
        decoder_start_token_id (`int`, *optional*):
            First decoder input id; taken from the text config when not given, else the pad id (as in T5).

    Sizes that build the model (layers, widths, heads, vocabularies, identifiers, edges; here and in the
    sub-configs) must be ints within `config_sizes_gcmr.SIZE_CAPS`: 1024 layers; 4096 heads, visual tokens or
    identifier tokens; 2**20 for widths, vocabularies and positions; 2**31 - 1 identifiers or trie edges. Loaded
    from a checkpoint folder, they must also build exactly the shapes its weights file holds (checked on the
    safetensors headers before anything is allocated). An `auto_map` value must be `"<module file>.<class>"`.
    """

    model_type = "gcmr"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="t5"),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model", optional=True),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    image_embed_dim: int | None = None
    num_visual_tokens: int = 4
    projector: Literal["linear", "mlp"] = "mlp"
    fusion: Literal["none", "coarse_to_fine"] = "none"
    fusion_num_heads: int = 4
    consistency_weight: float | int = 0.0
    max_identifier_length: int = 0
    identifier_signature: str | None = None
    num_beams: int = 10
    identifier_head: Literal["identifier", "text"] | None = None
    format_version: int | None = None
    identifier_dim: int | None = None
    num_identifiers: int = 0
    num_identifier_edges: int = 0
    shared_eos_vector: bool = False
    shared_query_space: bool = False
    query_pooling: Literal["mean", "first", "pooler"] = "mean"
    score_scale: float | int = 20.0
    prefix_loss_weight: float | int = 1.0
    hard_negatives: int = 4
    interpolation_prob: float | int = 0.0
    distill_weight: float | int = 0.0
    stores_image_features: bool = False
    max_query_tokens: int | None = None
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    decoder_start_token_id: int | None = None
    is_encoder_decoder: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.format_version is None:
            # Only checkpoints saved before format 2 existed carry a signature without a format version.
            self.format_version = 1 if self.identifier_signature is not None else FORMAT_VERSION
        text = self.text_config
        decoder = self.get_text_config(decoder=True)
        if self.pad_token_id is None:
            self.pad_token_id = _first_int(getattr(text, "pad_token_id", None), getattr(decoder, "pad_token_id", None))
        if self.eos_token_id is None:
            self.eos_token_id = _first_int(getattr(text, "eos_token_id", None), getattr(decoder, "eos_token_id", None))
        if self.decoder_start_token_id is None:
            self.decoder_start_token_id = _first_int(
                getattr(text, "decoder_start_token_id", None),
                getattr(decoder, "decoder_start_token_id", None),
                self.pad_token_id,
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        """`PreTrainedConfig.from_pretrained`; from a checkpoint folder, config.json's sizes are first checked against
        the shapes its weights file holds (`config_sizes_gcmr`), before any config or model is built."""
        folder = pretrained_model_name_or_path
        if isinstance(folder, (str, os.PathLike)) and os.path.isdir(folder):
            check_folder_values(os.path.join(folder, kwargs["subfolder"]) if kwargs.get("subfolder") else folder)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """The backbone's config; for an `EncoderDecoderConfig`, its decoder (or encoder) config.

        `generate()` sizes its cache from this, so it must be a config with `num_hidden_layers`.
        """
        return self.text_config.get_text_config(decoder=decoder, encoder=encoder)

    @property
    def decoder_hidden_size(self) -> int:
        """Hidden size of the decoder stack (what the LM head and the fusion read)."""
        return int(self.get_text_config(decoder=True).hidden_size)

    @property
    def encoder_hidden_size(self) -> int:
        """Hidden size of the encoder stack (what the visual tokens are projected to)."""
        if getattr(self.text_config, "encoder", None) is not None:
            return int(self.text_config.encoder.hidden_size)
        return int(self.text_config.hidden_size)

    @property
    def max_encoder_positions(self) -> int | None:
        """Tokens the encoder takes at most: absolute position embeddings (BERT) or T5's `n_positions`."""
        encoder = getattr(self.text_config, "encoder", None) or self.text_config
        limit = getattr(encoder, "max_position_embeddings", None) or getattr(encoder, "n_positions", None)
        return int(limit) if limit else None

    @property
    def query_token_limit(self) -> int:
        """Tokens a query keeps: `max_query_tokens`, else the encoder's position limit, else `DEFAULT_QUERY_TOKENS`."""
        return int(self.max_query_tokens or self.max_encoder_positions or DEFAULT_QUERY_TOKENS)

    @property
    def images_through_encoder(self) -> bool:
        """Format 1 prepends image tokens to the text and encodes them together; format 2 skips the text encoder."""
        return self.format_version == 1

    def validate_gcmr(self):
        """Part of `@strict` validation: choices and ranges the type hints do not enforce."""
        check_config_values(self.to_dict(), "the config")
        problem = auto_map_problem(getattr(self, "auto_map", None), "config.json")
        if problem:
            raise ValueError(problem)
        if self.projector not in ("linear", "mlp"):
            raise ValueError(f"`projector` must be 'linear' or 'mlp', got {self.projector!r}")
        if self.fusion not in ("none", "coarse_to_fine"):
            raise ValueError(f"`fusion` must be 'none' or 'coarse_to_fine', got {self.fusion!r}")
        if self.num_visual_tokens < 1:
            raise ValueError(f"`num_visual_tokens` must be >= 1, got {self.num_visual_tokens}")
        if self.consistency_weight < 0:
            raise ValueError(f"`consistency_weight` must be >= 0, got {self.consistency_weight}")
        if self.max_identifier_length < 0:
            raise ValueError(f"`max_identifier_length` must be >= 0, got {self.max_identifier_length}")
        if self.num_beams < 1:
            raise ValueError(f"`num_beams` must be >= 1, got {self.num_beams}")
        if self.format_version not in (1, FORMAT_VERSION):
            raise ValueError(f"`format_version` must be 1 or {FORMAT_VERSION}, got {self.format_version}")
        if self.identifier_head == "identifier" and self.format_version == 1:
            raise ValueError("format 1 checkpoints score identifiers with the text head only")
        for name in ("score_scale",):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be > 0, got {getattr(self, name)}")
        for name in ("prefix_loss_weight", "distill_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}")
        if self.hard_negatives < 0:
            raise ValueError(f"`hard_negatives` must be >= 0, got {self.hard_negatives}")
        if not 0 <= self.interpolation_prob <= 1:
            raise ValueError(f"`interpolation_prob` must be in [0, 1], got {self.interpolation_prob}")
        if self.max_query_tokens is not None and self.max_query_tokens < 2:
            raise ValueError(f"`max_query_tokens` must be >= 2 or None, got {self.max_query_tokens}")
        if self.image_embed_dim is not None and self.image_embed_dim < 1:
            raise ValueError(f"`image_embed_dim` must be >= 1 or None, got {self.image_embed_dim}")
        if self.fusion != "none" and self.decoder_hidden_size % self.fusion_num_heads:
            raise ValueError(
                f"`fusion_num_heads` ({self.fusion_num_heads}) must divide the decoder hidden size "
                f"({self.decoder_hidden_size})"
            )


def auto_map_problem(auto_map: Any, file_name: str) -> str | None:
    """Why transformers could not resolve an `auto_map` (the entry and what it must look like), else None."""
    if auto_map is None:
        return None
    if not isinstance(auto_map, dict):
        return f"the auto_map of {file_name} must be a mapping of auto classes to class references, got {auto_map!r}"
    for auto_class, values in auto_map.items():
        for value in values if isinstance(values, (list, tuple)) else [values]:
            parts = value.split("--") if isinstance(value, str) else []
            resolvable = len(parts) in (1, 2) and _CLASS_REFERENCE.match(parts[-1]) and (
                len(parts) == 1 or _REPO_ID.match(parts[0]))
            if value is not None and not resolvable:
                return (f"the auto_map entry {auto_class} = {value!r} of {file_name} cannot be resolved: it must be "
                        "'<module file>.<class>' (e.g. 'modeling_gcmr.GcmrForRetrieval'), the module a .py file "
                        f"next to {file_name} named without its folder or .py (transformers reads only that form, "
                        "optionally with '<repo id>--' before it)")
    return None


def _first_int(*values) -> int | None:
    """The first value that is an int (or a list of ints: its first), cast to a plain int; None if there is none."""
    for value in values:
        if isinstance(value, (list, tuple)) and value:
            value = value[0]
        if value is not None and not isinstance(value, bool):
            return int(value)
    return None


__all__ = ["DEFAULT_QUERY_TOKENS", "FORMAT_VERSION", "GcmrConfig", "auto_map_problem"]
