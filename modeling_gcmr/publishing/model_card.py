"""The model card of a trained GCMR retriever, built with `huggingface_hub.ModelCardData` and `EvalResult`.

The card's metadata carries the library, the tags (`custom_code` among them: loading needs `trust_remote_code=True`),
the datasets and a `model-index` with Recall@1/5/10 and MRR@10 of the model and, labelled as such, of the dense
dual-encoder baseline on the same queries. The body explains the identifier type and corpus size, lists the training
hyperparameters, compares the model with the baseline, and ends with a usage snippet that runs as written.

`pipeline_tag` is `visual-document-retrieval`: the Hub's only task whose input is a text query and whose output is a
ranked list of images; `text-to-image` would announce image *generation* and point the Hub's widgets the wrong way.
"""
from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping

from huggingface_hub import EvalResult, ModelCard, ModelCardData

PIPELINE_TAG = "visual-document-retrieval"
TASK_NAME = "Text-to-image retrieval"
METRICS = {"recall@1": "Recall@1", "recall@5": "Recall@5", "recall@10": "Recall@10", "mrr@10": "MRR@10"}
BASELINE_CONFIG = "dense-baseline"  # metric `config` that labels the dual-encoder's entries in the model-index
BASE_TAGS = ("custom_code", "generative-retrieval", "cross-modal-retrieval", "text-to-image-retrieval", "gcmr")

ID_TYPE_DESCRIPTIONS = {
    "numeric": "a running index written digit by digit, one shared token per digit (GRACE), numbered along a "
    "10-way cluster tree of the image embeddings when there are some (else shuffled, as in GRACE)",
    "string": "a shuffled running index written with the text tokenizer's own pieces (GRACE)",
    "semantic": "the image's caption in the text tokenizer's pieces, with a suffix token on collision (GRACE)",
    "structured": "the path of the image in a hierarchical k-means tree over image embeddings, one token per "
    "level (GRACE)",
    "atomic": "one new vocabulary token per image (GRACE)",
    "coarse_fine": "one coarse K-Means token, then residual-quantization codes of the residual to the cluster "
    "centre, plus a uniqueness token on collision (ACE / CART)",
}


def build_model_card(
    *,
    model_name: str,
    id_type: str,
    corpus_size: int,
    dataset_name: str,
    training_args: Mapping[str, object],
    metrics: Mapping[str, float] | None,
    baseline_metrics: Mapping[str, float] | None,
    base_model: str | None = None,
    repo_id: str | None = None,
    extra: Mapping[str, object] | None = None,
    eval_split: str = "test",
    example_query: str = "a red circle left of a blue square",
    license: str | None = "apache-2.0",
) -> ModelCard:
    """Build the card of a GCMR retriever.

    Args:
        model_name: the name of the model in the `model-index` and the card's title.
        id_type: the identifier type the model was trained with (a key of `ID_TYPE_DESCRIPTIONS`).
        corpus_size: the number of images the model memorized.
        dataset_name: the dataset it was trained and evaluated on (a Hub dataset id where there is one).
        training_args: the training hyperparameters to list (name -> value, JSON-serializable).
        metrics: the model's `recall@1`, `recall@5`, `recall@10` and `mrr@10`, fractions in [0, 1]
            (the output of `evaluation.metrics.retrieval_metrics`; other keys are ignored), or None when the run held
            out no queries: the card then says so and carries no model-index results.
        baseline_metrics: the same metrics of the dense dual-encoder baseline on the same queries, or None.
        base_model: the Hub id of the backbone the model was initialised from, if any.
        repo_id: where the model is published (or a local folder); the usage snippet loads from here.
        extra: more facts for the "Details" table (name -> value), e.g. the identifier signature.
        eval_split: the split the metrics were measured on.
        example_query: the query in the usage snippet.
        license: the license identifier for the metadata.
    """
    if id_type not in ID_TYPE_DESCRIPTIONS:
        raise ValueError(f"id_type must be one of {sorted(ID_TYPE_DESCRIPTIONS)}, got {id_type!r}")
    if isinstance(corpus_size, bool) or not isinstance(corpus_size, numbers.Integral) or corpus_size < 1:
        raise ValueError(f"corpus_size must be a positive integer, got {corpus_size!r}")
    for name, value in (("model_name", model_name), ("dataset_name", dataset_name), ("eval_split", eval_split)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    scores = _checked_metrics(metrics, "metrics") if metrics is not None else None
    baseline = _checked_metrics(baseline_metrics, "baseline_metrics") if baseline_metrics is not None else None
    if scores is None and baseline is not None:
        raise ValueError("baseline_metrics without metrics: the card compares the model with its baseline")
    hyperparameters = _jsonable(training_args, "training_args")
    details = _jsonable(extra or {}, "extra")
    location = repo_id or model_name

    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        license=license,
        base_model=base_model,
        datasets=[dataset_name],
        tags=[*BASE_TAGS, f"identifier-{id_type.replace('_', '-')}"],
        eval_results=_eval_results(scores, baseline, dataset_name, eval_split) if scores is not None else None,
    )
    body = _card_body(model_name, id_type, corpus_size, dataset_name, base_model, details, eval_split, scores,
                      baseline, hyperparameters, location, example_query)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


