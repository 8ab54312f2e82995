"""Recall@K and MRR@10 for ranked retrieval, as an `evaluate` metric module loadable offline by path."""
import datasets
import evaluate

from modeling_gcmr.evaluation.metrics import retrieval_metrics

_DESCRIPTION = """
Recall@K and MRR@10 of ranked retrieval results. For each query, `predictions` holds the retrieved image keys,
best first, and `references` the gold key (or a list of gold keys, any of which counts). A query is found at
rank r when its first gold key sits at position r; Recall@k is the fraction found at rank <= k, MRR@10 the mean
of 1/r over queries found at rank <= 10 (0 for the others).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[str]]`): ranked keys per query, best first.
    references (`list[str]` or `list[list[str]]`): gold key(s) per query.
    ks (`list[int]`, *optional*, defaults to `[1, 5, 10]`): the cut-offs of Recall@k.
Returns:
    `recall@k` for each k, `mrr@10` and `num_queries`.
Examples:
    >>> import evaluate
    >>> from modeling_gcmr.evaluation.metrics import RECALL_METRIC_PATH
    >>> metric = evaluate.load(RECALL_METRIC_PATH)
    >>> metric.compute(predictions=[["b", "a"], ["c"]], references=["a", "x"], ks=[1, 2])
    {'recall@1': 0.0, 'recall@2': 0.5, 'mrr@10': 0.25, 'num_queries': 2}
"""

_CITATION = """
@inproceedings{li2024grace,
  title={Generative Cross-Modal Retrieval: Memorizing Images in Multimodal Language Models for Retrieval and Beyond},
  author={Li, Yongqi and Wang, Wenjie and Qu, Leigang and Nie, Liqiang and Li, Wenjie and Chua, Tat-Seng},
  booktitle={ACL},
  year={2024}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GcmrRecall(evaluate.Metric):
    """Recall@K / MRR@10 over ranked key lists; the same numbers as `evaluation_gcmr.retrieval_metrics`."""

    def _info(self):
        ranked = datasets.Sequence(datasets.Value("string"))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": ranked, "references": datasets.Value("string")}),
                datasets.Features({"predictions": ranked, "references": datasets.Sequence(datasets.Value("string"))}),
            ],
        )

    def _compute(self, predictions, references, ks=(1, 5, 10)):
        return retrieval_metrics(predictions, references, ks=tuple(int(k) for k in ks))
