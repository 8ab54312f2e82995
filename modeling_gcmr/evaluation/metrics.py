"""Recall@K and MRR@10 over a whole query set, the per-query results file, and one path for every retriever.

    retrieval_metrics(rankings, gold, ks=(1, 5, 10)) -> {"recall@1", "recall@5", "recall@10", "mrr@10", "num_queries"}
    evaluate_retriever(retrieve_fn, queries, gold, top_k=10, results_path=None) -> the same dict
    write_per_query_results(path, queries, gold, hits)      # JSONL, one line per query
    save_results(path, results)                             # a results dict as JSON, atomic
    RECALL_METRIC_PATH                                      # evaluate.load(RECALL_METRIC_PATH) works offline

A query counts as found at rank r when the first of its gold keys in the ranking sits at position r (1-based);
Recall@k is the fraction of queries found at rank <= k, MRR@10 the mean of 1/r over queries found at rank <= 10
(0 for the others). A gold entry may be one key or a set of keys (any of them counts). Rankings are
deduplicated first: a repeated key keeps its first position and the later copies take no rank.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from ..atomic_write_gcmr import atomic_write

RECALL_METRIC_PATH = str(Path(__file__).resolve().parent / "gcmr_recall")
MRR_CUTOFF = 10

Gold = str | Sequence[str] | set[str] | frozenset[str]
RetrieveFn = Callable[..., list[list[tuple[str, float]]]]


def first_relevant_rank(ranking: Sequence[str], gold: Gold) -> int | None:
    """1-based position of the first gold key among the distinct keys of `ranking`, or None when none is in it."""
    relevant = _as_set(gold)
    for position, key in enumerate(dict.fromkeys(ranking), start=1):
        if key in relevant:
            return position
    return None


def retrieval_metrics(
    rankings: Sequence[Sequence[str]], gold: Sequence[Gold], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k for each k in `ks` and MRR@10 over all queries; `rankings[i]` is query i's keys, best first."""
    if len(rankings) != len(gold):
        raise ValueError(f"got {len(rankings)} rankings for {len(gold)} gold entries; expected one per query")
    if not rankings:
        raise ValueError("retrieval_metrics needs at least one query")
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    ranks = [first_relevant_rank(ranking, g) for ranking, g in zip(rankings, gold)]
    n = len(ranks)
    metrics: dict[str, float] = {f"recall@{k}": sum(r is not None and r <= k for r in ranks) / n for k in sorted(set(ks))}
    metrics[f"mrr@{MRR_CUTOFF}"] = sum(1.0 / r for r in ranks if r is not None and r <= MRR_CUTOFF) / n
    metrics["num_queries"] = n
    return metrics


def write_per_query_results(
    path: str | os.PathLike,
    queries: Sequence[str],
    gold: Sequence[Gold],
    hits: Sequence[Sequence[tuple[str, float]]],
) -> Path:
    """Write one JSON line per query: `query`, `gold` (key or sorted key list), `rank` (or null), `hits`.

    `hits` holds `{"key", "score"}` objects, best first. The file is written under a temporary name and renamed.
    """
    if not len(queries) == len(gold) == len(hits):
        raise ValueError(f"got {len(queries)} queries, {len(gold)} gold entries and {len(hits)} hit lists")
    lines = []
    for query, g, query_hits in zip(queries, gold, hits):
        record = {
            "query": query,
            "gold": g if isinstance(g, str) else sorted(g),
            "rank": first_relevant_rank([key for key, _ in query_hits], g),
            "hits": [{"key": key, "score": float(score)} for key, score in query_hits],
        }
        lines.append(json.dumps(record) + "\n")
    return atomic_write(Path(path), lambda f: f.writelines(lines), mode="w")


def read_query_file(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Held-out queries from a JSONL file of `{"query": str, "image_key": str}` rows: (queries, gold keys).

    A row that is not such an object is a ValueError naming the file and the line.
    """
    queries, gold = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number} is not JSON: {error}") from error
            if not (isinstance(row, dict) and isinstance(row.get("query"), str) and row["query"].strip()
                    and isinstance(row.get("image_key"), str)):
                raise ValueError(f'{path} line {number} must be {{"query": "<text>", "image_key": "<key>"}}, got {line.strip()[:80]}')
            queries.append(row["query"])
            gold.append(row["image_key"])
    if not queries:
        raise ValueError(f"{path} holds no queries")
    return queries, gold


def save_results(path: str | os.PathLike, results: Mapping) -> Path:
    """Write a results dict (metrics, settings) as indented JSON under a temporary name, then rename."""
    text = json.dumps(results, indent=2, sort_keys=True) + "\n"
    return atomic_write(Path(path), lambda f: f.write(text), mode="w")


def evaluate_retriever(
    retrieve_fn: RetrieveFn,
    queries: Sequence[str],
    gold: Sequence[Gold],
    *,
    top_k: int = 10,
    batch_size: int = 64,
    ks: Sequence[int] = (1, 5, 10),
    results_path: str | os.PathLike | None = None,
) -> dict[str, float]:
    """Run any retriever over `queries` in batches and score it with `retrieval_metrics`.

    `retrieve_fn(batch_of_queries, top_k=top_k)` returns one list of `(image_key, score)` pairs per query, best
    first: `functools.partial(model.retrieve, tokenizer=tokenizer)` for the generative model, or
    `DualEncoderRetriever.retrieve` for the dense baseline. With `results_path` the per-query file is written too.
    """
    if len(queries) != len(gold):
        raise ValueError(f"got {len(queries)} queries for {len(gold)} gold entries; expected one per query")
    if top_k < max(ks):
        raise ValueError(f"top_k={top_k} is below the largest k in ks={tuple(ks)}")
    hits: list[list[tuple[str, float]]] = []
    for start in tqdm(range(0, len(queries), batch_size), desc="retrieving", unit="batch"):
        batch = list(queries[start : start + batch_size])
        batch_hits = retrieve_fn(batch, top_k=top_k)
        if len(batch_hits) != len(batch):
            raise ValueError(f"retriever returned {len(batch_hits)} hit lists for a batch of {len(batch)} queries")
        hits.extend([(str(key), float(score)) for key, score in query_hits] for query_hits in batch_hits)
    if results_path is not None:
        write_per_query_results(results_path, queries, gold, hits)
    return retrieval_metrics([[key for key, _ in h] for h in hits], gold, ks=ks)


def _as_set(gold: Gold) -> set[str]:
    return {gold} if isinstance(gold, str) else set(gold)
