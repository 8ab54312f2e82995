"""The dense baseline: a CLIP-style dual encoder trained with a symmetric InfoNCE loss, and exact faiss search.

Every generative result is reported against it (same corpus, same queries, same `evaluate_retriever`), and its
image tower is a source of image embeddings for identifiers when no pretrained CLIP is available offline.

    retriever = train_dual_encoder(corpus, DualEncoderArguments(), training_args)   # the whole recipe, or by hand:
    model, image_processor = build_dual_encoder(corpus, DualEncoderArguments(), tokenizer)  # DualEncoderConfig inside
    pairs = caption_pairs(corpus)                      # one row per (image, caption)
    Trainer(model, args, train_dataset=pairs, data_collator=DualEncoderCollator(tokenizer, image_processor)).train()
    retriever = DualEncoderRetriever.from_corpus(model, tokenizer, corpus, image_processor)  # exact faiss IndexFlatIP
    evaluate_retriever(retriever.retrieve, queries, gold)

The towers are any transformers encoders built with `AutoModel.from_config`: a BERT-like text encoder (mean
pooled over the attention mask, so it needs no CLS or EOS convention from the tokenizer) and a CLIP vision or ViT
image encoder (its pooled output). `CLIPModel` itself is not reused because it fixes both towers to CLIP's and
pools text at an EOS id that our trained vocabularies do not follow, and it has no path for precomputed
features; its loss is the same. With `image_embed_dim` instead of `vision_config`, images enter as precomputed
feature vectors through a two-layer projector.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import datasets
import faiss
import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoTokenizer,
    BertConfig,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    PreTrainedConfig,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers import initialization as init
from transformers.configuration_utils import SubConfigSpec
from transformers.trainer_utils import SaveStrategy, SchedulerType
from transformers.utils import ModelOutput

from tokenization_gcmr.builders.text_vocabulary import train_text_tokenizer

from .image_embeddings import compute_image_embeddings


@strict
class DualEncoderConfig(PreTrainedConfig):
    r"""
    Configuration of [`DualEncoderModel`], a CLIP-style text-image dual encoder.

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the text encoder, built with `AutoModel.from_config` (BERT by default; any encoder whose output
            has `last_hidden_state`). Its output is mean-pooled over the attention mask.
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the image encoder (CLIP vision by default type; ViT and SigLIP vision work too). `None` means
            images enter only as precomputed `image_embeds`.
        image_embed_dim (`int`, *optional*):
            Width of precomputed image features. Needed when `vision_config` is `None`.
        projection_dim (`int`, *optional*, defaults to 64):
            Width of the shared embedding space both towers project into.
        logit_scale_init_value (`float`, *optional*, defaults to 2.6592):
            Initial log of the inverse temperature (ln(1/0.07), as in CLIP). It is learned, and clamped at ln(100).
    """

    model_type = "gcmr_dual_encoder"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model", optional=True),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    image_embed_dim: int | None = None
    projection_dim: int = 64
    logit_scale_init_value: float | int = 2.6592

    def validate_dual_encoder(self):
        """Part of `@strict` validation: an image input path must exist, widths must be positive."""
        if self.vision_config is None and self.image_embed_dim is None:
            raise ValueError("DualEncoderConfig needs `vision_config` (pixels) or `image_embed_dim` (precomputed features)")
        if self.image_embed_dim is not None and self.image_embed_dim < 1:
            raise ValueError(f"`image_embed_dim` must be >= 1 or None, got {self.image_embed_dim}")
        if self.projection_dim < 1:
            raise ValueError(f"`projection_dim` must be >= 1, got {self.projection_dim}")


@dataclass
class DualEncoderOutput(ModelOutput):
    """Output of [`DualEncoderModel`]: the symmetric InfoNCE loss first, then similarity logits and embeddings.

    `text_embeds` and `image_embeds` are L2-normalised projections, (B, projection_dim).
    `logits_per_text[i, j]` is the scaled similarity of text i and image j; `logits_per_image` its transpose.
    """

    loss: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None


class DualEncoderPreTrainedModel(PreTrainedModel):
    """Weight init and the config class of [`DualEncoderModel`]."""

    config_class = DualEncoderConfig
    base_model_prefix = "dual_encoder"
    main_input_name = "input_ids"

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, DualEncoderModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)


class DualEncoderModel(DualEncoderPreTrainedModel):
    """Text tower + image tower (or feature projector) into one space; `forward` returns the contrastive loss."""

    # forward does not use Trainer's `num_items_in_batch`: the loss is a mean over the in-batch pairs.
    accepts_loss_kwargs = False

    def __init__(self, config: DualEncoderConfig):
        super().__init__(config)
        self.text_model = AutoModel.from_config(config.text_config)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        if config.vision_config is not None:
            self.vision_model = AutoModel.from_config(config.vision_config)
            self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        if config.image_embed_dim is not None:
            self.embeds_projection = nn.Sequential(
                nn.Linear(config.image_embed_dim, config.projection_dim),
                nn.GELU(),
                nn.Linear(config.projection_dim, config.projection_dim),
            )
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.post_init()

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised text embeddings, (B, projection_dim)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return F.normalize(self.text_projection(pooled), dim=-1)

    def encode_images(
        self, pixel_values: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """L2-normalised image embeddings, (B, projection_dim), from pixels or from precomputed features."""
        if (pixel_values is None) == (image_embeds is None):
            raise ValueError("pass exactly one of `pixel_values` and `image_embeds`")
        if image_embeds is not None:
            if self.config.image_embed_dim is None:
                raise ValueError("this model has no `image_embed_dim`: it takes `pixel_values`, not `image_embeds`")
            if image_embeds.shape[-1] != self.config.image_embed_dim:
                raise ValueError(
                    f"`image_embeds` have width {image_embeds.shape[-1]}, the model expects {self.config.image_embed_dim}"
                )
            projected = self.embeds_projection(image_embeds.to(self.embeds_projection[0].weight.dtype))
        else:
            if self.config.vision_config is None:
                raise ValueError("this model has no vision tower (`vision_config` is None): pass `image_embeds`")
            outputs = self.vision_model(pixel_values=pixel_values.to(self.visual_projection.weight.dtype))
            pooled = getattr(outputs, "pooler_output", None)
            if pooled is None:
                pooled = outputs.last_hidden_state.mean(dim=1)
            projected = self.visual_projection(pooled)
        return F.normalize(projected, dim=-1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        return_loss: bool = True,
        **kwargs: Any,
    ) -> DualEncoderOutput:
        """Embed whatever is given; with both texts and images (row i of each a pair), also the InfoNCE loss."""
        text = self.encode_text(input_ids, attention_mask) if input_ids is not None else None
        has_images = pixel_values is not None or image_embeds is not None
        image = self.encode_images(pixel_values, image_embeds) if has_images else None
        if text is None or image is None:
            return DualEncoderOutput(text_embeds=text, image_embeds=image)
        # Clamped as in CLIP: an unbounded temperature makes training unstable.
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        logits_per_text = scale * text @ image.t()
        loss = None
        if return_loss:
            targets = torch.arange(len(text), device=text.device)
            loss = (F.cross_entropy(logits_per_text, targets) + F.cross_entropy(logits_per_text.t(), targets)) / 2
        return DualEncoderOutput(
            loss=loss,
            logits_per_text=logits_per_text,
            logits_per_image=logits_per_text.t(),
            text_embeds=text,
            image_embeds=image,
        )


def caption_pairs(corpus: datasets.Dataset) -> datasets.Dataset:
    """One row per (image, caption) of a `load_corpus` dataset: `image_key`, `caption` and the image column(s)."""
    image_columns = [c for c in ("image", "image_embeds") if c in corpus.column_names]

    def explode(batch: dict[str, list]) -> dict[str, list]:
        counts = [len(c) for c in batch["captions"]]
        out = {"caption": [c for captions in batch["captions"] for c in captions]}
        for column in ["image_key", *image_columns]:
            out[column] = [value for value, count in zip(batch[column], counts) for _ in range(count)]
        return out

    keep = ["image_key", *image_columns]
    return corpus.select_columns(keep + ["captions"]).map(
        explode, batched=True, remove_columns=keep + ["captions"], desc="caption pairs"
    )


class DualEncoderCollator:
    """Batches `caption_pairs` rows (or any rows with `caption` and `image`/`image_embeds`) for `DualEncoderModel`.

    With an `image_processor` (e.g. `CLIPImageProcessorPil`) and an `image` column, images become `pixel_values`;
    otherwise the `image_embeds` column is used. Use `TrainingArguments(remove_unused_columns=False)`.
    """

    def __init__(self, tokenizer, image_processor=None, max_length: int = 64):
        self.tokenizer, self.image_processor, self.max_length = tokenizer, image_processor, max_length

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor | bool]:
        batch: dict[str, Any] = dict(
            self.tokenizer(
                [f["caption"] for f in features],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
                return_token_type_ids=False,
            )
        )
        if self.image_processor is not None and "image" in features[0]:
            images = [f["image"].convert("RGB") for f in features]
            batch["pixel_values"] = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        elif "image_embeds" in features[0]:
            batch["image_embeds"] = torch.tensor(np.asarray([f["image_embeds"] for f in features], dtype=np.float32))
        else:
            raise ValueError("rows need `image_embeds`, or `image` together with an image_processor")
        batch["return_loss"] = True
        return batch


class DenseIndex:
    """Exact inner-product search (faiss `IndexFlatIP`) over L2-normalised image embeddings, i.e. cosine."""

    def __init__(self, keys: Sequence[str], embeddings: np.ndarray):
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or len(keys) != len(embeddings):
            raise ValueError(f"need one embedding row per key: {len(keys)} keys, embeddings of shape {embeddings.shape}")
        if len(set(keys)) != len(keys):
            raise ValueError("DenseIndex keys must be unique")
        self.keys = list(keys)
        faiss.normalize_L2(embeddings)
        self.index = faiss.IndexFlatIP(embeddings.shape[1])
        self.index.add(embeddings)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def embeddings(self) -> np.ndarray:
        """The indexed (L2-normalised) image embeddings, float32 (N, D), in key order."""
        return self.index.reconstruct_n(0, self.index.ntotal)

    def search(self, queries: np.ndarray, top_k: int = 10) -> list[list[tuple[str, float]]]:
        """The `top_k` nearest keys of each query row with cosine scores, best first."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.index.d:
            raise ValueError(f"queries must be (n, {self.index.d}), got shape {queries.shape}")
        faiss.normalize_L2(queries)
        scores, rows = self.index.search(queries, min(top_k, len(self.keys)))
        return [[(self.keys[r], float(s)) for r, s in zip(row, score) if r >= 0] for row, score in zip(rows, scores)]


