"""Recall@K / MRR@10: the plain function and the `evaluate` module against a brute-force reference."""
import json
import random

import evaluate
import pytest

from modeling_gcmr.evaluation.metrics import (
    RECALL_METRIC_PATH,
    evaluate_retriever,
    retrieval_metrics,
    write_per_query_results,
)
from modeling_gcmr.evaluation.plotting import plot_recall_curve

KS = (1, 3, 5, 10)


def _brute_force(rankings, gold, ks):
    """Definition-level reference: dedupe each ranking, then look at every cut-off separately."""
    out = {}
    deduped = [list(dict.fromkeys(r)) for r in rankings]
    relevant = [{g} if isinstance(g, str) else set(g) for g in gold]
    for k in ks:
        out[f"recall@{k}"] = sum(bool(rel & set(r[:k])) for r, rel in zip(deduped, relevant)) / len(gold)
    reciprocal = []
    for r, rel in zip(deduped, relevant):
        positions = [i + 1 for i, key in enumerate(r[:10]) if key in rel]
        reciprocal.append(1 / min(positions) if positions else 0.0)
    out["mrr@10"] = sum(reciprocal) / len(gold)
    return out


def _random_case(seed, multi_gold):
    rng = random.Random(seed)
    pool = [f"img{i}" for i in range(25)]
    rankings, gold = [], []
    for _ in range(rng.randint(1, 60)):
        rankings.append([rng.choice(pool) for _ in range(rng.randint(0, 15))])  # repeats and misses included
        if multi_gold and rng.random() < 0.5:
            gold.append(rng.sample(pool, rng.randint(1, 3)))
        else:
            gold.append(rng.choice(pool))
    return rankings, gold


@pytest.mark.parametrize("seed", range(40))
def test_plain_function_matches_brute_force(seed):
    rankings, gold = _random_case(seed, multi_gold=seed % 2 == 1)
    got = retrieval_metrics(rankings, gold, ks=KS)
    expected = _brute_force(rankings, gold, KS)
    assert got["num_queries"] == len(gold)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name


def test_evaluate_module_matches_brute_force_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = evaluate.load(RECALL_METRIC_PATH)
    for seed in range(8):
        rankings, gold = _random_case(100 + seed, multi_gold=False)
        got = metric.compute(predictions=rankings, references=gold, ks=list(KS))
        expected = _brute_force(rankings, gold, KS)
        assert set(got) == set(expected) | {"num_queries"}
        assert all(got[name] == pytest.approx(value, abs=1e-12) for name, value in expected.items())
    rankings, gold = _random_case(7, multi_gold=True)
    gold = [[g] if isinstance(g, str) else g for g in gold]  # one batch holds one reference format
    got = metric.compute(predictions=rankings, references=gold)
    assert got["recall@5"] == pytest.approx(_brute_force(rankings, gold, (5,))["recall@5"])


def test_hand_checked_values():
    got = retrieval_metrics([["a", "b"], ["b", "b", "c"], []], ["b", "c", "a"], ks=(1, 2))
    assert got == {"recall@1": 0.0, "recall@2": 2 / 3, "mrr@10": (1 / 2 + 1 / 2) / 3, "num_queries": 3}


def test_bad_inputs():
    with pytest.raises(ValueError, match="2 rankings for 1 gold"):
        retrieval_metrics([["a"], ["b"]], ["a"])
    with pytest.raises(ValueError, match="positive integers"):
        retrieval_metrics([["a"]], ["a"], ks=(0,))
    with pytest.raises(ValueError, match="at least one query"):
        retrieval_metrics([], [])


def test_evaluate_retriever_and_per_query_file(tmp_path):
    corpus = {"k1": "red circle", "k2": "blue square", "k3": "green cross"}

    def retrieve(queries, top_k):
        # Score by shared words, keys in a fixed order on ties: a real (if simple) retriever.
        out = []
        for q in queries:
            scored = [(k, float(len(set(q.split()) & set(t.split())))) for k, t in corpus.items()]
            out.append(sorted(scored, key=lambda kv: -kv[1])[:top_k])
        return out

    queries = ["a red circle", "the green cross", "blue circle"]
    gold = ["k1", "k3", "k2"]
    path = tmp_path / "out" / "per_query.jsonl"
    metrics = evaluate_retriever(retrieve, queries, gold, batch_size=2, results_path=path)
    assert metrics["recall@1"] == pytest.approx(2 / 3) and metrics["recall@5"] == 1.0
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["rank"] for line in lines] == [1, 1, 2]
    assert lines[2]["hits"][0] == {"key": "k1", "score": 1.0} and lines[2]["gold"] == "k2"
    with pytest.raises(ValueError, match="top_k=3 is below"):
        evaluate_retriever(retrieve, queries, gold, top_k=3)
    write_per_query_results(tmp_path / "multi.jsonl", ["q"], [{"b", "a"}], [[("a", 0.5)]])
    assert json.loads((tmp_path / "multi.jsonl").read_text())["gold"] == ["a", "b"]


def test_plot_recall_curve(tmp_path):
    path = plot_recall_curve({"dense": [["a", "b"], ["b"]], "generative": [["b", "a"], ["a"]]}, ["a", "b"],
                             tmp_path / "recall.png", max_k=3)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["recall.png"]
