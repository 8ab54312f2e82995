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

from .query_inputs_gcmr import check_positive_int, search_limits, tokenize_queries, validate_query_texts, warn_unusable
from .retrieval_gcmr import check_rerank, search

PIPELINE_TASK = "generative-image-retrieval"
# How transformers names the implementation inside a checkpoint: "<module file>.<class>", resolved
# against the checkpoint's own copy of this file.
_PIPELINE_IMPL = "pipeline_gcmr.GcmrRetrievalPipeline"


class GcmrRetrievalPipeline(Pipeline):
    """Text-to-image retrieval with a [`GcmrForRetrieval`] model and its `ImageIdTokenizer`.

    Call it with a query string (or a list of them). Each query returns a list of
    ``{"image_key": str, "score": float, "rank": int}`` dicts, best first, with no duplicate keys; the score
    is the model's score of the identifier, higher is better (identifier head: the scaled sum of the query's dot
    products with the identifier's edge vectors; text head: its log-probability). When the pipeline was built with
    ``images={image_key: image}``, each result also carries ``"image"``.

    Call parameters (also accepted when the pipeline is built):
        top_k (`int`, defaults to 10): how many images to return per query (capped at the corpus size).
        num_beams (`int`, *optional*): beam width of the trie-constrained search; defaults to the model's
            `config.num_beams`, and is raised to `top_k` when smaller.
        rerank (`str`, *optional*): `"features"` or `"hybrid"` re-scores the beam with the stored image features
            (as `model.retrieve(..., rerank=...)`); `rerank_weight` (`float`) weighs them in `"hybrid"`.
        images (`Mapping[str, Any]`, *optional*): an image lookup by key (PIL images, paths, ...); a key the
            lookup lacks gets `"image": None`.

    Queries go through the same front door as `model.retrieve` (`query_inputs_gcmr`): the same validation and
    truncation, and a query without a usable token gets no hits and an `UnusableQueryWarning`.
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

    def _sanitize_parameters(self, top_k: int | None = None, num_beams: int | None = None,
                             images: Mapping[str, Any] | None = None, rerank: str | None = None,
                             rerank_weight: float = 1.0, **kwargs):
        if kwargs:
            raise TypeError(f"GcmrRetrievalPipeline got unexpected parameters {sorted(kwargs)}; "
                            "it takes top_k, num_beams, rerank, rerank_weight and images")
        forward_params: dict[str, Any] = {}
        postprocess_params: dict[str, Any] = {}
        if top_k is not None:
            forward_params["top_k"] = check_positive_int("top_k", top_k)
        if num_beams is not None:
            forward_params["num_beams"] = check_positive_int("num_beams", num_beams)
        check_rerank(self.model, rerank, rerank_weight)  # as retrieve() checks them
        if rerank is not None:
            forward_params.update(rerank=rerank, rerank_weight=rerank_weight)
        if images is not None:
            if not isinstance(images, Mapping):
                raise TypeError(f"images must be a mapping from image key to image, got {type(images).__name__}")
            postprocess_params["images"] = images
        return {}, forward_params, postprocess_params

    def __call__(self, inputs: str | list[str], **kwargs):
        """Retrieve images for one query (a list of hit dicts) or for a list of queries (a list of such lists)."""
        if isinstance(inputs, tuple):
            inputs = list(inputs)
        if isinstance(inputs, list):
            inputs = validate_query_texts(inputs)  # lone surrogates replaced here: one warning for the list
        return super().__call__(inputs, **kwargs)

    def preprocess(self, query: str) -> dict[str, torch.Tensor]:
        (query,) = validate_query_texts([query])
        inputs, (usable,) = tokenize_queries(self.tokenizer, [query], self.model.config.query_token_limit)
        warn_unusable([query], [usable])
        return {**inputs, "usable": torch.tensor([usable])}

    def _forward(self, model_inputs: dict[str, torch.Tensor], top_k: int = 10, num_beams: int | None = None,
                 rerank: str | None = None, rerank_weight: float = 1.0) -> dict[str, torch.Tensor]:
        usable = model_inputs.pop("usable").tolist()
        top_k, num_beams = search_limits(top_k, num_beams, self.model.config.num_beams,
                                         self.tokenizer.prefix_trie.num_identifiers)
        hits = search(self.model, self.tokenizer, model_inputs, top_k, num_beams, rerank, rerank_weight)
        # Tensors of key indices, not lists, so the pipeline's batch unrolling slices every query the same way.
        key_indices = torch.full((len(hits), top_k), -1, dtype=torch.long)
        scores = torch.full((len(hits), top_k), float("nan"))
        for row, (row_hits, ok) in enumerate(zip(hits, usable)):
            for column, (key_index, score) in enumerate(row_hits if ok else []):
                key_indices[row, column] = key_index
                scores[row, column] = score
        return {"key_indices": key_indices, "scores": scores}

    def postprocess(self, model_outputs: dict[str, torch.Tensor],
                    images: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        keys = self.tokenizer.keys
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
