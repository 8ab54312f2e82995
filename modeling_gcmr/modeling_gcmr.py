"""GcmrForRetrieval: a sequence-to-sequence model that answers a query with the identifier of an image.

Over 500 lines, for a reason: this is the model's one public face (config wiring, forward, generate, retrieve, the
collection edits, from_pretrained); each method is a short entry that hands the work to the sibling named for it.

The query (text through the backbone's encoder; an image through the vision tower or as a precomputed feature)
becomes the decoder's memory and one query vector. The decoder then walks the identifier trie: with the identifier
head (`identifier_head_gcmr.py`) every step scores the trie edges by dot products with a query vector, searched by
`trie_beam_search_gcmr` (every id type by default); with the text head (format 1 checkpoints, configs that ask for
it) the backbone's LM head scores the vocabulary and `generate()` runs under `PrefixTrieLogitsProcessor`.
Vocabulary fitting lives in `vocabulary_gcmr.py`, search in `retrieval_gcmr.py`, queries in `query_inputs_gcmr.py`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, AutoModelForSeq2SeqLM, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.utils import ModelOutput
from transformers.utils.deprecation import deprecate_kwarg

from .atomic_write_gcmr import load_checked, save_staged
from .collection_edits_gcmr import add_images, remove_images
from .configuration_gcmr import GcmrConfig
from .encoding_gcmr import (
    FrozenEncoderCache,
    GcmrEncoderOutput,
    GcmrImageProjector,
    as_encoder_output,
    encode_inputs,
    image_inputs,
)
from .fusion_gcmr import CoarseToFineFusion, FusionCrossAttention
from .identifier_head_gcmr import IdentifierHead
from .identifier_loss_gcmr import identifier_head_loss
from .pipeline_gcmr import register_pipeline_in_config
from .query_inputs_gcmr import check_finite_rows
from .prefix_trie_logits_processor import generate_on_trie
from .retrieval_gcmr import retrieve
from .text_head_gcmr import LABEL_PAD_ID, shift_right, text_head_loss
from .vocabulary_gcmr import check_tokenizer, set_identifier_vocabulary

# Standard deviation of new weights (BERT's and T5's convention); projections that must start as the identity or
# at zero are marked on the module instead (`gcmr_init`).
INIT_STD = 0.02


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
                init.normal_(module.weight, mean=0.0, std=INIT_STD)
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
            init.normal_(module.start_input, mean=0.0, std=INIT_STD)
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
        config.validate()  # sizes changed after the config was made are capped too, before anything is allocated
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
            self.fusion = CoarseToFineFusion(self.encoder_depth(), width, config.decoder_hidden_size,
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
    def is_encoder_decoder_pair(self) -> bool:
        return self.backbone.config.model_type == "encoder-decoder"

    def _check_fusion_backbone(self) -> None:
        if not self.is_encoder_decoder_pair() and not (hasattr(self.backbone, "decoder")
                                                        and hasattr(self.backbone, "lm_head")):
            raise ValueError(f"fusion='coarse_to_fine' needs a T5-style backbone (with .decoder and .lm_head) or an "
                             f"EncoderDecoderModel; {type(self.backbone).__name__} is neither. Use fusion='none'.")

    def encoder_depth(self) -> int:
        text = self.config.text_config
        return int((text.encoder if self.is_encoder_decoder_pair() else text).num_hidden_layers)

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
        if self.is_encoder_decoder_pair():
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
        if self.is_encoder_decoder_pair():
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
        states are computed once per distinct query and reused (`encoder_cache`), until the encoder may train again."""
        # Freezing a frozen encoder keeps the cache: its weights cannot have moved since the states were computed
        # (a refresh after every add freezes it again, and would otherwise encode its replayed captions anew).
        keep = frozen and self.text_encoder_is_frozen()
        self.text_encoder().requires_grad_(not frozen)
        if not keep:
            self.encoder_cache.clear()

    def text_encoder_is_frozen(self) -> bool:
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
        if self.config.identifier_head == "text" or self.config.images_through_encoder:  # no feature space there
            raise ValueError("store_image_features needs the identifier head; this model scores identifiers with "
                             "its text head (config.identifier_head='text' or format 1), which has no feature space")
        if tuple(features.shape) != expected:
            raise ValueError(f"image features must have shape {expected} (one row per identifier, the identifier "
                             f"width), got {tuple(features.shape)}")
        check_finite_rows(features, "image features")
        if self.config.stores_image_features:
            del self.image_features
        self.register_buffer("image_features", features.to(self.device))
        self.config.stores_image_features = True

    def add_images(self, keys: Any, tokenizer: Any, image_embeds: Any = None, pixel_values: Any = None, *,
                   captions: Any = None, placement: str = "model") -> None:
        """Add images (`image_embeds` (count, identifier_dim) or `pixel_values`; `captions` for semantic ids) to model
        and tokenizer together, retrievable at once; bad input raises a ValueError and changes nothing (`placement`:
        see `collection_edits_gcmr.py`; `training.refresh.refresh_after_add` fine-tunes after)."""
        add_images(self, keys, tokenizer, image_embeds, pixel_values, captions, placement)

    def remove_images(self, keys: Any, tokenizer: Any) -> None:
        """Remove images: their identifiers can never be generated again (unknown or removed keys: a ValueError)."""
        remove_images(self, keys, tokenizer)

    @property
    def stored_image_features(self) -> torch.Tensor | None:
        """The stored image features (N, identifier_dim), rows in `tokenizer.keys` order, or None."""
        return self.image_features if self.config.stores_image_features else None

    # ---------------------------------------------------------------------------------------------------- encoding
    def get_image_features(self, pixel_values: torch.FloatTensor | None = None,
                           image_embeds: torch.FloatTensor | None = None,
                           image_mask: torch.BoolTensor | None = None) -> tuple[torch.Tensor, torch.BoolTensor, torch.Tensor | None]:
        """Visual tokens (B, num_visual_tokens, D_enc), the (B,) mask of rows that carry an image, and (format 2) the
        rows' image query vectors (B, D_id), zeros where there is no image.

        The vision tower and projectors run only on the rows with an image; the other rows get zeros.
        """
        return image_inputs(self, pixel_values, image_embeds, image_mask)

    def encode(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
               pixel_values: torch.FloatTensor | None = None, image_embeds: torch.FloatTensor | None = None,
               image_mask: torch.BoolTensor | None = None, inputs_embeds: torch.FloatTensor | None = None,
               output_attentions: bool | None = None, output_hidden_states: bool | None = None) -> GcmrEncoderOutput:
        """The decoder's memory and the query vectors: visual tokens first, then the text encoder's states."""
        return encode_inputs(self, input_ids, attention_mask, pixel_values, image_embeds, image_mask, inputs_embeds, output_attentions, output_hidden_states)

    def prepare_decoder_input_ids_from_labels(self, labels: torch.LongTensor) -> torch.LongTensor:
        return shift_right(self, labels)

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
        if self.is_encoder_decoder_pair():
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
            encoder_outputs = as_encoder_output(encoder_outputs, attention_mask)
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
            loss, logits, states, consistency = identifier_head_loss(self, encoder_outputs, labels, rdrop)
            cache = None
        else:
            loss, logits, states, cache, consistency = text_head_loss(self, 
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

    def generate(self, inputs: Any = None, generation_config: Any = None, logits_processor: Any = None, **kwargs: Any):
        """transformers' `generate()` for the text head; with the identifier head, `retrieve()`'s trie beam search
        shaped as its beam-search output (pass `logits_processor=[PrefixTrieLogitsProcessor(tokenizer.prefix_trie)]`).
        Either way a processor built from another tokenizer is refused (`prefix_trie_logits_processor.py`)."""
        return generate_on_trie(self, super().generate, inputs, generation_config, logits_processor, **kwargs)

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
            rerank_weight: weight of the feature score in `"hybrid"`, a finite number from 0 to 100.

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


def _twice(x: Any) -> Any:
    return torch.cat([x, x], dim=0) if isinstance(x, torch.Tensor) else x


__all__ = ["GcmrForRetrieval", "GcmrPreTrainedModel", "GcmrSeq2SeqOutput", "GcmrEncoderOutput", "LABEL_PAD_ID"]