class DualEncoderRetriever:
    """A trained `DualEncoderModel` with its tokenizer, image processor and a `DenseIndex` over a corpus.

    `retrieve(queries, top_k)` plugs into `evaluate_retriever`; `save_pretrained` writes model, tokenizer and image
    processor to one folder, and `from_pretrained(folder, corpus)` loads them and indexes `corpus` again.
    """

    def __init__(self, model: DualEncoderModel, tokenizer, index: DenseIndex, image_processor=None, max_length: int = 64):
        self.model, self.tokenizer, self.index = model, tokenizer, index
        self.image_processor, self.max_length = image_processor, max_length

    @classmethod
    def from_corpus(
        cls, model: DualEncoderModel, tokenizer, corpus: datasets.Dataset, image_processor=None,
        max_length: int = 64, batch_size: int = 64,
    ) -> "DualEncoderRetriever":
        """Embed every image of `corpus` with `model` and index them under their `image_key`."""
        embeddings = compute_image_embeddings(corpus, model, batch_size=batch_size, image_processor=image_processor)
        return cls(model, tokenizer, DenseIndex(corpus["image_key"], embeddings), image_processor, max_length)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, corpus: datasets.Dataset, max_length: int = 64) -> "DualEncoderRetriever":
        """Load a folder written by `save_pretrained` (local files only) and index `corpus` with it."""
        model = DualEncoderModel.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        image_processor = None
        if model.config.vision_config is not None:
            image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        return cls.from_corpus(model, tokenizer, corpus, image_processor, max_length)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write model (safetensors), tokenizer and image processor into `path`."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(path)

    @torch.no_grad()
    def retrieve(self, queries: Sequence[str], top_k: int = 10) -> list[list[tuple[str, float]]]:
        """Up to `top_k` `(image_key, cosine)` pairs per query, best first."""
        self.model.eval()
        encoded = self.tokenizer(
            list(queries),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_token_type_ids=False,
        ).to(self.model.device)
        text = self.model.encode_text(encoded["input_ids"], encoded["attention_mask"])
        return self.index.search(text.float().cpu().numpy(), top_k)


