"""GcmrForRetrieval: a sequence-to-sequence model that answers a query with the identifier of an image.

Images enter the encoder as `num_visual_tokens` vectors prepended to the text embeddings: pixels through the
vision tower (`config.vision_config`) and a projector, or precomputed features (`image_embeds`) through their
own projector. The decoder generates identifier tokens; `retrieve()` decodes them under the tokenizer's
prefix trie (`prefix_trie_logits_processor.constrained_retrieve`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForSeq2SeqLM,
    GenerationConfig,
    GenerationMixin,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.logging import get_logger, tqdm

from .atomic_write_gcmr import MIXED_SAVES_HINT, load_checked, save_staged
from .configuration_gcmr import GcmrConfig
from .fusion_gcmr import CoarseToFineFusion, FusionCrossAttention
from .pipeline_gcmr import register_pipeline_in_config
from .prefix_trie_logits_processor import constrained_retrieve

LABEL_PAD_ID = -100

logger = get_logger(__name__)


@dataclass
class GcmrEncoderOutput(ModelOutput):
    """Output of the multimodal encoder (what `generate()` keeps between decoder steps).

    Args:
        last_hidden_state: (B, S, D) encoder output; S = visual tokens (if any) + text tokens.
        hidden_states: per-layer states, only when `output_hidden_states` was asked for.
        attentions: per-layer attentions, only when `output_attentions` was asked for.
        attention_mask: (B, S) the encoder mask *including* the visual slots; the decoder's cross-attention uses it.
        layer_states: (B, L, S, D) the output of every encoder layer, kept for coarse-to-fine fusion. A tensor (not
            a tuple) so that `generate()` expands it for beam search like the other fields.
    """

    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    attention_mask: torch.LongTensor | None = None
    layer_states: torch.FloatTensor | None = None


@dataclass
class GcmrSeq2SeqOutput(ModelOutput):
    """Output of [`GcmrForRetrieval.forward`]; `loss` first so that `Trainer` reads it.

    Args:
        loss: cross-entropy over the identifier tokens, plus the weighted R-Drop term when it is on.
        logits: (B, T, V) next-token scores (of the first dropout pass under R-Drop).
        cache: the decoder's key/value cache.
        decoder_hidden_states: the decoder's final hidden states after fusion (coarse_to_fine only), when
            `output_hidden_states`.
        encoder_last_hidden_state: (B, S, D) encoder output.
        encoder_hidden_states: per-layer encoder states, when `output_hidden_states`.
        encoder_attention_mask: (B, S) encoder mask including the visual slots.
        consistency_loss: the unweighted symmetric KL between the two dropout passes (R-Drop), when computed.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Any = None
    decoder_hidden_states: torch.FloatTensor | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None
    encoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    encoder_attention_mask: torch.LongTensor | None = None
    consistency_loss: torch.FloatTensor | None = None


class GcmrImageProjector(nn.Module):
    """Maps one image feature vector to `num_tokens` encoder input vectors (linear, or linear-GELU-linear).

    A (B, n, D) input is averaged over n first (several crops or patch features of one image). The output is
    layer-normalised: T5's word embeddings have a standard deviation near 1 while a freshly initialised
    projection gives about 0.02, and visual tokens that small are all but ignored at first, which slows the
    memorize step down several times.
    """

    def __init__(self, in_dim: int, out_dim: int, num_tokens: int, kind: str):
        super().__init__()
        self.in_dim, self.out_dim, self.num_tokens = in_dim, out_dim, num_tokens
        if kind == "linear":
            self.proj = nn.Linear(in_dim, num_tokens * out_dim)
        else:
            self.proj = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, num_tokens * out_dim))
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim == 3:
            features = features.mean(dim=1)
        return self.norm(self.proj(features).view(features.shape[0], self.num_tokens, self.out_dim))


class GcmrMultimodalEncoder(nn.Module):
    """The encoder `generate()` runs once: text embeddings with visual tokens prepended, through the backbone encoder.

    A view on the model, not a module of its own: it is not registered as a submodule, so the weights are saved once.
    """

    def __init__(self, model: "GcmrForRetrieval"):
        super().__init__()
        self.__dict__["_model"] = model

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        image_mask: torch.BoolTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,  # generate() always passes True; the output is always a ModelOutput
    ) -> GcmrEncoderOutput:
        return self._model.encode(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_embeds=image_embeds,
            image_mask=image_mask,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )


class GcmrPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading glue shared by the GCMR models."""

    config_class = GcmrConfig
    base_model_prefix = "gcmr"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any):
        """`PreTrainedModel.from_pretrained`, with errors that name a missing, damaged or mixed-up checkpoint file."""
        return load_checked(super().from_pretrained, cls, pretrained_model_name_or_path, *model_args, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """`PreTrainedModel.save_pretrained`, staged: a kill never leaves a 0-byte or truncated file."""
        return save_staged(super().save_pretrained, save_directory, *args, push=self.push_to_hub, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        # The backbone and the vision tower are PreTrainedModels and initialise themselves; this covers our modules.
        std = 0.02
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, FusionCrossAttention):
            # children are initialised first; zero outputs make a new fusion an exact no-op
            init.zeros_(module.out_proj.weight)
        elif isinstance(module, CoarseToFineFusion):
            init.constant_(module.layer_mix, 1.0 / module.num_layers)
            init.zeros_(module.fine_layer_logits)


class GcmrForRetrieval(GcmrPreTrainedModel, GenerationMixin):
    """Generative cross-modal retriever: query (text, or image) in, image identifier out.

    Args:
        config: a [`GcmrConfig`].

    Train it with `transformers.Trainer` on batches of `input_ids`, `attention_mask`, `labels` (identifier ids +
    EOS, -100 padded) and, for memorize rows, `image_embeds` or `pixel_values` with an `image_mask`. Call
    `set_identifier_vocabulary(tokenizer)` once before training, and `retrieve(queries, tokenizer)` to search.
    """

    # R-Drop averages over label positions itself; Trainer must not pass num_items_in_batch.
    accepts_loss_kwargs = False

    def __init__(self, config: GcmrConfig):
        super().__init__(config)
        self.backbone = AutoModelForSeq2SeqLM.from_config(config.text_config)
        config.text_config = self.backbone.config
        encoder_width = config.encoder_hidden_size

        self.vision_tower = None
        self.vision_projector = None
        if config.vision_config is not None:
            self.vision_tower = AutoModel.from_config(config.vision_config)
            self.vision_projector = GcmrImageProjector(
                int(config.vision_config.hidden_size), encoder_width, config.num_visual_tokens, config.projector
            )
        self.embed_projector = None
        if config.image_embed_dim is not None:
            self.embed_projector = GcmrImageProjector(
                config.image_embed_dim, encoder_width, config.num_visual_tokens, config.projector
            )

        self.fusion = None
        if config.fusion == "coarse_to_fine":
            self._check_fusion_backbone()
            self.fusion = CoarseToFineFusion(
                num_layers=self._encoder_depth(),
                encoder_hidden_size=encoder_width,
                decoder_hidden_size=config.decoder_hidden_size,
                num_heads=config.fusion_num_heads,
            )
        # Every checkpoint then answers pipeline(task, model=folder, trust_remote_code=True): the relative
        # import above makes save_pretrained copy pipeline_gcmr.py next to this file.
        register_pipeline_in_config(config)
        self.post_init()
        self.generation_config = GenerationConfig(
            decoder_start_token_id=config.decoder_start_token_id,
            pad_token_id=config.pad_token_id,
            eos_token_id=config.eos_token_id,
        )

    # ----------------------------------------------------------------------------------------------- backbone access
    def _is_encoder_decoder_pair(self) -> bool:
        return self.backbone.config.model_type == "encoder-decoder"

    def _check_fusion_backbone(self) -> None:
        if self._is_encoder_decoder_pair():
            return
        if not (hasattr(self.backbone, "decoder") and hasattr(self.backbone, "lm_head")):
            raise ValueError(
                f"fusion='coarse_to_fine' needs a T5-style backbone (with .decoder and .lm_head) or an "
                f"EncoderDecoderModel; {type(self.backbone).__name__} is neither. Use fusion='none' with this backbone."
            )

    def _encoder_depth(self) -> int:
        text = self.config.text_config
        encoder_config = text.encoder if self._is_encoder_decoder_pair() else text
        return int(encoder_config.num_hidden_layers)

    def get_encoder(self, modality: str | None = None) -> nn.Module:
        """The multimodal encoder (text + visual tokens) that `generate()` runs; the vision tower for images."""
        if modality in ("image", "video"):
            return self.vision_tower
        return GcmrMultimodalEncoder(self)

    def get_decoder(self) -> nn.Module:
        return self.backbone.get_decoder()

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.backbone.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_output_embeddings(value)

    def token_embedding_weights(self) -> list[torch.Tensor]:
        """Every matrix with one row per token (encoder/decoder input embeddings, LM head), each once."""
        modules = [self.backbone.get_input_embeddings(), self.backbone.get_output_embeddings()]
        if self._is_encoder_decoder_pair():
            modules.append(self.backbone.decoder.get_input_embeddings())
        matrices: dict[int, torch.Tensor] = {}
        for module in modules:
            if module is not None:
                matrices.setdefault(id(module.weight), module.weight)
        return list(matrices.values())

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """Resize the input and output token embeddings of the backbone (both halves of an encoder-decoder pair)."""
        if self._is_encoder_decoder_pair():
            # EncoderDecoderModel refuses to resize itself; its two halves each can
            self.backbone.decoder.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
            return self.backbone.encoder.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        return self.backbone.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)

    @property
    def vocab_size(self) -> int:
        """Rows of the output embedding (the LM head): the vocabulary the model can generate."""
        return int(self.get_output_embeddings().weight.shape[0])

    # ----------------------------------------------------------------------------------------- identifier vocabulary
    def set_identifier_vocabulary(self, tokenizer: Any, init: str = "random", seed: int = 0) -> None:
        """Size the embeddings for `tokenizer` (text vocabulary + identifier tokens) and record its signature.

        Args:
            tokenizer: an `ImageIdTokenizer`.
            init: `"random"` keeps transformers' initialisation of the new rows (mean of the old ones plus noise);
                `"unit_vectors"` sets the rows of identifier tokens that have a centroid/codebook vector
                (`tokenizer.identifier_table.unit_vectors`) to a fixed random projection of it, rescaled to the
                embeddings' standard deviation (AVG-style); rows without one (NaN) keep the random init.
            seed: seed of the fixed projection.
        """
        if init not in ("random", "unit_vectors"):
            raise ValueError(f"init must be 'random' or 'unit_vectors', got {init!r}")
        self.resize_token_embeddings(len(tokenizer))
        if init == "unit_vectors":
            self._init_identifier_rows(tokenizer, seed)
        self.config.identifier_signature = str(tokenizer.identifier_signature)
        self.config.max_identifier_length = int(tokenizer.max_identifier_length)

    @torch.no_grad()
    def _init_identifier_rows(self, tokenizer: Any, seed: int) -> None:
        table = tokenizer.identifier_table
        if table.unit_vectors is None:
            raise ValueError(
                f"init='unit_vectors' needs identifier_table.unit_vectors, but the {table.id_type!r} table has none; "
                "use init='random'"
            )
        vectors = torch.as_tensor(table.unit_vectors, dtype=torch.float32)
        is_new = ~torch.as_tensor(table.unit_is_text, dtype=torch.bool)
        usable = is_new & torch.isfinite(vectors).all(dim=1)
        if not bool(usable.any()):
            return
        units = [table.units[i] for i in torch.nonzero(usable).flatten().tolist()]
        token_ids = torch.as_tensor([int(t) for t in tokenizer.convert_tokens_to_ids(units)], dtype=torch.long)
        generator = torch.Generator().manual_seed(seed)
        for weight in self.token_embedding_weights():
            projection = torch.randn(vectors.shape[1], weight.shape[1], generator=generator)
            rows = vectors[usable] @ projection
            rows = (rows - rows.mean()) / rows.std().clamp_min(1e-12)
            reference = weight[: int(token_ids.min())].float()
            rows = rows * reference.std() + reference.mean()
            weight[token_ids.to(weight.device)] = rows.to(weight.device, weight.dtype)

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise a ValueError when `tokenizer`'s identifier vocabulary is not the one this model was sized for."""
        expected = self.config.identifier_signature
        found = getattr(tokenizer, "identifier_signature", None)
        if found is None:
            raise ValueError(
                f"{type(tokenizer).__name__} has no identifier vocabulary (identifier_signature); pass the "
                "ImageIdTokenizer saved with this model"
            )
        if expected is not None and expected != found:
            raise ValueError(
                f"identifier vocabulary mismatch: the model was trained for signature {expected[:16]}..., the "
                f"tokenizer has {str(found)[:16]}...; load the tokenizer saved with this model (or call "
                f"set_identifier_vocabulary(tokenizer) and retrain). {MIXED_SAVES_HINT}"
            )
        if len(tokenizer) != self.vocab_size:
            raise ValueError(
                f"vocabulary size mismatch: the tokenizer has {len(tokenizer)} tokens, the model's output embedding "
                f"has {self.vocab_size} rows; call model.set_identifier_vocabulary(tokenizer) before training"
            )

    # ---------------------------------------------------------------------------------------------------- encoding
    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        vision = self.config.vision_config
        channels = int(getattr(vision, "num_channels", 3))
        size = getattr(vision, "image_size", None)
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        expected = ("B", channels, height, width)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected[1:]:
            raise ValueError(
                f"pixel_values must have shape (batch, {channels}, {height}, {width}) for this vision tower "
                f"({vision.model_type}), got {tuple(pixel_values.shape)}; resize/convert the images (RGB, "
                f"{height}x{width}) with the model's image processor"
            )

    def get_image_features(
        self,
        pixel_values: torch.FloatTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        image_mask: torch.BoolTensor | None = None,
    ) -> tuple[torch.Tensor, torch.BoolTensor]:
        """Visual tokens (B, num_visual_tokens, D_enc) and the (B,) mask of rows that carry an image.

        The vision tower and projectors run only on the rows with an image; the other rows get zeros (and are
        masked out of attention by the caller).
        """
        if pixel_values is not None and image_embeds is not None:
            raise ValueError("pass either pixel_values or image_embeds for a batch, not both")
        if pixel_values is not None:
            if self.vision_tower is None:
                raise ValueError("this model has no vision tower (config.vision_config is None); pass image_embeds")
            self._check_pixel_values(pixel_values)
            images = pixel_values
        else:
            if self.embed_projector is None:
                raise ValueError("this model takes no image_embeds (config.image_embed_dim is None)")
            if image_embeds.ndim not in (2, 3) or image_embeds.shape[-1] != self.embed_projector.in_dim:
                raise ValueError(
                    f"image_embeds must have shape (batch, {self.embed_projector.in_dim}) or "
                    f"(batch, n, {self.embed_projector.in_dim}), got {tuple(image_embeds.shape)}"
                )
            images = image_embeds
        batch = images.shape[0]
        if image_mask is None:
            image_mask = torch.ones(batch, dtype=torch.bool, device=images.device)
        image_mask = image_mask.to(device=images.device, dtype=torch.bool)
        if image_mask.shape != (batch,):
            raise ValueError(f"image_mask must have shape ({batch},), got {tuple(image_mask.shape)}")
        rows = torch.nonzero(image_mask).flatten()
        width = self.config.encoder_hidden_size
        visual = torch.zeros(batch, self.config.num_visual_tokens, width, device=images.device, dtype=self.dtype)
        if len(rows):
            if pixel_values is not None:
                tower = self.vision_tower(pixel_values=images[rows].to(self.vision_tower.dtype), return_dict=True)
                pooled = getattr(tower, "pooler_output", None)
                features = pooled if pooled is not None else tower.last_hidden_state[:, 0]
                tokens = self.vision_projector(features)
            else:
                tokens = self.embed_projector(images[rows].to(self.dtype))
            visual = visual.index_copy(0, rows, tokens.to(visual.dtype))
        return visual, image_mask

    def encode(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        image_mask: torch.BoolTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> GcmrEncoderOutput:
        """Run the encoder on text (and images): visual tokens first, then the text embeddings."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=inputs_embeds.device)
        if pixel_values is not None or image_embeds is not None:
            visual, image_mask = self.get_image_features(pixel_values, image_embeds, image_mask)
            if visual.shape[0] != batch:
                raise ValueError(f"{visual.shape[0]} images for {batch} text rows; give one (or a zero row) per row")
            inputs_embeds = torch.cat([visual.to(inputs_embeds.dtype), inputs_embeds], dim=1)
            visual_mask = image_mask[:, None].expand(batch, visual.shape[1]).to(attention_mask.dtype)
            attention_mask = torch.cat([visual_mask, attention_mask], dim=1)
        want_layers = self.fusion is not None or bool(output_hidden_states)
        encoded = self.backbone.get_encoder()(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            output_hidden_states=want_layers,
            output_attentions=output_attentions,
            return_dict=True,
        )
        return GcmrEncoderOutput(
            last_hidden_state=encoded.last_hidden_state,
            hidden_states=encoded.hidden_states if output_hidden_states else None,
            attentions=encoded.attentions if output_attentions else None,
            attention_mask=attention_mask,
            layer_states=torch.stack(encoded.hidden_states[1:], dim=1) if self.fusion is not None else None,
        )

    # ---------------------------------------------------------------------------------------------------- decoding
    def _shift_right(self, labels: torch.LongTensor) -> torch.LongTensor:
        shifted = labels.new_full(labels.shape, self.config.pad_token_id)
        shifted[:, 1:] = labels[:, :-1]
        shifted[:, 0] = self.config.decoder_start_token_id
        return shifted.masked_fill(shifted == LABEL_PAD_ID, self.config.pad_token_id)

    def prepare_decoder_input_ids_from_labels(self, labels: torch.LongTensor) -> torch.LongTensor:
        return self._shift_right(labels)

    def _decode(
        self,
        encoded: GcmrEncoderOutput,
        decoder_input_ids: torch.LongTensor,
        decoder_attention_mask: torch.Tensor | None,
        cache: Any,
        use_cache: bool | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """(logits, final decoder states or None, cache)."""
        if self.fusion is None:
            out = self.backbone(
                attention_mask=encoded.attention_mask,
                encoder_outputs=BaseModelOutput(last_hidden_state=encoded.last_hidden_state),
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                cache=cache,
                use_cache=use_cache,
                return_dict=True,
            )
            return out.logits, None, out.cache
        if encoded.layer_states is None:
            raise ValueError(
                "coarse_to_fine fusion needs the states of every encoder layer; pass encoder_outputs made by "
                "model.get_encoder() (GcmrEncoderOutput.layer_states)"
            )
        memory = encoded.last_hidden_state
        if self._is_encoder_decoder_pair():
            decoder_lm = self.backbone.decoder
            decoder_base = decoder_lm.base_model
            if hasattr(self.backbone, "enc_to_dec_proj"):
                memory = self.backbone.enc_to_dec_proj(memory)
        else:
            decoder_base = self.backbone.decoder
        out = decoder_base(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=memory,
            encoder_attention_mask=encoded.attention_mask,
            cache=cache,
            use_cache=use_cache,
            return_dict=True,
        )
        states = self.fusion(out.last_hidden_state, encoded.layer_states, encoded.attention_mask)
        return self._lm_head(states), states, out.cache

    def _lm_head(self, states: torch.Tensor) -> torch.Tensor:
        if self._is_encoder_decoder_pair():
            decoder_lm = self.backbone.decoder
            heads = [m for n, m in decoder_lm.named_children() if n != decoder_lm.base_model_prefix]
            if len(heads) != 1:
                raise ValueError(f"cannot find the LM head of {type(decoder_lm).__name__} (children: {heads})")
            return heads[0](states)
        if getattr(self.backbone.config, "scale_decoder_outputs", False):
            # T5 with tied embeddings rescales before the LM head
            states = states * (self.backbone.config.d_model**-0.5)
        return self.backbone.lm_head(states)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        image_mask: torch.BoolTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: GcmrEncoderOutput | tuple | None = None,
        cache: Any = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs: Any,
    ) -> GcmrSeq2SeqOutput | tuple:
        r"""
        Args:
            input_ids / attention_mask: (B, T) the query text (or the memorize prompt).
            pixel_values: (B, C, H, W) images for the vision tower.
            image_embeds: (B, D) or (B, n, D) precomputed image features.
            image_mask: (B,) bool, the rows that carry an image (default: all rows when images are given).
            labels: (B, L) identifier ids + EOS, -100 padded; gives `loss`.
            encoder_outputs: a `GcmrEncoderOutput` from `get_encoder()` (as `generate()` passes it), or a tuple /
                `BaseModelOutput` for the plain backbone (then `attention_mask` must already cover every position).
            cache / use_cache: the decoder key/value cache (`generate()` manages it).
        Other keyword arguments that `generate()` passes along are ignored.
        """
        if encoder_outputs is not None:
            encoder_outputs = _as_encoder_output(encoder_outputs, attention_mask)
        rdrop = labels is not None and self.training and self.config.consistency_weight > 0
        if rdrop:
            # two dropout passes as one doubled batch
            input_ids, attention_mask, inputs_embeds, labels = map(_twice, (input_ids, attention_mask, inputs_embeds, labels))
            pixel_values, image_embeds, image_mask = map(_twice, (pixel_values, image_embeds, image_mask))
            decoder_input_ids, decoder_attention_mask = map(_twice, (decoder_input_ids, decoder_attention_mask))
            if encoder_outputs is not None:
                encoder_outputs = GcmrEncoderOutput(**{k: _twice(v) for k, v in encoder_outputs.items()})
        if encoder_outputs is None:
            encoder_outputs = self.encode(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=pixel_values,
                image_embeds=image_embeds,
                image_mask=image_mask,
                inputs_embeds=inputs_embeds,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
            )
        if labels is not None and decoder_input_ids is None:
            decoder_input_ids = self._shift_right(labels)
        if labels is not None:
            use_cache = False
        logits, states, cache = self._decode(
            encoder_outputs, decoder_input_ids, decoder_attention_mask, cache, use_cache
        )

        loss = consistency = None
        if labels is not None:
            labels = labels.to(logits.device)
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=LABEL_PAD_ID)
            if rdrop:
                first, second = logits.float().chunk(2)
                consistency = _symmetric_kl(first, second, labels.chunk(2)[0] != LABEL_PAD_ID)
                loss = loss + self.config.consistency_weight * consistency
                logits = logits.chunk(2)[0]
        output = GcmrSeq2SeqOutput(
            loss=loss,
            logits=logits,
            cache=cache if use_cache is not False else None,
            decoder_hidden_states=states if output_hidden_states else None,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attention_mask=encoder_outputs.attention_mask,
            consistency_loss=consistency,
        )
        return output if return_dict is not False else output.to_tuple()

    # --------------------------------------------------------------------------------------------------- retrieval
    @torch.no_grad()
    def retrieve(
        self,
        queries: str | list[str] | None = None,
        tokenizer: Any = None,
        top_k: int = 10,
        num_beams: int | None = None,
        batch_size: int = 32,
        *,
        image_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        prompt: str = "",
        show_progress: bool | None = None,
    ) -> list[list[tuple[str, float]]]:
        """Search: per query, up to `top_k` `(image_key, score)` pairs, best first (score = log-probability).

        Args:
            queries: a string or a list of strings (text-to-image). Leave out for image queries.
            tokenizer: the `ImageIdTokenizer` saved with this model.
            top_k: hits per query.
            num_beams: beam width (default `config.num_beams`; raised to `top_k` when smaller).
            batch_size: queries per `generate()` call.
            image_embeds: (N, D) or (N, n, D) image features as queries (image-to-image, memorized lookup).
            pixel_values: (N, C, H, W) images as queries.
            prompt: the text that accompanies image queries (the memorize prompt used in training).
            show_progress: show a tqdm bar; default when there is more than one batch.
        """
        if tokenizer is None:
            raise ValueError("retrieve() needs the tokenizer saved with this model")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        self.check_tokenizer(tokenizer)
        given = [name for name, value in (("queries", queries), ("image_embeds", image_embeds),
                                          ("pixel_values", pixel_values)) if value is not None]
        if len(given) != 1:
            raise ValueError(f"pass exactly one of queries, image_embeds or pixel_values (got {given or 'none'})")
        if isinstance(queries, str):
            queries = [queries]
        if queries is not None:
            bad = [i for i, q in enumerate(queries) if not isinstance(q, str)]
            if bad:
                raise TypeError(f"queries must be strings; item {bad[0]} is {type(queries[bad[0]]).__name__}")
            blank = [i for i, q in enumerate(queries) if not q.strip()]
            if blank:
                raise ValueError(f"queries must not be empty or whitespace; item {blank[0]} is {queries[blank[0]]!r}")
            total = len(queries)
        else:
            images = image_embeds if image_embeds is not None else pixel_values
            total = images.shape[0]
        starts = range(0, total, batch_size)
        if show_progress is None:
            show_progress = len(starts) > 1
        if show_progress:
            starts = tqdm(starts, desc="retrieve", unit="batch")
        was_training = self.training
        self.eval()
        try:
            results: list[list[tuple[str, float]]] = []
            for start in starts:
                stop = min(start + batch_size, total)
                texts = queries[start:stop] if queries is not None else [prompt] * (stop - start)
                encoded = self._encode_queries(tokenizer, texts, with_images=queries is None)
                inputs = {k: encoded[k].to(self.device) for k in ("input_ids", "attention_mask")}
                if queries is None:
                    key = "image_embeds" if image_embeds is not None else "pixel_values"
                    inputs[key] = images[start:stop].to(self.device, torch.float32)
                results.extend(constrained_retrieve(self, tokenizer, inputs, top_k=top_k, num_beams=num_beams))
            return results
        finally:
            self.train(was_training)


    def _encode_queries(self, tokenizer: Any, texts: list[str], with_images: bool) -> Any:
        """Tokenize queries, cut to what the encoder takes (visual tokens included); say so once when it cuts."""
        limits = [tokenizer.model_max_length]
        positions = self.config.max_encoder_positions
        if positions is not None:
            limits.append(positions - (self.config.num_visual_tokens if with_images else 0))
        limit = min(limits)
        encoded = tokenizer(texts)
        if max(len(ids) for ids in encoded["input_ids"]) <= limit:
            return tokenizer.pad(encoded, return_tensors="pt")
        # Rare: only then tokenize a second time, with truncation.
        logger.warning_once(f"queries longer than the encoder's {limit} tokens are truncated to {limit} tokens")
        return tokenizer(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")


def _twice(x: Any) -> Any:
    return torch.cat([x, x], dim=0) if isinstance(x, torch.Tensor) else x


def _as_encoder_output(encoder_outputs: Any, attention_mask: torch.Tensor | None) -> GcmrEncoderOutput:
    """Accept a GcmrEncoderOutput, a BaseModelOutput or a tuple; fill in the mask from `attention_mask`."""
    if isinstance(encoder_outputs, GcmrEncoderOutput):
        encoded = encoder_outputs
    elif isinstance(encoder_outputs, ModelOutput):
        encoded = GcmrEncoderOutput(
            last_hidden_state=encoder_outputs.last_hidden_state,
            hidden_states=getattr(encoder_outputs, "hidden_states", None),
            attentions=getattr(encoder_outputs, "attentions", None),
        )
    else:
        encoded = GcmrEncoderOutput(last_hidden_state=encoder_outputs[0])
    if encoded.attention_mask is None:
        batch, length = encoded.last_hidden_state.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=encoded.last_hidden_state.device)
        if attention_mask.shape != (batch, length):
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} does not cover the encoder output ({batch}, {length})"
            )
        encoded.attention_mask = attention_mask
    return encoded


def _symmetric_kl(first: torch.Tensor, second: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(KL(p1||p2) + KL(p2||p1)) / 2, summed over the vocabulary and averaged over the kept positions."""
    log_p, log_q = torch.log_softmax(first, dim=-1), torch.log_softmax(second, dim=-1)
    per_position = 0.5 * ((log_p.exp() * (log_p - log_q)).sum(-1) + (log_q.exp() * (log_q - log_p)).sum(-1))
    return (per_position * keep).sum() / keep.sum().clamp_min(1)


__all__ = ["GcmrForRetrieval", "GcmrPreTrainedModel", "GcmrSeq2SeqOutput", "GcmrEncoderOutput"]
