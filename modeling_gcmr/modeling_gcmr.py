"""GcmrForRetrieval: a sequence-to-sequence model that answers a query with the identifier of an image.

The query (text through the backbone's encoder; an image through the vision tower or as a precomputed feature)
becomes the decoder's memory and one query vector. The decoder then walks the identifier trie: with the identifier
head (`identifier_head_gcmr.py`) every step scores the trie edges by dot products with a query vector, searched by
`trie_beam_search_gcmr`; with the text head (string/semantic identifiers, format 1 checkpoints) the backbone's LM
head scores the vocabulary and `generate()` runs under `PrefixTrieLogitsProcessor`. Vocabulary fitting lives in
`vocabulary_gcmr.py`, search in `retrieval_gcmr.py`, query validation in `query_inputs_gcmr.py`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForSeq2SeqLM, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput
from transformers.utils.deprecation import deprecate_kwarg

from .atomic_write_gcmr import load_checked, save_staged
from .configuration_gcmr import GcmrConfig
from .encoding_gcmr import FrozenEncoderCache, GcmrEncoderOutput, GcmrImageProjector, identity_init_, pool_text
from .fusion_gcmr import CoarseToFineFusion, FusionCrossAttention
from .identifier_head_gcmr import IdentifierHead
from .pipeline_gcmr import register_pipeline_in_config
from .retrieval_gcmr import retrieve
from .vocabulary_gcmr import check_tokenizer, set_identifier_vocabulary

LABEL_PAD_ID = -100


@dataclass
class GcmrSeq2SeqOutput(ModelOutput):
    """Output of [`GcmrForRetrieval.forward`]; `loss` first so that `Trainer` reads it.

    Args:
        loss: identifier head: cross-entropy over identifiers (plus prefix, distillation and R-Drop terms); text
            head: token cross-entropy (plus R-Drop).
        logits: identifier head: (B, C) the candidates' identifier scores (all identifiers unless sampled); text
            head: (B, T, V) next-token scores (of the first dropout pass under R-Drop).
        cache: the decoder's key/value cache (text head).
        decoder_hidden_states: the decoder's final states (after fusion), when `output_hidden_states`.
        encoder_last_hidden_state: (B, S, D) the decoder's memory.
        encoder_hidden_states: per-layer text-encoder states, when `output_hidden_states`.
        encoder_attention_mask: (B, S) the memory mask, visual slots included.
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


class GcmrMultimodalEncoder(nn.Module):
    """The encoder `generate()` runs once (text head): a view on the model, not a submodule, so weights save once."""

    def __init__(self, model: "GcmrForRetrieval"):
        super().__init__()
        self.__dict__["_model"] = model

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, image_embeds=None, image_mask=None,
                inputs_embeds=None, output_attentions=None, output_hidden_states=None, return_dict=None):
        return self._model.encode(input_ids, attention_mask, pixel_values, image_embeds, image_mask, inputs_embeds,
                                  output_attentions, output_hidden_states)


class GcmrPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading glue shared by the GCMR models."""

    config_class = GcmrConfig
    base_model_prefix = "backbone"
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
        if isinstance(module, nn.Linear):
            start = getattr(module, "gcmr_init", None)
            if start == "identity":
                init.eye_(module.weight)
            elif start == "zeros":
                init.zeros_(module.weight)
            else:
                init.normal_(module.weight, mean=0.0, std=0.02)
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
        elif isinstance(module, IdentifierHead):
            init.normal_(module.start_input, mean=0.0, std=0.02)
            init.constant_(module.log_scale, float(torch.tensor(self.config.score_scale).log()))


class GcmrForRetrieval(GcmrPreTrainedModel, GenerationMixin):
    """Generative cross-modal retriever: query (text, or image) in, image identifier out.

    Args:
        config: a [`GcmrConfig`].

    Call `set_identifier_vocabulary(tokenizer, image_embeds=features)` once before training, train it with
    `transformers.Trainer` on batches of `input_ids`, `attention_mask`, `labels` (identifier ids + EOS, -100
    padded) and, for memorize rows, `image_embeds` or `pixel_values` with an `image_mask`, and search with
    `retrieve(queries, tokenizer)`.
    """

    # The losses average over their own items; Trainer must not pass num_items_in_batch.
    accepts_loss_kwargs = False

    def __init__(self, config: GcmrConfig):
        super().__init__(config)
        self.backbone = AutoModelForSeq2SeqLM.from_config(config.text_config)
        config.text_config = self.backbone.config
        width = config.encoder_hidden_size
        self.vision_tower = self.vision_projector = self.embed_projector = None
        if config.vision_config is not None:
            self.vision_tower = AutoModel.from_config(config.vision_config)
            self.vision_projector = GcmrImageProjector(
                int(config.vision_config.hidden_size), width, config.num_visual_tokens, config.projector)
        if config.image_embed_dim is not None:
            self.embed_projector = GcmrImageProjector(config.image_embed_dim, width, config.num_visual_tokens,
                                                      config.projector)
        self.fusion = None
        if config.fusion == "coarse_to_fine":
            self._check_fusion_backbone()
            self.fusion = CoarseToFineFusion(self._encoder_depth(), width, config.decoder_hidden_size,
                                             config.fusion_num_heads)
        self.query_projection = self.image_query_projection = self.vision_query_projection = None
        self.identifier_head = None
        if not config.images_through_encoder:
            self._build_query_modules(config.identifier_dim or config.image_embed_dim or config.decoder_hidden_size)
        if config.stores_image_features:
            self.register_buffer("image_features", torch.zeros(config.num_identifiers, config.identifier_dim))
        self.encoder_cache = FrozenEncoderCache()
        # Every checkpoint then answers pipeline(task, model=folder, trust_remote_code=True): the relative
        # import above makes save_pretrained copy pipeline_gcmr.py next to this file.
        register_pipeline_in_config(config)
        self.post_init()
        self.generation_config = GenerationConfig(decoder_start_token_id=config.decoder_start_token_id,
                                                  pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id)

    def _build_query_modules(self, dim: int) -> None:
        """Query projections into the identifier space (and the identifier head when the config has one)."""
        config = self.config
        config.identifier_dim = int(dim)
        self.query_projection = _projection(config.encoder_hidden_size, dim, config.shared_query_space)
        if config.image_embed_dim is not None:
            # Identifiers are usually built from these very features: start as the identity when widths agree.
            self.image_query_projection = _projection(config.image_embed_dim, dim, identity=True)
        if config.vision_config is not None:
            self.vision_query_projection = _projection(int(config.vision_config.hidden_size), dim, identity=False)
        if config.identifier_head == "identifier":
            self.identifier_head = IdentifierHead(dim, config.decoder_hidden_size, config.num_identifiers,
                                                  config.num_identifier_edges, config.max_identifier_length,
                                                  config.score_scale)

    # ----------------------------------------------------------------------------------------------- backbone access
    def _is_encoder_decoder_pair(self) -> bool:
        return self.backbone.config.model_type == "encoder-decoder"

    def _check_fusion_backbone(self) -> None:
        if not self._is_encoder_decoder_pair() and not (hasattr(self.backbone, "decoder")
                                                        and hasattr(self.backbone, "lm_head")):
            raise ValueError(
                f"fusion='coarse_to_fine' needs a T5-style backbone (with .decoder and .lm_head) or an "
                f"EncoderDecoderModel; {type(self.backbone).__name__} is neither. Use fusion='none' with this backbone."
            )

    def _encoder_depth(self) -> int:
        text = self.config.text_config
        return int((text.encoder if self._is_encoder_decoder_pair() else text).num_hidden_layers)

    def get_encoder(self, modality: str | None = None) -> nn.Module:
        """The multimodal encoder (text + visual tokens) that `generate()` runs; the vision tower for images."""
        return self.vision_tower if modality in ("image", "video") else GcmrMultimodalEncoder(self)

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

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Resize the input and output token embeddings of the backbone (both halves of an encoder-decoder pair)."""
        self.encoder_cache.clear()
        if self._is_encoder_decoder_pair():
            # EncoderDecoderModel refuses to resize itself; its two halves each can
            self.backbone.decoder.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
            return self.backbone.encoder.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        return self.backbone.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)

    @property
    def vocab_size(self) -> int:
        """Rows of the output embedding (the LM head): the vocabulary the text head can generate."""
        return int(self.get_output_embeddings().weight.shape[0])

    def text_encoder(self) -> nn.Module:
        return self.backbone.get_encoder()

    def freeze_text_encoder(self, frozen: bool = True) -> None:
        """Stop (or restart) training the text encoder. A frozen encoder runs without dropout, and in training its
        states are computed once per distinct query and reused (`encoder_cache`)."""
        self.text_encoder().requires_grad_(not frozen)
        self.encoder_cache.clear()

    def _text_encoder_is_frozen(self) -> bool:
        return not any(parameter.requires_grad for parameter in self.text_encoder().parameters())

    # ----------------------------------------------------------------------------------------- identifier vocabulary
    def set_identifier_vocabulary(self, tokenizer: Any, init: str = "auto", seed: int = 0, *,
                                  image_embeds: Any = None) -> None:
        """Fit the model to `tokenizer`'s identifiers and record its signature.

        Args:
            tokenizer: an `ImageIdTokenizer`.
            init: how the identifier vectors start. `"dense"`: from `image_embeds`, so that before training an
                identifier's score is the inner product of the query with its image's feature (identifier head,
                see `identifier_head_gcmr.py`); `"unit_vectors"`: from the table's centroid/codebook vectors;
                `"random"`; `"auto"` (default): the first of these that the inputs allow.
            seed: seed of random projections and of random vectors.
            image_embeds: (N, D) the image features the identifiers were built from, rows in `tokenizer.keys` order;
                D becomes the identifier space's width.
        """
        set_identifier_vocabulary(self, tokenizer, init=init, image_embeds=image_embeds, seed=seed)
        self.encoder_cache.clear()

    def install_identifier_head(self, paths: torch.Tensor, token_rows: torch.Tensor, num_edges: int,
                                dim: int | None) -> IdentifierHead:
        """(Re)build the identifier head for a trie (and the query projections when the width changes)."""
        config = self.config
        config.identifier_head = "identifier"
        config.num_identifiers, config.num_identifier_edges = int(paths.shape[0]), int(num_edges)
        config.max_identifier_length = int(token_rows.shape[1])
        if config.stores_image_features:
            del self.image_features
            config.stores_image_features = False
        self._build_query_modules(dim or config.identifier_dim)
        for module in (self.query_projection, self.image_query_projection, self.vision_query_projection,
                       self.identifier_head):
            if module is not None:
                module.to(self.device)
                module.apply(self._init_weights)
        self.identifier_head.set_identifiers(paths, token_rows, num_edges)
        return self.identifier_head

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise a ValueError when `tokenizer`'s identifier vocabulary is not the one this model was fitted to."""
        check_tokenizer(self, tokenizer)

    def store_image_features(self, features: Any) -> None:
        """Keep each image's feature (N, identifier_dim; rows in `tokenizer.keys` order) in the checkpoint, for
        `retrieve(rerank=...)` and distillation. Costs identifier_dim floats per image."""
        features = torch.as_tensor(features.detach() if isinstance(features, torch.Tensor) else features,
                                   dtype=torch.float32)
        expected = (self.config.num_identifiers, self.config.identifier_dim)
        if self.config.images_through_encoder or tuple(features.shape) != expected:
            raise ValueError(f"image features must have shape {expected} (one row per identifier, the identifier "
                             f"width) on a format 2 model, got {tuple(features.shape)}")
        if not bool(torch.isfinite(features).all()):
            raise ValueError("image features hold NaN or inf")
        if self.config.stores_image_features:
            del self.image_features
        self.register_buffer("image_features", features.to(self.device))
        self.config.stores_image_features = True

    @property
    def stored_image_features(self) -> torch.Tensor | None:
        """The stored image features (N, identifier_dim), rows in `tokenizer.keys` order, or None."""
        return self.image_features if self.config.stores_image_features else None

    # ---------------------------------------------------------------------------------------------------- encoding
    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        vision = self.config.vision_config
        channels = int(getattr(vision, "num_channels", 3))
        size = getattr(vision, "image_size", None)
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (channels, height, width):
            raise ValueError(
                f"pixel_values must have shape (batch, {channels}, {height}, {width}) for this vision tower "
                f"({vision.model_type}), got {tuple(pixel_values.shape)}; resize/convert the images (RGB, "
                f"{height}x{width}) with the model's image processor"
            )

    def get_image_features(self, pixel_values: torch.FloatTensor | None = None,
                           image_embeds: torch.FloatTensor | None = None,
                           image_mask: torch.BoolTensor | None = None) -> tuple[torch.Tensor, torch.BoolTensor, torch.Tensor | None]:
        """Visual tokens (B, num_visual_tokens, D_enc), the (B,) mask of rows that carry an image, and (format 2) the
        rows' image query vectors (B, D_id), zeros where there is no image.

        The vision tower and projectors run only on the rows with an image; the other rows get zeros.
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
        image_mask = torch.ones(batch, dtype=torch.bool, device=images.device) if image_mask is None else image_mask
        image_mask = image_mask.to(device=images.device, dtype=torch.bool)
        if image_mask.shape != (batch,):
            raise ValueError(f"image_mask must have shape ({batch},), got {tuple(image_mask.shape)}")
        rows = torch.nonzero(image_mask).flatten()
        visual = torch.zeros(batch, self.config.num_visual_tokens, self.config.encoder_hidden_size,
                             device=images.device, dtype=self.dtype)
        queries = None
        if self.query_projection is not None:
            queries = torch.zeros(batch, self.config.identifier_dim, device=images.device, dtype=self.dtype)
        if len(rows):
            if pixel_values is not None:
                tower = self.vision_tower(pixel_values=images[rows].to(self.vision_tower.dtype), return_dict=True)
                pooled = getattr(tower, "pooler_output", None)
                features = pooled if pooled is not None else tower.last_hidden_state[:, 0]
                tokens, query_projection = self.vision_projector(features), self.vision_query_projection
            else:
                features = images[rows].to(self.dtype)
                tokens, query_projection = self.embed_projector(features), self.image_query_projection
                features = features.mean(dim=1) if features.ndim == 3 else features
            visual = visual.index_copy(0, rows, tokens.to(visual.dtype))
            if queries is not None:
                queries = queries.index_copy(0, rows, F.normalize(query_projection(features), dim=-1).to(queries.dtype))
        return visual, image_mask, queries

    def encode(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
               pixel_values: torch.FloatTensor | None = None, image_embeds: torch.FloatTensor | None = None,
               image_mask: torch.BoolTensor | None = None, inputs_embeds: torch.FloatTensor | None = None,
               output_attentions: bool | None = None, output_hidden_states: bool | None = None) -> GcmrEncoderOutput:
        """The decoder's memory and the query vectors: visual tokens first, then the text encoder's states."""
        has_images = pixel_values is not None or image_embeds is not None
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("pass input_ids or inputs_embeds, not both")
        if self.config.images_through_encoder:
            return self._encode_format1(input_ids, attention_mask, pixel_values, image_embeds, image_mask,
                                        inputs_embeds, output_attentions, output_hidden_states)
        if input_ids is None and inputs_embeds is None and not has_images:
            raise ValueError("nothing to encode: pass input_ids (a text query) and/or image_embeds or pixel_values")
        want_layers = self.fusion is not None
        parts, masks, layer_parts = [], [], []
        text_queries = image_queries = image_rows = text_dense = image_dense = None
        if has_images:
            visual, image_rows, image_queries = self.get_image_features(pixel_values, image_embeds, image_mask)
            if image_embeds is not None and image_embeds.shape[-1] == self.config.identifier_dim:
                image_dense = F.normalize((image_embeds.mean(1) if image_embeds.ndim == 3 else image_embeds).float(), dim=-1)
            parts.append(visual)
            masks.append(image_rows[:, None].expand(-1, visual.shape[1]).long())
            if want_layers:
                layer_parts.append(visual[:, None].expand(-1, self._encoder_depth(), -1, -1))
        text = None
        if input_ids is not None or inputs_embeds is not None:
            text = self._encode_text(input_ids, attention_mask, inputs_embeds, want_layers, output_attentions,
                                     output_hidden_states)
            parts.append(text.last_hidden_state)
            masks.append(text.attention_mask.long())
            if want_layers:
                layer_parts.append(text.layer_states)
            text_queries = F.normalize(self.query_projection(text.query_vectors.to(self.dtype)), dim=-1)
            if text.query_vectors.shape[-1] == self.config.identifier_dim:
                text_dense = F.normalize(text.query_vectors.float(), dim=-1)
        batches = {part.shape[0] for part in parts}
        if len(batches) != 1:
            raise ValueError(f"images and text disagree on the batch size ({sorted(batches)}); give one image (or a "
                             "zero row with image_mask False) per text row")
        # A row with an image is a memorize row: the image is its query.
        queries = _by_row(image_rows, image_queries, text_queries)
        dense_known = (not has_images or image_dense is not None) and (text is None or text_dense is not None)
        dense = _by_row(image_rows, image_dense, text_dense) if dense_known else None
        return GcmrEncoderOutput(
            last_hidden_state=torch.cat([part.to(self.dtype) for part in parts], dim=1),
            hidden_states=text.hidden_states if text is not None else None,
            attentions=text.attentions if text is not None else None,
            attention_mask=torch.cat(masks, dim=1),
            layer_states=torch.cat(layer_parts, dim=2) if want_layers else None,
            query_vectors=queries,
            dense_vectors=dense,
            image_rows=image_rows,
        )

    def _encode_text(self, input_ids, attention_mask, inputs_embeds, want_layers, output_attentions,
                     output_hidden_states) -> GcmrEncoderOutput:
        """Text states (and pooled text in `query_vectors`, before the projection); a frozen encoder is run without
        dropout, and in training from the cache."""
        reference = input_ids if input_ids is not None else inputs_embeds
        if attention_mask is None:
            attention_mask = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)
        frozen = self._text_encoder_is_frozen()
        if frozen and self.training and input_ids is not None and not (output_attentions or output_hidden_states):
            return self._encode_text_cached(input_ids, attention_mask, want_layers)
        return self._run_text_encoder(input_ids, attention_mask, inputs_embeds, want_layers, output_attentions,
                                      output_hidden_states, frozen)

    def _run_text_encoder(self, input_ids, attention_mask, inputs_embeds, want_layers, output_attentions,
                          output_hidden_states, frozen) -> GcmrEncoderOutput:
        encoder = self.text_encoder()
        was_training = encoder.training
        if frozen:
            encoder.eval()
        try:
            # Only the given input: some encoders (CLIP's text tower) take no inputs_embeds argument at all.
            given = {"input_ids": input_ids} if input_ids is not None else {"inputs_embeds": inputs_embeds}
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
                out = encoder(**given, attention_mask=attention_mask, return_dict=True,
                              output_hidden_states=want_layers or bool(output_hidden_states),
                              output_attentions=output_attentions)
        finally:
            encoder.train(was_training)
        pooled = pool_text(out.last_hidden_state, attention_mask, self.config.query_pooling,
                           getattr(out, "pooler_output", None))
        return GcmrEncoderOutput(
            last_hidden_state=out.last_hidden_state, attention_mask=attention_mask,
            hidden_states=out.hidden_states if output_hidden_states else None,
            attentions=out.attentions if output_attentions else None,
            layer_states=torch.stack(out.hidden_states[1:], dim=1) if want_layers else None, query_vectors=pooled,
        )

    def _encode_text_cached(self, input_ids, attention_mask, want_layers) -> GcmrEncoderOutput:
        lengths = attention_mask.sum(dim=1).tolist()
        keys = [row[:length].cpu().numpy().tobytes() for row, length in zip(input_ids, lengths)]
        entries = [self.encoder_cache.get(key) for key in keys]
        missing = [row for row, entry in enumerate(entries) if entry is None or (want_layers and len(entry) < 3)]
        if missing:
            width = max(lengths[row] for row in missing)
            computed = self._run_text_encoder(input_ids[missing, :width], attention_mask[missing, :width], None,
                                              want_layers, None, None, frozen=True)
            for position, row in enumerate(missing):
                entry = (computed.last_hidden_state[position, : lengths[row]].cpu(),
                         computed.query_vectors[position].cpu())
                if want_layers:
                    entry += (computed.layer_states[position, :, : lengths[row]].cpu(),)
                self.encoder_cache.put(keys[row], entry)
                entries[row] = entry
        width, device = max(lengths), input_ids.device
        states = torch.zeros(len(keys), width, entries[0][0].shape[-1], device=device)
        layers = torch.zeros(len(keys), self._encoder_depth(), width, states.shape[-1], device=device) if want_layers else None
        for row, entry in enumerate(entries):
            states[row, : lengths[row]] = entry[0]
            if want_layers:
                layers[row, :, : lengths[row]] = entry[2]
        mask = (torch.arange(width, device=device)[None] < torch.tensor(lengths, device=device)[:, None]).long()
        pooled = torch.stack([entry[1] for entry in entries]).to(device)
        return GcmrEncoderOutput(last_hidden_state=states, attention_mask=mask, layer_states=layers,
                                 query_vectors=pooled)

    def _encode_format1(self, input_ids, attention_mask, pixel_values, image_embeds, image_mask, inputs_embeds,
                        output_attentions, output_hidden_states) -> GcmrEncoderOutput:
        """Format 1: visual tokens prepended to the text embeddings and encoded together (checkpoints before 2)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("format 1 checkpoints encode images with a text prompt: pass input_ids")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=inputs_embeds.device)
        if pixel_values is not None or image_embeds is not None:
            visual, image_mask, _ = self.get_image_features(pixel_values, image_embeds, image_mask)
            if visual.shape[0] != batch:
                raise ValueError(f"{visual.shape[0]} images for {batch} text rows; give one (or a zero row) per row")
            inputs_embeds = torch.cat([visual.to(inputs_embeds.dtype), inputs_embeds], dim=1)
            visual_mask = image_mask[:, None].expand(batch, visual.shape[1]).to(attention_mask.dtype)
            attention_mask = torch.cat([visual_mask, attention_mask], dim=1)
        want_layers = self.fusion is not None or bool(output_hidden_states)
        encoded = self.text_encoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      output_hidden_states=want_layers, output_attentions=output_attentions,
                                      return_dict=True)
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

    def decoder_states(self, inputs_embeds: torch.Tensor, encoded: GcmrEncoderOutput, rows: torch.Tensor | None = None,
                       cache: Any = None, use_cache: bool | None = None,
                       attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """The decoder stack (then fusion) on input vectors; `rows` picks each input row's query (beam search, and
        the negatives of training). Returns the final states (B, T, D_dec) and the key/value cache (`use_cache`)."""
        memory, mask, layers = encoded.last_hidden_state, encoded.attention_mask, encoded.layer_states
        use_cache = bool(use_cache)
        if rows is not None:
            memory, mask = memory[rows], mask[rows]
            layers = layers[rows] if layers is not None else None
        if use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        if self._is_encoder_decoder_pair():
            decoder = self.backbone.decoder.base_model
            if hasattr(self.backbone, "enc_to_dec_proj"):
                memory = self.backbone.enc_to_dec_proj(memory)
        else:
            decoder = self.backbone.decoder
        out = decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, encoder_hidden_states=memory,
                      encoder_attention_mask=mask, cache=cache, use_cache=use_cache, return_dict=True)
        states = out.last_hidden_state
        if self.fusion is not None:
            if layers is None:
                raise ValueError("coarse_to_fine fusion needs the states of every encoder layer; pass encoder_outputs "
                                 "made by model.encode() (GcmrEncoderOutput.layer_states)")
            states = self.fusion(states, layers, mask)
        return states, out.cache

    def _text_decode(self, encoded: GcmrEncoderOutput, decoder_input_ids, decoder_attention_mask, cache,
                     use_cache) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """(logits, final decoder states or None, cache) of the text head."""
        if self.fusion is None:
            out = self.backbone(attention_mask=encoded.attention_mask,
                                encoder_outputs=BaseModelOutput(last_hidden_state=encoded.last_hidden_state),
                                decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                                cache=cache, use_cache=use_cache, return_dict=True)
            return out.logits, None, out.cache
        embeddings = self.backbone.get_decoder().get_input_embeddings()
        states, cache = self.decoder_states(embeddings(decoder_input_ids), encoded, cache=cache, use_cache=use_cache,
                                            attention_mask=decoder_attention_mask)
        return self._lm_head(states), states, cache

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
            input_ids / attention_mask: (B, T) the query text (or the memorize prompt); optional for image rows.
            pixel_values: (B, C, H, W) images for the vision tower.
            image_embeds: (B, D) or (B, n, D) precomputed image features.
            image_mask: (B,) bool, the rows that carry an image (default: all rows when images are given).
            labels: (B, L) identifier ids + EOS, -100 padded (`tokenizer.encode_identifiers`); gives `loss`.
            encoder_outputs: a `GcmrEncoderOutput` from `encode()` (as `generate()` passes it), or a tuple /
                `BaseModelOutput` for the plain backbone (then `attention_mask` must already cover every position).
            cache / use_cache: the decoder key/value cache of the text head (`generate()` manages it).
        Other keyword arguments that `generate()` or the Trainer pass along are ignored.
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
            encoder_outputs = self.encode(input_ids, attention_mask, pixel_values, image_embeds, image_mask,
                                          inputs_embeds, output_attentions, output_hidden_states)
        if self.config.identifier_head == "identifier":
            loss, logits, states, consistency = self._identifier_loss(encoder_outputs, labels, rdrop)
            cache = None
        else:
            loss, logits, states, cache, consistency = self._text_loss(
                encoder_outputs, labels, decoder_input_ids, decoder_attention_mask, cache, use_cache, rdrop)
        output = GcmrSeq2SeqOutput(
            loss=loss, logits=logits, cache=cache,
            decoder_hidden_states=states if output_hidden_states else None,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attention_mask=encoder_outputs.attention_mask,
            consistency_loss=consistency,
        )
        return output if return_dict is not False else output.to_tuple()

    def _text_loss(self, encoded, labels, decoder_input_ids, decoder_attention_mask, cache, use_cache, rdrop):
        if labels is not None and decoder_input_ids is None:
            decoder_input_ids = self._shift_right(labels)
        if labels is not None:
            use_cache = False
        logits, states, cache = self._text_decode(encoded, decoder_input_ids, decoder_attention_mask, cache, use_cache)
        loss = consistency = None
        if labels is not None:
            labels = labels.to(logits.device)
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=LABEL_PAD_ID)
            if rdrop:
                first, second = logits.float().chunk(2)
                consistency = _symmetric_kl(first, second, labels.chunk(2)[0] != LABEL_PAD_ID)
                loss = loss + self.config.consistency_weight * consistency
                logits = logits.chunk(2)[0]
        return loss, logits, states, cache if use_cache is not False else None, consistency

    def _identifier_loss(self, encoded, labels, rdrop):
        head = self.identifier_head
        if labels is None:
            # No path to follow: every identifier scored with its step-0 query vector (the decoder-free estimate).
            summed = torch.zeros(head.num_identifiers, head.edge_vectors.shape[1], device=head.edge_vectors.device)
            paths = head.paths.long()
            for depth in range(paths.shape[1]):
                valid = paths[:, depth] >= 0
                summed[valid] += head.edge_vectors[paths[valid, depth]]
            return None, head.scale * encoded.query_vectors @ summed.T, None, None
        gold = head.identifier_index(labels.to(head.paths.device), self.config.eos_token_id)
        paths = head.paths.long()[gold]
        states, _ = self.decoder_states(head.decoder_inputs(paths), encoded)
        base = self._interpolated_queries(encoded, paths)
        candidates, gold_position = head.candidates(gold)
        teacher = self._teacher_scores(encoded, candidates)
        loss, logits = head.loss(head.step_queries(base, states), gold_position, self.config.prefix_loss_weight,
                                 teacher, self.config.distill_weight, candidates)
        if self.config.hard_negatives > 0 and self.training:
            loss = loss + self._hard_negative_loss(encoded, base, logits, gold_position, candidates)
        consistency = None
        if rdrop:
            first, second = logits.float().chunk(2)
            consistency = _symmetric_kl(first[:, None], second[:, None], torch.ones(len(first), 1, device=first.device))
            loss = loss + self.config.consistency_weight * consistency
            logits = logits.chunk(2)[0]
        return loss, logits, states, consistency

    def _hard_negative_loss(self, encoded: GcmrEncoderOutput, base: torch.Tensor, logits: torch.Tensor,
                            gold_position: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
        """Cross-entropy of the gold identifier against the hardest negatives, each scored with its *own* decoder
        states. The softmax over all identifiers scores every candidate with the gold path's query vectors (one
        decoder pass instead of one per identifier); beam search scores each path with its own, and a decoder
        trained on gold prefixes alone learns to boost any path it follows (R@10 rose, R@1 fell on f30k-dev).
        Scoring the negatives that look best under the shared vectors with their own states closes that gap."""
        head = self.identifier_head
        count = min(self.config.hard_negatives, logits.shape[1] - 1)
        with torch.no_grad():
            masked = logits.detach().scatter(1, gold_position[:, None], float("-inf"))
            negatives = masked.topk(count, dim=1).indices
            if candidates is not None:
                negatives = candidates[negatives]
        batch = len(negatives)
        rows = torch.arange(batch, device=negatives.device).repeat_interleave(count)
        paths = head.paths.long()[negatives.flatten()]
        states, _ = self.decoder_states(head.decoder_inputs(paths), encoded, rows=rows)
        queries = head.step_queries(base[rows], states)[:, : paths.shape[1]]
        steps = (queries * head.edge_vectors[paths.clamp(min=0)]).sum(-1) * (paths >= 0)
        negative_scores = (head.scale * steps.sum(1)).view(batch, count)
        gold_scores = logits.gather(1, gold_position[:, None])
        scores = torch.cat([gold_scores, negative_scores], dim=1).float()
        return F.cross_entropy(scores, torch.zeros(batch, dtype=torch.long, device=scores.device))

    def _interpolated_queries(self, encoded: GcmrEncoderOutput, paths: torch.Tensor) -> torch.Tensor:
        """GENIUS's query/target interpolation on a share of the text rows while training."""
        queries, probability = encoded.query_vectors, self.config.interpolation_prob
        if not (self.training and probability > 0):
            return queries
        head = self.identifier_head
        target = (head.edge_vectors[paths.clamp(min=0)] * (paths >= 0)[..., None]).sum(1).detach()
        mix = torch.rand(len(queries), device=queries.device) < probability
        if encoded.image_rows is not None:
            mix &= ~encoded.image_rows
        share = torch.distributions.Beta(2.0, 2.0).sample((len(queries), 1)).to(queries.device)
        mixed = F.normalize(share.sqrt() * queries + (1 - share).sqrt() * F.normalize(target, dim=-1), dim=-1)
        return torch.where(mix[:, None], mixed, queries)

    def _teacher_scores(self, encoded: GcmrEncoderOutput, candidates: torch.Tensor | None) -> torch.Tensor | None:
        """Dense teacher logits for distillation: each query before any learned map against the stored features."""
        if not (self.config.distill_weight > 0 and self.training):
            return None
        if self.stored_image_features is None or encoded.dense_vectors is None:
            raise ValueError("distill_weight > 0 needs stored image features (store_image_features) and queries that "
                             "live in their space (text encoder width = image feature width, or image features)")
        features = self.stored_image_features if candidates is None else self.stored_image_features[candidates]
        return self.config.score_scale * encoded.dense_vectors @ features.T.float()

    def generate(self, *args: Any, **kwargs: Any):
        """`generate()` of the text head; identifier-head models decode with `retrieve()` (trie beam search)."""
        if self.config.identifier_head == "identifier":
            raise ValueError("this model scores identifiers with its identifier head (summed dot products over trie "
                             "edges), which generate() cannot decode: call model.retrieve(queries, tokenizer)")
        return super().generate(*args, **kwargs)

    # --------------------------------------------------------------------------------------------------- retrieval
    def retrieve(self, queries: Any = None, tokenizer: Any = None, top_k: int = 10, num_beams: int | None = None,
                 batch_size: int = 32, *, image_embeds: Any = None, pixel_values: Any = None, prompt: str = "",
                 show_progress: bool | None = None, rerank: str | None = None,
                 rerank_weight: float = 1.0) -> list[list[tuple[str, float]]]:
        """Search: per query, up to `top_k` `(image_key, score)` pairs, best first, no duplicates, all real keys.

        Args:
            queries: a string, or a list / tuple / generator / numpy array of strings (text-to-image). Leave out
                for image queries.
            tokenizer: the `ImageIdTokenizer` saved with this model.
            top_k: hits per query (capped at the number of identifiers).
            num_beams: beam width (default `config.num_beams`; raised to `top_k`, capped at the identifiers).
            batch_size: queries per decoding batch.
            image_embeds: (N, D) or (N, n, D) image features as queries (image-to-image, memorized lookup).
            pixel_values: (N, C, H, W) images as queries.
            prompt: text that accompanies image queries (format 1 checkpoints always encode one).
            show_progress: show a tqdm bar; default when there is more than one batch.
            rerank: None, `"features"` or `"hybrid"`: re-score the beam's candidates with the stored image
                features (see `retrieval_gcmr.py`).
            rerank_weight: weight of the feature score in `"hybrid"`.

        The score is the identifier head's summed dot products (text head: the identifier's log-probability).
        A query without a usable token (only control, zero-width or unknown characters) gets no hits and an
        `UnusableQueryWarning`.
        """
        return retrieve(self, queries, tokenizer, top_k, num_beams, batch_size, image_embeds=image_embeds,
                        pixel_values=pixel_values, prompt=prompt, show_progress=show_progress, rerank=rerank,
                        rerank_weight=rerank_weight)


def _projection(in_dim: int, out_dim: int, identity: bool) -> nn.Linear:
    """A linear map into the identifier space, marked to start as the identity when asked and the widths agree."""
    linear = nn.Linear(in_dim, out_dim)
    if identity and in_dim == out_dim:
        linear.gcmr_init = "identity"
    return linear


def _by_row(image_rows: torch.Tensor | None, image_part: torch.Tensor | None,
            text_part: torch.Tensor | None) -> torch.Tensor | None:
    """Per row: the image's vector where the row carries an image, else the text's."""
    if text_part is None or image_rows is None:
        return image_part if text_part is None else text_part
    return torch.where(image_rows[:, None], image_part.to(text_part.dtype), text_part)


def _twice(x: Any) -> Any:
    return torch.cat([x, x], dim=0) if isinstance(x, torch.Tensor) else x


def _as_encoder_output(encoder_outputs: Any, attention_mask: torch.Tensor | None) -> GcmrEncoderOutput:
    """Accept a GcmrEncoderOutput, a BaseModelOutput or a tuple; fill in the mask from `attention_mask`."""
    if isinstance(encoder_outputs, GcmrEncoderOutput):
        encoded = encoder_outputs
    elif isinstance(encoder_outputs, ModelOutput):
        encoded = GcmrEncoderOutput(last_hidden_state=encoder_outputs.last_hidden_state,
                                    hidden_states=getattr(encoder_outputs, "hidden_states", None),
                                    attentions=getattr(encoder_outputs, "attentions", None))
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
    """(KL(p1||p2) + KL(p2||p1)) / 2, summed over the last axis and averaged over the kept positions."""
    log_p, log_q = torch.log_softmax(first, dim=-1), torch.log_softmax(second, dim=-1)
    per_position = 0.5 * ((log_p.exp() * (log_p - log_q)).sum(-1) + (log_q.exp() * (log_q - log_p)).sum(-1))
    return (per_position * keep).sum() / keep.sum().clamp_min(1)


__all__ = ["GcmrForRetrieval", "GcmrPreTrainedModel", "GcmrSeq2SeqOutput", "GcmrEncoderOutput", "LABEL_PAD_ID"]