@dataclass
class DualEncoderArguments:
    """Sizes and inputs of the dense baseline built by `build_dual_encoder` (usable with `HfArgumentParser`)."""

    image_input: Literal["auto", "pixels", "embeds"] = field(
        default="auto",
        metadata={"help": "'pixels': a CLIP vision tower on the images; 'embeds': a projector on `image_embeds`; "
                  "'auto': pixels when the corpus has images, else embeds."},
    )
    text_vocab_size: int = field(default=2000, metadata={"help": "Upper bound of the WordPiece vocabulary trained on the captions."})
    hidden_size: int = field(default=64, metadata={"help": "Hidden size of both towers."})
    num_layers: int = field(default=2, metadata={"help": "Transformer layers of each tower."})
    num_heads: int = field(default=2, metadata={"help": "Attention heads of each tower."})
    image_size: int = field(default=32, metadata={"help": "'pixels': images are resized to this square side."})
    patch_size: int = field(default=8, metadata={"help": "'pixels': patch side of the vision tower."})
    projection_dim: int = field(default=64, metadata={"help": "Width of the shared embedding space."})
    max_length: int = field(default=32, metadata={"help": "Longest caption in tokens; longer ones are truncated."})


@dataclass
class DualEncoderTrainingArguments(TrainingArguments):
    """`TrainingArguments` with defaults that train the tiny baseline well on a few hundred images on a CPU.

    No checkpoints or reports by default; `remove_unused_columns=False` because the collator reads columns that
    `forward` does not name. Every field can still be set (or parsed by `HfArgumentParser`).
    """

    output_dir: str | None = field(default=None, metadata={"help": "Where to write; default: a new temporary folder."})
    num_train_epochs: float = field(default=30.0, metadata={"help": "Passes over the (image, caption) pairs."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Pairs per batch: the in-batch negatives."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak AdamW learning rate."})
    warmup_steps: float = field(default=0.1, metadata={"help": "Warm-up steps, or a fraction of all steps when < 1."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: SchedulerType | str = field(default="cosine", metadata={"help": "Learning-rate schedule after warm-up."})
    save_strategy: SaveStrategy | str = field(default="no", metadata={"help": "Checkpoint strategy; the final model is saved anyway."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Experiment trackers to report to."})
    logging_steps: float = field(default=50, metadata={"help": "Log the loss every this many steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False for DualEncoderCollator."})

    def __post_init__(self):
        if self.output_dir is None:
            self.output_dir = tempfile.mkdtemp(prefix="gcmr-dual-encoder-")
        super().__post_init__()


def build_dual_encoder(
    corpus: datasets.Dataset, args: DualEncoderArguments, tokenizer
) -> tuple[DualEncoderModel, Any]:
    """A new baseline sized by `args` for `corpus` and `tokenizer`; returns (model, image processor or None)."""
    image_input = args.image_input
    if image_input == "auto":
        image_input = "pixels" if "image" in corpus.column_names else "embeds"
    needed = "image" if image_input == "pixels" else "image_embeds"
    if needed not in corpus.column_names:
        raise ValueError(f"image_input={image_input!r} needs a corpus column {needed!r}; it has {corpus.column_names}")
    text_config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        intermediate_size=4 * args.hidden_size,
        max_position_embeddings=max(64, args.max_length),
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    vision_config, image_embed_dim, image_processor = None, None, None
    if image_input == "pixels":
        vision_config = CLIPVisionConfig(
            hidden_size=args.hidden_size,
            intermediate_size=4 * args.hidden_size,
            num_hidden_layers=args.num_layers,
            num_attention_heads=args.num_heads,
            image_size=args.image_size,
            patch_size=args.patch_size,
        )
        # The PIL backend: the default one needs torchvision, which has no CPU wheel here.
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": args.image_size}, crop_size={"height": args.image_size, "width": args.image_size}
        )
    else:
        image_embed_dim = len(corpus[0]["image_embeds"])
    config = DualEncoderConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_embed_dim=image_embed_dim,
        projection_dim=args.projection_dim,
    )
    return DualEncoderModel(config), image_processor


def train_dual_encoder(
    corpus: datasets.Dataset,
    args: DualEncoderArguments | None = None,
    training_args: TrainingArguments | None = None,
    *,
    tokenizer=None,
    seed: int = 0,
) -> DualEncoderRetriever:
    """Train the dense baseline on every (image, caption) pair of `corpus` and index the corpus images with it.

    Without `tokenizer` a WordPiece vocabulary is trained on the corpus captions. Without `training_args`,
    `DualEncoderTrainingArguments(seed=seed)` is used in a temporary folder that is removed afterwards.
    """
    if training_args is None:
        # Nothing is saved by default, so the scratch folder goes away with the training run.
        with tempfile.TemporaryDirectory(prefix="gcmr-dual-encoder-") as scratch:
            scratch_args = DualEncoderTrainingArguments(output_dir=scratch, seed=seed)
            return train_dual_encoder(corpus, args, scratch_args, tokenizer=tokenizer, seed=seed)
    args = args or DualEncoderArguments()
    if training_args.remove_unused_columns:
        # The collator reads `caption` and the image column, which forward does not name.
        training_args = dataclasses.replace(training_args, remove_unused_columns=False)
    if tokenizer is None:
        tokenizer = train_text_tokenizer(
            (c for captions in corpus["captions"] for c in captions), vocab_size=args.text_vocab_size
        )
    set_seed(training_args.seed)
    model, image_processor = build_dual_encoder(corpus, args, tokenizer)
    pairs = caption_pairs(corpus)
    if image_processor is None and "image" in pairs.column_names:
        pairs = pairs.remove_columns("image")  # embeds only: do not decode images for nothing
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=pairs,
        data_collator=DualEncoderCollator(tokenizer, image_processor, max_length=args.max_length),
    )
    trainer.train()
    return DualEncoderRetriever.from_corpus(
        model, tokenizer, corpus, image_processor, max_length=args.max_length,
        batch_size=training_args.per_device_eval_batch_size,
    )


__all__ = [
    "DenseIndex",
    "DualEncoderArguments",
    "DualEncoderCollator",
    "DualEncoderConfig",
    "DualEncoderModel",
    "DualEncoderOutput",
    "DualEncoderPreTrainedModel",
    "DualEncoderRetriever",
    "DualEncoderTrainingArguments",
    "build_dual_encoder",
    "caption_pairs",
    "train_dual_encoder",
]
