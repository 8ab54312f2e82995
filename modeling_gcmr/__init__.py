"""GcmrConfig, GcmrForRetrieval and the prefix-trie LogitsProcessor.

Importing this package registers the "gcmr" model type with AutoConfig, AutoModel, AutoModelForSeq2SeqLM and
AutoTokenizer (the `ImageIdTokenizer` of `tokenization_gcmr`), marks the classes for `save_pretrained` to write an
`auto_map` and copy the code into the checkpoint, and registers the "generative-image-retrieval" pipeline task.

The flat files of this folder are the ones a checkpoint carries (the Hub copies them). The sub-packages are the
toolkit that never travels: `training/`, `evaluation/`, `dense/`, `publishing/`; their names are imported lazily.
"""
from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer

from tokenization_gcmr.tokenization_gcmr import ImageIdTokenizer

from .configuration_gcmr import GcmrConfig
from .modeling_gcmr import GcmrForRetrieval, GcmrPreTrainedModel, GcmrSeq2SeqOutput
from .pipeline_gcmr import (
    PIPELINE_TASK,
    GcmrRetrievalPipeline,
    register_pipeline_in_config,
    register_retrieval_pipeline,
)
from .prefix_trie_logits_processor import PrefixTrieLogitsProcessor, constrained_generate
from .query_inputs_gcmr import UnusableQueryWarning

AutoConfig.register("gcmr", GcmrConfig, exist_ok=True)
AutoModel.register(GcmrConfig, GcmrForRetrieval, exist_ok=True)
AutoModelForSeq2SeqLM.register(GcmrConfig, GcmrForRetrieval, exist_ok=True)
# Here rather than in tokenization_gcmr, so that package never imports this one: imports flow one way.
AutoTokenizer.register(GcmrConfig, tokenizer_class=ImageIdTokenizer, exist_ok=True)
GcmrConfig.register_for_auto_class()
GcmrForRetrieval.register_for_auto_class("AutoModel")
register_retrieval_pipeline()

# The toolkit pulls in datasets, faiss and matplotlib: import it on first use only.
_LAZY_EXPORTS = {
    "CorpusValidationError": "training.data",
    "load_corpus": "training.data",
    "split_captions": "training.data",
    "make_synthetic_corpus": "training.synthetic",
    "write_imagefolder": "training.synthetic",
    "TrainingExamplesConfig": "training.examples",
    "build_query_examples": "training.examples",
    "build_training_examples": "training.examples",
    "GcmrDataCollator": "training.collator",
    "build_image_processor": "training.collator",
    "RetrievalEvalCallback": "training.callbacks",
    "apply_lora": "training.lora",
    "merge_lora": "training.lora",
    "RECALL_METRIC_PATH": "evaluation.metrics",
    "evaluate_retriever": "evaluation.metrics",
    "retrieval_metrics": "evaluation.metrics",
    "write_per_query_results": "evaluation.metrics",
    "plot_recall_curve": "evaluation.plotting",
    "DenseIndex": "dense.dual_encoder",
    "DualEncoderConfig": "dense.dual_encoder",
    "DualEncoderModel": "dense.dual_encoder",
    "DualEncoderRetriever": "dense.dual_encoder",
    "train_dual_encoder": "dense.dual_encoder",
    "compute_image_embeddings": "dense.image_embeddings",
    "build_model_card": "publishing.model_card",
    "extract_usage_snippet": "publishing.model_card",
    "push_retriever_to_hub": "publishing.checkpoint",
    "save_retriever": "publishing.checkpoint",
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
    "UnusableQueryWarning",
    "constrained_generate",
    "register_pipeline_in_config",
    "register_retrieval_pipeline",
    *_LAZY_EXPORTS,
]
