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
]