def _card_body(model_name: str, id_type: str, corpus_size: int, dataset_name: str, base_model: str | None,
               details: dict, eval_split: str, scores: dict, baseline: dict | None, hyperparameters: dict,
               location: str, example_query: str) -> str:
    """The card's markdown below the metadata: details, results, hyperparameters and a usage snippet."""
    return "\n".join([
        f"# {model_name}",
        "",
        _summary(id_type, corpus_size, dataset_name, baseline is not None),
        "",
        "## Details",
        "",
        _table(["Property", "Value"], [["Identifier type", f"`{id_type}`: {ID_TYPE_DESCRIPTIONS[id_type]}"],
                          ["Corpus size", f"{int(corpus_size):,} images"],
                          ["Dataset", f"`{dataset_name}`"],
                          *([["Base model", f"`{base_model}`"]] if base_model else []),
                          *[[_escape(k), _cell(v)] for k, v in details.items()]]),
        "",
        "## Results",
        "",
        *([f"Text-to-image retrieval on the `{eval_split}` split of `{dataset_name}` (percent; higher is better).",
           "", _results_table(model_name, scores, baseline)] if scores is not None else
          ["Not evaluated: the training run held out no queries (run_gcmr: `--eval_query_file FILE` or "
           "`--num_query_captions 1` measures Recall@K and fills this section)."]),
        "",
        "## Training hyperparameters",
        "",
        _table(["Hyperparameter", "Value"], [[_escape(k), _cell(v)] for k, v in hyperparameters.items()])
        if hyperparameters else "Not recorded.",
        "",
        "## Usage",
        "",
        "The model's code ships with the checkpoint; `trust_remote_code=True` loads it with plain `transformers` "
        "(no other package needed).",
        "",
        "```python",
        usage_snippet(location, example_query),
        "```",
        "",
        "`retrieve` returns, for every query, up to `top_k` `(image_key, score)` pairs, best first. Decoding is "
        "constrained by a prefix trie over the identifiers, so every key it returns is an image of the corpus.",
        "",
    ])


def usage_snippet(location: str, example_query: str) -> str:
    """The code block of the card's "Usage" section: load from `location`, retrieve for one query."""
    return "\n".join([
        "from transformers import AutoModel, AutoTokenizer",
        "",
        f"model = AutoModel.from_pretrained({json.dumps(location)}, trust_remote_code=True)",
        f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(location)}, trust_remote_code=True)",
        f"hits = model.retrieve([{json.dumps(example_query)}], tokenizer, top_k=5)",
        "for image_key, score in hits[0]:",
        "    print(image_key, score)",
    ])


def extract_usage_snippet(card: ModelCard | str) -> str:
    """The first ```python block of a card's text (the usage snippet)."""
    text = card.text if isinstance(card, ModelCard) else card
    start = text.find("```python\n")
    end = text.find("\n```", start + 1)
    if start < 0 or end < 0:
        raise ValueError("the model card has no ```python code block")
    return text[start + len("```python\n") : end]


def _summary(id_type: str, corpus_size: int, dataset_name: str, with_baseline: bool) -> str:
    baseline = " The dense dual-encoder baseline below was trained and evaluated on the same data." if with_baseline else ""
    return (
        "A **generative cross-modal retriever** built with GCMR. A sequence-to-sequence model memorized "
        f"{int(corpus_size):,} images of `{dataset_name}`, each under a unique `{id_type}` identifier, and answers a "
        "text query by *generating* the identifiers of the matching images with beam search under a prefix-trie "
        "constraint, so that only real identifiers can come out (GRACE, Li et al., ACL 2024; ACE, Fang et al.)."
        + baseline
    )


def _eval_results(scores: dict, baseline: dict | None, dataset: str, split: str) -> list[EvalResult]:
    """One EvalResult per metric; the baseline's carry the `dense-baseline` config and a labelled name."""
    common = dict(task_type=PIPELINE_TAG, task_name=TASK_NAME, dataset_type=dataset, dataset_name=dataset,
                  dataset_split=split)
    results = [EvalResult(metric_type=key, metric_name=label, metric_value=scores[key], **common)
               for key, label in METRICS.items()]
    if baseline is not None:
        results += [EvalResult(metric_type=key, metric_name=f"{label} (dense baseline)", metric_config=BASELINE_CONFIG,
                               metric_value=baseline[key], **common) for key, label in METRICS.items()]
    return results


def _results_table(model_name: str, scores: dict, baseline: dict | None) -> str:
    rows = [[_escape(model_name), *[f"{100 * scores[k]:.1f}" for k in METRICS]]]
    if baseline is not None:
        rows.append(["Dense dual-encoder baseline", *[f"{100 * baseline[k]:.1f}" for k in METRICS]])
    return _table(["Model", *METRICS.values()], rows)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _checked_metrics(values: Mapping[str, float] | None, name: str) -> dict[str, float]:
    if not isinstance(values, Mapping):
        raise ValueError(f"{name} must be a mapping of metric name -> value, got {type(values).__name__}")
    checked = {}
    for key in METRICS:
        if key not in values:
            raise ValueError(f"{name} is missing {key!r} (expected keys {list(METRICS)})")
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name}[{key!r}] must be a fraction in [0, 1], got {value!r}")
        checked[key] = round(float(value), 6)  # plain floats: numpy scalars do not serialize to YAML
    return checked


def _jsonable(values: Mapping[str, object], name: str) -> dict[str, object]:
    """Plain-Python copy of `values` (numpy scalars become floats/ints); non-JSON values are an error."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{name} must be a mapping, got {type(values).__name__}")
    out = {}
    for key, value in values.items():
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            value = int(value)
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = float(str(value))  # str() is the shortest repr: float32(1e-3) stays 0.001
            if not math.isfinite(value):
                raise ValueError(f"{name}[{key!r}] must be finite, got {value!r}")
        try:
            json.dumps(value)
        except TypeError as e:
            raise ValueError(f"{name}[{key!r}] is not JSON-serializable: {value!r}") from e
        out[str(key)] = value
    return out


def _cell(value: object) -> str:
    return _escape(value if isinstance(value, str) else json.dumps(value))


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
