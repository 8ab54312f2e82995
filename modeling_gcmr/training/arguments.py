"""The command-line arguments of `examples/run_gcmr.py`, as typed dataclasses with help text (HfArgumentParser).

`GcmrTrainingArguments` is `transformers.TrainingArguments` with the package's recommended defaults for a
pretrained text backbone, chosen on f30k-dev (see docs/real_captions.md). Kept in the library so that scripts and
benchmarks parse the same options the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments

from .data import CorpusArguments


@dataclass
class ModelArguments:
    """The model to train: on a pretrained text backbone, a small T5 from scratch, or a checkpoint to continue."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A GCMR checkpoint (folder or Hub id) to continue training; its tokenizer is reused."}
    )
    text_backbone: str | None = field(
        default=None,
        metadata={"help": "A pretrained text model (local folder, or Hub id when online): an encoder (BERT/MiniLM "
                  "style, paired with a new small decoder), a seq2seq model (T5 style) or a CLIP model (its text tower "
                  "and projection). Its tokenizer is the text vocabulary. Default: a small T5 trained from scratch."},
    )
    freeze_text_encoder: bool | None = field(
        default=None, metadata={"help": "Keep the backbone's encoder fixed; default: true for encoder and CLIP backbones."}
    )
    text_tokenizer: str | None = field(
        default=None, metadata={"help": "From scratch: a text tokenizer folder; default: a WordPiece vocabulary trained on the captions."}
    )
    text_vocab_size: int = field(default=2000, metadata={"help": "From scratch: upper bound of the trained vocabulary."})
    image_input: Literal["auto", "embeds", "pixels"] = field(
        default="auto",
        metadata={"help": "'embeds': images enter as precomputed features; 'pixels': through a vision tower trained "
                  "here; 'auto': embeds when the corpus has an image_embeds column, else pixels."},
    )
    d_model: int = field(default=128, metadata={"help": "From scratch: hidden size of the T5 backbone."})
    d_ff: int = field(default=256, metadata={"help": "From scratch: feed-forward size of the T5 backbone."})
    num_layers: int = field(default=2, metadata={"help": "From scratch: encoder (and decoder) layers of the T5 backbone."})
    num_heads: int = field(default=4, metadata={"help": "From scratch: attention heads of the T5 backbone."})
    dropout_rate: float = field(default=0.1, metadata={"help": "From scratch: dropout of the T5 backbone."})
    decoder_layers: int = field(default=1, metadata={"help": "Encoder or CLIP backbone: layers of the new decoder."})
    decoder_intermediate_size: int = field(default=512, metadata={"help": "Encoder or CLIP backbone: decoder feed-forward size."})
    image_size: int | None = field(
        default=None, metadata={"help": "'pixels': input side of the vision tower; default: the corpus images' size."}
    )
    vision_hidden_size: int = field(default=64, metadata={"help": "'pixels': hidden size of the CLIP-style vision tower."})
    vision_layers: int = field(default=2, metadata={"help": "'pixels': layers of the vision tower."})
    vision_patch_size: int = field(default=8, metadata={"help": "'pixels': patch size of the vision tower."})
    num_visual_tokens: int = field(default=4, metadata={"help": "Decoder memory vectors per image."})
    fusion: Literal["none", "coarse_to_fine"] = field(
        default="none", metadata={"help": "'coarse_to_fine' adds ACE's feature fusion; 'none' is GRACE."}
    )
    consistency_weight: float = field(default=0.0, metadata={"help": "Weight of ACE's R-Drop KL term (0 = off)."})
    identifier_init: Literal["auto", "dense", "unit_vectors", "random"] = field(
        default="auto",
        metadata={"help": "Identifier vectors start from the image features ('dense', the default when there are "
                  "features), the table's centroid/codebook vectors, or at random."},
    )
    shared_query_space: Literal["auto", "true", "false"] = field(
        default="auto",
        metadata={"help": "Queries are encoded in the image features' space from the start (identity query "
                  "projection): 'auto' = when the backbone's query width equals the features' width."},
    )
    score_scale: float = field(default=20.0, metadata={"help": "Initial inverse temperature of identifier scores."})
    prefix_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the per-depth prefix losses."})
    shared_eos_vector: bool = field(
        default=False,
        metadata={"help": "Forced EOS edges (identifiers no other extends) share one vector: about one stored vector "
                  "per image fewer, for large collections (GcmrConfig.shared_eos_vector)."},
    )
    interpolation_prob: float = field(
        default=0.0, metadata={"help": "Share of text queries replaced by GENIUS query/target interpolation in training."}
    )
    hard_negatives: int | None = field(
        default=None, metadata={"help": "Negatives per query scored with their own decoder states in training (0 = off); "
                                "default: 4 where the decoder trains, 0 where it is fixed (--decoder_learning_rate 0, "
                                "the default of a dense-aware start), since a fixed decoder gives no state of its own."}
    )
    beam_negatives: int = field(
        default=0, metadata={"help": "Negatives per image mined from the model's own beam on the training captions at "
                             "the start of every epoch, scored like --hard_negatives (0 = off)."})
    beam_negative_queries: int | None = field(
        default=None, metadata={"help": "Mine on an evenly spaced subset of at most this many training captions."})
    distill_weight: float | None = field(
        default=None,
        metadata={"help": "Weight of distillation from the dense teacher (the stored image features against the "
                  "query's own encoding); default: 10 when features are stored and queries share their space, else 0."},
    )
    store_image_features: bool | None = field(
        default=None,
        metadata={"help": "Keep the image features in the checkpoint, for retrieve(rerank=...) and distillation "
                  "(identifier_dim floats per image); default: whenever there are features."},
    )
    max_query_tokens: int | None = field(
        default=None, metadata={"help": "Cut queries to this many tokens (training and search); default: the encoder's limit."}
    )
    num_beams: int = field(default=10, metadata={"help": "Beam width of trie-constrained decoding (GRACE: 10)."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank on the backbone's attention projections; 0 = full fine-tuning."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(
        default="q,v", metadata={"help": "Comma-separated attention projections of the backbone that get LoRA adapters."}
    )


@dataclass
class DataArguments(CorpusArguments):
    """The corpus and held-out queries (see CorpusArguments), and how training examples are drawn from it."""

    image_encoder: str = field(
        default="precomputed",
        metadata={"help": "Image embeddings for identifiers: 'precomputed' (the corpus' image_embeds), 'dual_encoder' "
                  "(train the dense baseline on the corpus and use its image tower), or a CLIP-style model folder."},
    )
    eval_query_file: str | None = field(
        default=None,
        metadata={"help": 'Held-out queries as JSONL rows {"query": ..., "image_key": ...}, instead of captions held '
                  "out of the corpus."},
    )
    max_eval_queries: int | None = field(default=None, metadata={"help": "Evaluate on at most this many queries."})
    schedule: Literal["joint", "sequential"] = field(
        default="joint", metadata={"help": "'joint': mixed batches (GRACE); 'sequential': memorize first, then retrieve."}
    )
    phase_epochs: int = field(default=1, metadata={"help": "'sequential': passes over each phase per Trainer epoch."})
    memorize_ratio: float = field(default=1.0, metadata={"help": "Expected memorize examples per image."})
    retrieve_ratio: float = field(default=1.0, metadata={"help": "Expected retrieve examples per training caption."})
    use_pseudo_queries: bool = field(default=True, metadata={"help": "Use the corpus' pseudo_queries column as extra queries."})
    memorize_prompt: str = field(default="", metadata={"help": "Text given with the image in memorize examples."})
    max_train_minutes: float = field(
        default=0.0, metadata={"help": "End training after this many minutes of training steps (0 = no limit)."}
    )
    baseline: bool = field(default=False, metadata={"help": "Also train and evaluate the dense dual-encoder baseline."})
    baseline_epochs: float = field(default=20.0, metadata={"help": "Training epochs of the dense baseline."})
    baseline_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the dense baseline."})
    baseline_projection_dim: int = field(default=64, metadata={"help": "Width of the dense baseline's shared space."})


@dataclass
class IdentifierArguments:
    """How each image gets its identifier."""

    id_type: Literal["numeric", "string", "semantic", "structured", "atomic", "coarse_fine"] = field(
        default="coarse_fine", metadata={"help": "Identifier type (see tokenization_gcmr.build_identifiers)."}
    )
    id_options: str = field(
        default="{}", metadata={"help": 'JSON object of builder options, e.g. \'{"branching": 10, "leaf_size": 10}\'.'}
    )


@dataclass
class GcmrTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the recommended defaults for a pretrained text backbone (chosen on f30k-dev).

    Models trained from scratch (no --text_backbone) learn their encoder too and want a higher learning rate and
    more epochs (the demo uses --learning_rate 3e-3 --num_train_epochs 60).
    """

    learning_rate: float = field(default=3e-4, metadata={"help": "Peak AdamW learning rate (of every part whose own "
                                                                  "rate below is not set)."})
    edge_learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate of the identifier head's edge vectors (0: fixed); default: "
                                "--learning_rate (a third of it for a dense-aware start whose identifiers are over 8 "
                                "tokens long, such as semantic ids). See modeling_gcmr/training/optimization.py."})
    query_learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate of the query projections (0: fixed); default: --learning_rate "
                                "(a third of it for a dense-aware start with identifiers over 8 tokens)."})
    encoder_learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate of the text encoder and its token embeddings (0: fixed); "
                                "default: --learning_rate (a third of it for a dense-aware start with identifiers over "
                                "8 tokens). A pretrained encoder is frozen unless --freeze_text_encoder false."})
    decoder_learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate of the decoder and every other part (0: fixed); default: "
                                "0 for a dense-aware start (pretrained backbone whose queries share the features' "
                                "space: neither training nor search runs the decoder), else --learning_rate."})
    edge_optimizer_state: str = field(
        default="full", metadata={"help": "The edge vectors' optimizer state. full: AdamW's two moments per value (two "
                                  "more copies of the edge table); row_wise: one second moment and step count per edge "
                                  "vector, no first moment (LazyAdamW), for collections whose moments do not fit in "
                                  "memory. See modeling_gcmr/training/lazy_adamw.py.",
                                  "choices": ["full", "row_wise"]})
    num_train_epochs: float = field(default=4.0, metadata={"help": "Passes over the memorize + retrieve examples."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Training batch size per device."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Queries per decoding batch."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up steps, or a fraction of all steps when < 1."})
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay (0: decay would pull identifier vectors and the identity query projection towards zero)."}
    )
    logging_steps: float = field(default=25, metadata={"help": "Log the loss every this many steps."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Experiment trackers to report to."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False: the collator reads task columns."})
    ddp_broadcast_buffers: bool | None = field(
        default=False,
        metadata={"help": "DDP: re-send the model's buffers from process 0 before every forward. Off: they never change "
                          "in training (identifier paths, stored image features: 2 GB at 1M 512-d images), and DDP "
                          "copies them to every process once when it starts."},
    )


__all__ = ["DataArguments", "GcmrTrainingArguments", "IdentifierArguments", "ModelArguments"]
