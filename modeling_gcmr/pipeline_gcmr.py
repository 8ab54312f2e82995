"""The `"generative-image-retrieval"` pipeline: a text query in, ranked image keys out.

```python
from transformers import pipeline

retriever = pipeline("generative-image-retrieval", model="path/or/repo", trust_remote_code=True)
retriever("a red circle left of a blue square", top_k=5)
# [{"image_key": "img_017", "score": -0.12, "rank": 1}, ...]
```

A checkpoint finds this class through `config.custom_pipelines` (written by
`register_pipeline_in_config`), which transformers resolves with `get_class_from_dynamic_module`
from the copy of this file inside the checkpoint; so this file is a Hub file and imports only
transformers, torch and its sibling `prefix_trie_logits_processor`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import AutoModel, Pipeline

from .prefix_trie_logits_processor import constrained_retrieve

PIPELINE_TASK = "generative-image-retrieval"
# How transformers names the implementation inside a checkpoint: "<module file>.<class>", resolved
# against the checkpoint's own copy of this file.
_PIPELINE_IMPL = "pipeline_gcmr.GcmrRetrievalPipeline"


class GcmrRetrievalPipeline(Pipeline):
    """Text-to-image retrieval with a [`GcmrForRetrieval`] model and its `ImageIdTokenizer`.

    Call it with a query string (or a list of them). Each query returns a list of
    ``{"image_key": str, "score": float, "rank": int}`` dicts, best first, with no duplicate keys; the score
    is the identifier's log-probability under the model. When the pipeline was built with
    ``images={image_key: image}``, each result also carries ``"image"``.

    Call parameters (also accepted when the pipeline is built):
        top_k (`int`, defaults to 10): how many images to return per query.
        num_beams (`int`, *optional*): beam width of the trie-constrained search; defaults to the model's
            `config.num_beams`, and is raised to `top_k` when smaller.
        images (`Mapping[str, Any]`, *optional*): an image lookup by key (PIL images, paths, ...); a key the
            lookup lacks gets `"image": None`.
    """

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.tokenizer is None or not hasattr(self.tokenizer, "identifier_table"):
            raise ValueError(
                "GcmrRetrievalPipeline needs the model's ImageIdTokenizer (with an identifier table); "
                f"got {type(self.tokenizer).__name__}"
            )
        # A tokenizer with another identifier vocabulary would decode keys of a different corpus.
        self.model.check_tokenizer(self.tokenizer)
        self._key_index = {key: index for index, key in enumerate(self.tokenizer.identifier_table.keys)}

    def _sanitize_parameters(self, top_k: int | None = None, num_beams: int | None = None,
                             images: Mapping[str, Any] | None = None, **kwargs):
        if kwargs:
            raise TypeError(f"GcmrRetrievalPipeline got unexpected parameters {sorted(kwargs)}; "
                            "it takes top_k, num_beams and images")
        forward_params: dict[str, Any] = {}
        postprocess_params: dict[str, Any] = {}
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
                raise ValueError(f"top_k must be a positive int, got {top_k!r}")
            forward_params["top_k"] = top_k
        if num_beams is not None:
            if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
                raise ValueError(f"num_beams must be a positive int, got {num_beams!r}")
            forward_params["num_beams"] = num_beams
        if images is not None:
            if not isinstance(images, Mapping):
                raise TypeError(f"images must be a mapping from image key to image, got {type(images).__name__}")
            postprocess_params["images"] = images
        return {}, forward_params, postprocess_params

    def __call__(self, inputs: str | list[str], **kwargs):
        """Retrieve images for one query (a list of hit dicts) or for a list of queries (a list of such lists)."""
        if isinstance(inputs, tuple):
            inputs = list(inputs)
        if isinstance(inputs, list) and not inputs:
            raise ValueError("GcmrRetrievalPipeline got an empty list of queries")
        return super().__call__(inputs, **kwargs)

    def preprocess(self, query: str) -> dict[str, torch.Tensor]:
        if not isinstance(query, str):
            raise ValueError(f"a query must be a non-empty string, got {type(query).__name__}: {query!r:.80}")
        if not query.strip():
            raise ValueError("a query must be a non-empty string, got an empty or whitespace-only one")
        encoded = self.tokenizer([query], truncation=True, return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def _forward(self, model_inputs: dict[str, torch.Tensor], top_k: int = 10,
                 num_beams: int | None = None) -> dict[str, torch.Tensor]:
        hits = constrained_retrieve(self.model, self.tokenizer, model_inputs, top_k=top_k, num_beams=num_beams)
        # Tensors, not lists, so the pipeline's batch unrolling slices every query the same way.
        width = max(1, max(len(row) for row in hits))
        key_indices = torch.full((len(hits), width), -1, dtype=torch.long)
        scores = torch.full((len(hits), width), float("nan"))
        for row, row_hits in enumerate(hits):
            for column, (key, score) in enumerate(row_hits):
                key_indices[row, column] = self._key_index[key]
                scores[row, column] = score
        return {"key_indices": key_indices, "scores": scores}

    def postprocess(self, model_outputs: dict[str, torch.Tensor],
                    images: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        keys = self.tokenizer.identifier_table.keys
        results = []
        for key_index, score in zip(model_outputs["key_indices"][0].tolist(), model_outputs["scores"][0].tolist()):
            if key_index < 0:
                break
            result = {"image_key": keys[key_index], "score": float(score), "rank": len(results) + 1}
            if images is not None:
                result["image"] = images.get(keys[key_index])
            results.append(result)
        return results


def register_pipeline_in_config(config: Any) -> None:
    """Record the pipeline in `config.custom_pipelines`, so a saved checkpoint answers
    ``pipeline("generative-image-retrieval", model=folder, trust_remote_code=True)``.

    The checkpoint must also hold a copy of this file; `save_pretrained` copies it when the modeling file
    imports it relatively (as `from .pipeline_gcmr import register_pipeline_in_config`).
    """
    custom_pipelines = dict(getattr(config, "custom_pipelines", None) or {})
    custom_pipelines[PIPELINE_TASK] = {"impl": _PIPELINE_IMPL, "pt": ["AutoModel"]}
    config.custom_pipelines = custom_pipelines


def register_retrieval_pipeline() -> None:
    """Register the task with transformers' pipeline registry in this process (idempotent)."""
    from transformers.pipelines import PIPELINE_REGISTRY

    if PIPELINE_REGISTRY.supported_tasks.get(PIPELINE_TASK, {}).get("impl") is GcmrRetrievalPipeline:
        return
    PIPELINE_REGISTRY.register_pipeline(PIPELINE_TASK, pipeline_class=GcmrRetrievalPipeline, pt_model=AutoModel)


__all__ = ["PIPELINE_TASK", "GcmrRetrievalPipeline", "register_pipeline_in_config", "register_retrieval_pipeline"]
