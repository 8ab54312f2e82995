"""Beam search over the identifier trie for models with the identifier head.

Each step runs the decoder one position for every live beam (with its key/value cache), turns its state into the
step's query vector, and scores only the trie children of each beam's node: `score(prefix + edge) = score(prefix)
+ scale * q_t . v(edge)` (see `identifier_head_gcmr.py`). A child through an EOS edge completes an identifier and
leaves the beam as a hit; the others compete for the `num_beams` places of their query. Nothing is ever scored
outside the trie, so no vocabulary-wide matrix is built: at the root of atomic identifiers the children are all
identifiers (dense search), deeper levels score a handful of children per beam.

The trie comes from the tokenizer (`tokenizer.prefix_trie`), the project's one trie engine; this Hub file only calls
its methods.
"""
from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def trie_beam_search(model: Any, trie: Any, encoded: Any, num_beams: int, top_k: int,
                     widths: tuple[int, ...] = ()) -> list[list[tuple[int, float]]]:
    """Per query, up to `top_k` (identifier index, score) pairs, best first.

    Args:
        model: a `GcmrForRetrieval` with the identifier head.
        trie: the tokenizer's `PrefixTrie`.
        encoded: the model's `GcmrEncoderOutput` for the queries (memory, mask, query vectors).
        num_beams: unfinished prefixes kept per query and step.
        top_k: hits returned per query.
        widths: prefixes kept after the first steps (`widths[t]` after step t, at least `num_beams`); `num_beams`
            after them. See `beam_widths`.
    """
    head = model.identifier_head
    num_queries = encoded.query_vectors.shape[0]
    if num_queries == 0:
        return []
    device = encoded.last_hidden_state.device
    engine = trie.on(device)
    query_of_row = torch.arange(num_queries, device=device)
    nodes = torch.zeros(num_queries, dtype=torch.long, device=device)
    totals = torch.zeros(num_queries, device=device)
    previous_edges = None
    cache = None
    hits_query, hits_key, hits_score = [], [], []
    for step in range(model.config.max_identifier_length + 1):
        if previous_edges is None:
            inputs = head.start_input.expand(len(nodes), 1, -1)
        else:
            inputs = head.edge_input(head.edge_vectors[previous_edges])[:, None]
        states, cache = model.decoder_states(inputs, encoded, query_of_row, cache, use_cache=True)
        queries = encoded.query_vectors[query_of_row] + head.step_query(states[:, 0])
        rows, edges = engine.edges_of(nodes)
        if previous_edges is None:
            # Every query starts at the root, so all rows share its children (rows ascending, children in order).
            children = edges[: len(edges) // num_queries]
            scores = (totals[:, None] + head.shared_edge_scores(queries, children).float()).flatten()
        else:
            scores = totals[rows] + head.edge_scores(queries[rows], edges).float()
        keys = engine.key_index[edges]
        done = keys >= 0
        hits_query.append(query_of_row[rows[done]])
        hits_key.append(keys[done])
        hits_score.append(scores[done])
        width = max(num_beams, widths[step]) if step < len(widths) else num_beams
        keep = _best_per_group(query_of_row[rows[~done]], scores[~done], width)
        if len(keep) == 0:
            break
        parents, edges, scores = rows[~done][keep], edges[~done][keep], scores[~done][keep]
        cache.reorder_cache(parents)
        query_of_row, totals, previous_edges = query_of_row[parents], scores, edges
        nodes = engine.next_node[edges]
    return _top_hits(num_queries, torch.cat(hits_query), torch.cat(hits_key), torch.cat(hits_score), top_k)


def _best_per_group(groups: torch.Tensor, scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` best scores of each group (ties: the earlier one), without a loop over groups."""
    by_score = torch.argsort(scores, descending=True, stable=True)
    order = by_score[torch.argsort(groups[by_score], stable=True)]
    sorted_groups = groups[order]
    starts = torch.searchsorted(sorted_groups, sorted_groups, right=False)
    rank = torch.arange(len(order), device=order.device) - starts
    return order[rank < count]


def _top_hits(num_queries: int, queries: torch.Tensor, keys: torch.Tensor, scores: torch.Tensor,
              top_k: int) -> list[list[tuple[int, float]]]:
    keep = _best_per_group(queries, scores, top_k)
    order = keep[torch.argsort(scores[keep], descending=True, stable=True)]
    order = order[torch.argsort(queries[order], stable=True)]  # grouped by query, best first within each
    results: list[list[tuple[int, float]]] = [[] for _ in range(num_queries)]
    for query, key, score in zip(queries[order].tolist(), keys[order].tolist(), scores[order].tolist()):
        results[query].append((key, score))
    return results


__all__ = ["trie_beam_search"]
