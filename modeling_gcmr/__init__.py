"""GcmrConfig, GcmrForRetrieval and the prefix-trie LogitsProcessor.

Importing this package registers the "gcmr" model type with AutoConfig, AutoModel and AutoModelForSeq2SeqLM, and
marks the classes for `save_pretrained` to write an `auto_map` and copy the code into the checkpoint; it also
registers the "generative-image-retrieval" task with transformers' pipeline registry.
"""
from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from .configuration_gcmr import GcmrConfig
from .modeling_gcmr import GcmrForRetrieval, GcmrPreTrainedModel, GcmrSeq2SeqOutput
from .model_card_gcmr import build_model_card, extract_usage_snippet
from .pipeline_gcmr import PIPELINE_TASK, GcmrRetrievalPipeline, register_pipeline_in_config, register_retrieval_pipeline
from .prefix_trie_logits_processor import PrefixTrieLogitsProcessor, constrained_retrieve
from .publishing_gcmr import push_retriever_to_hub, save_retriever

AutoConfig.register("gcmr", GcmrConfig, exist_ok=True)
AutoModel.register(GcmrConfig, GcmrForRetrieval, exist_ok=True)
AutoModelForSeq2SeqLM.register(GcmrConfig, GcmrForRetrieval, exist_ok=True)
GcmrConfig.register_for_auto_class()
GcmrForRetrieval.register_for_auto_class("AutoModel")
register_retrieval_pipeline()

# The training and evaluation toolkit pulls in datasets, faiss and matplotlib: import it on first use only.
_LAZY_EXPORTS = {
    "CorpusValidationError": "data_gcmr",
    "load_corpus": "data_gcmr",
    "split_captions": "data_gcmr",
    "make_synthetic_corpus": "synthetic_corpus_gcmr",
    "write_imagefolder": "synthetic_corpus_gcmr",
    "RECALL_METRIC_PATH": "evaluation_gcmr",
    "evaluate_retriever": "evaluation_gcmr",
    "plot_recall_curve": "evaluation_gcmr",
    "retrieval_metrics": "evaluation_gcmr",
    "write_per_query_results": "evaluation_gcmr",
    "DenseIndex": "dual_encoder_gcmr",
    "DualEncoderConfig": "dual_encoder_gcmr",
    "DualEncoderModel": "dual_encoder_gcmr",
    "DualEncoderRetriever": "dual_encoder_gcmr",
    "train_dual_encoder": "dual_encoder_gcmr",
    "compute_image_embeddings": "image_embeddings_gcmr",
    "RetrievalEvalCallback": "training_gcmr",
    "TrainingExamplesConfig": "training_gcmr",
    "apply_lora": "training_gcmr",
    "build_query_examples": "training_gcmr",
    "build_training_examples": "training_gcmr",
    "merge_lora": "training_gcmr",
    "GcmrDataCollator": "collator_gcmr",
    "build_image_processor": "collator_gcmr",
}


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "GcmrConfig",
    "GcmrForRetrieval",
    "GcmrPreTrainedModel",
    "GcmrRetrievalPipeline",
    "GcmrSeq2SeqOutput",
    "PIPELINE_TASK",
    "PrefixTrieLogitsProcessor",
    "build_model_card",
    "constrained_retrieve",
    "extract_usage_snippet",
    "push_retriever_to_hub",
    "register_pipeline_in_config",
    "register_retrieval_pipeline",
    "save_retriever",
    *_LAZY_EXPORTS,
]
