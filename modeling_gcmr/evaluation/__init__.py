"""Evaluation toolkit (never copied into a checkpoint): Recall@K / MRR@10, result files, the `evaluate` metric, plots.

    metrics.py     retrieval_metrics, evaluate_retriever, write_per_query_results, save_results, RECALL_METRIC_PATH
    plotting.py    retrieved-image grids, recall curves, latency plots
    gallery.py     result cards as HTML (the search page's) and the self-contained HTML gallery (the demo's)
    gcmr_recall/   the `evaluate` metric module, loadable offline with evaluate.load(RECALL_METRIC_PATH)
"""
