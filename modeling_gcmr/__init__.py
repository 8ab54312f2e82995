"""GcmrConfig, GcmrForRetrieval and the prefix-trie LogitsProcessor.

Importing this package registers the "gcmr" model type with AutoConfig, AutoModel and AutoModelForSeq2SeqLM, and
marks the classes for `save_pretrained` to write an `auto_map` and copy the code into the checkpoint.
"""
from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from .configuration_gcmr import GcmrConfig
from .modeling_gcmr import GcmrForRetrieval, GcmrPreTrainedModel, GcmrSeq2SeqOutput
from .prefix_trie_logits_processor import PrefixTrieLogitsProcessor, constrained_retrieve

AutoConfig.register("gcmr", GcmrConfig, exist_ok=True)
AutoModel.register(GcmrConfig, GcmrForRetrieval, exist_ok=True)
AutoModelForSeq2SeqLM.register(GcmrConfig, GcmrForRetrieval, exist_ok=True)
GcmrConfig.register_for_auto_class()
GcmrForRetrieval.register_for_auto_class("AutoModel")

__all__ = [
    "GcmrConfig",
    "GcmrForRetrieval",
    "GcmrPreTrainedModel",
    "GcmrSeq2SeqOutput",
    "PrefixTrieLogitsProcessor",
    "constrained_retrieve",
]
