"""Beam search over the identifier trie for models with the identifier head.

Each step runs the decoder one position for every live beam (with its key/value cache), turns its state into the
step's query vector, and scores only the trie children of each beam's node: `score(prefix + edge) = score(prefix)
+ scale * q_t . v(edge)` (see `identifier_head_gcmr.py`). A child through an EOS edge completes an identifier and
leaves the beam as a hit; the others compete for the `num_beams` places of their query. Nothing is ever scored
outside the trie, so no vocabulary-wide matrix is built: at the root of atomic identifiers the children are all
identifiers (dense search), deeper levels score a handful of children per beam. While the head's step correction
is zero (`IdentifierHead.reads_decoder_states`: as initialised, or trained with the decoder fixed) every step's query
is the base query, and no decoder runs at all: the search is constrained inner-product search over path sums.

Which prefixes survive a step is decided with a lookahead: partial sum plus the best path of two edges (or more,
while the paths stay few) below the prefix under the query's base vector (no decoder run), which turns a cluster
mean's score into its best sub-clusters' (`_prune`). A lookahead that walked every path below its prefixes to the end
is exact, and the later steps, whose candidates lie below those prefixes, reuse it instead of walking again
(`_KnownAhead`): in a small collection only the first step looks ahead.

The trie comes from the tokenizer (`tokenizer.prefix_trie`), the project's one trie engine; this Hub file only calls
its methods.
"""
from __future__ import annotations

from typing import Any

import torch

# Prefixes looked ahead per kept beam, and edges looked ahead below each (see `_prune`). Chosen at step 0 on f30k-dev
# and coco-dev, beam 10: pruning by partial sums alone lost 9 (numeric) and 8 (coarse_fine) points of the R@10 that
# dense search reaches; a pool of 4 x beam with two levels still lost 1.0 (f30k coarse_fine, numeric), 0.6 (f30k
# structured) and 0.2 (coco coarse_fine); 16 x beam with the frontier below loses none of the four.
LOOKAHEAD_POOL = 16
LOOKAHEAD_DEPTH = 2
# Where the full pool's first two lookahead levels would score more than this many edges per query (wide nodes: the
# first levels of a million-image trie, structured leaves of 30 in a big collection), the pool falls back to
# LOOKAHEAD_POOL_FLOOR x beam. At 1M coarse_fine identifiers (synthetic, benchmarks/scale.py) a pool of 16 x beam
# cost 61 ms per query against 13 ms with a pool of 4 (a profile); with the budget the scale run measured 17.5 ms, the
# pool of 16 one level below the root still being looked ahead. The dev tries stay far below the budget.
LOOKAHEAD_EDGE_BUDGET = 4_096
LOOKAHEAD_POOL_FLOOR = 4
# Past LOOKAHEAD_DEPTH the lookahead goes on, level by level, while the next level has at most this many edges per
# looked-ahead prefix: in a small collection it then reaches the identifiers' ends and ranks each prefix by its best
# identifier exactly (an identifier's own part of its feature can sit in its EOS edge, a third level below the root's
# children). A large collection stops at two levels, where the work per query is bounded by the fan-out.
LOOKAHEAD_FRONTIER = 64
# The lookahead scores (query, edge) pairs with one (queries x distinct edges) matrix product while it has at most
# this many entries per pair; past it, pair by pair (two gathered vectors per pair). The product is compute-bound and
# the pairs memory-bound: timed on this 2-core CPU (64 queries, 384-d), the product was 1.6-6x faster than the pairs
# up to 48 entries per pair and even at 62 (at 4, the previous bound, the 5,000-image lookahead went pair by pair).
SHARED_SCORE_RATIO = 32
# Up to this many (query, edge) entries a lookahead scores every query of the batch against every edge of the trie in
# one product (64 queries x 65,536 edges: a 16 MB table), and reads its levels from that table: a 14,000-edge
# semantic trie has 16 levels, each of which would otherwise sort its edges and run its own product.
SCORE_TABLE_LIMIT = 1 << 22


@torch.no_grad()
def trie_beam_search(model: Any, trie: Any, encoded: Any, num_beams: int, top_k: int,
                     lookahead: int = LOOKAHEAD_POOL) -> list[list[tuple[int, float]]]:
    """Per query, up to `top_k` (identifier index, score) pairs, best first.

    Args:
        model: a `GcmrForRetrieval` with the identifier head.
        trie: the tokenizer's `PrefixTrie`.
        encoded: the model's `GcmrEncoderOutput` for the queries (memory, mask, query vectors).
        num_beams: unfinished prefixes kept per query and step.
        top_k: hits returned per query.
        lookahead: the `lookahead * num_beams` best prefixes of a query by partial sum are ranked for the beam by
            partial sum plus the best path of up to two edges below them (`_prune`); 0: by partial sum alone.
    """
    head = model.identifier_head
    scorer = head.on_trie(trie)
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
    known = _KnownAhead(engine.num_edges, device)
    base = encoded.query_vectors
    # Without a decoder term every step scores with the base query: no decoder runs, and the scores come from the
    # lookahead's products (exactly what the decoder path computes when its correction is zero).
    reads_states = head.reads_decoder_states
    hits_query, hits_key, hits_score = [], [], []
    for step in range(model.config.max_identifier_length + 1):
        if reads_states:
            if previous_edges is None:
                inputs = head.start_input.expand(len(nodes), 1, -1)
            else:
                inputs = head.edge_input(scorer.vectors_of(previous_edges))[:, None]
            states, cache = model.decoder_states(inputs, encoded, query_of_row, cache, use_cache=True)
            queries = base[query_of_row] + head.step_query(states[:, 0])
        rows, edges = engine.edges_of(nodes)
        if step == 0:
            # Every query starts at the root, so all rows share its children (rows ascending, children in order).
            children = edges[: len(edges) // num_queries]
            step_scores = scorer.shared_edge_scores(queries if reads_states else base, children).float()
            scores = (totals[:, None] + step_scores).flatten()
        elif reads_states:
            scores = totals[rows] + scorer.edge_scores(queries[rows], edges).float()
        else:
            scores = totals[rows] + _scores(scorer, base, query_of_row[rows], edges, known.score_table(scorer, base))
        keys = engine.key_index[edges]
        done = keys >= 0
        hits_query.append(query_of_row[rows[done]])
        hits_key.append(keys[done])
        hits_score.append(scores[done])
        rows, edges, scores = rows[~done], edges[~done], scores[~done]
        keep = _prune(scorer, engine, encoded.query_vectors, query_of_row, rows, edges, scores, num_beams, lookahead,
                      known)
        if len(keep) == 0:
            break
        parents, edges, scores = rows[keep], edges[keep], scores[keep]
        if reads_states:
            cache.reorder_cache(parents)
        query_of_row, totals, previous_edges = query_of_row[parents], scores, edges
        nodes = engine.next_node[edges]
    return _top_hits(num_queries, torch.cat(hits_query), torch.cat(hits_key), torch.cat(hits_score), top_k)


def _prune(scorer: Any, engine: Any, base: torch.Tensor, query_of_row: torch.Tensor, rows: torch.Tensor,
           edges: torch.Tensor, scores: torch.Tensor, width: int, lookahead: int,
           known: "_KnownAhead") -> torch.Tensor:
    """The `width` prefixes each query keeps, by partial score plus the best path of two (or more) edges below it.

    A prefix's partial sum is the score of the mean of the images below it (at step 0), a rough estimate of the best
    image below; the lookahead (base query vectors, no decoder run) makes it sharper. Only the `lookahead * width` best
    prefixes by partial sum are looked ahead (at the root of atomic identifiers every identifier is a candidate), or
    `LOOKAHEAD_POOL_FLOOR * width` where that many would score more than `LOOKAHEAD_EDGE_BUDGET` edges per query in
    the lookahead's first two levels. Prefixes that an earlier step's lookahead walked to the identifiers' ends take
    their value from `known` and are not walked again.
    The kept prefixes carry their true partial sums on.
    """
    groups = query_of_row[rows]
    if lookahead <= 0:
        return _best_per_group(groups, scores, width)
    pool = _best_per_group(groups, scores, lookahead * width)
    ahead, todo, first_level = _unknown(engine, known, groups, edges, pool)
    floor = min(lookahead, LOOKAHEAD_POOL_FLOOR)
    if floor < lookahead and len(todo):
        work = len(first_level[1]) + int(engine.fanout[engine.next_node[first_level[1]]].sum())
        if work > LOOKAHEAD_EDGE_BUDGET * len(torch.unique(groups[pool[todo]])):
            pool = _best_per_group(groups, scores, floor * width)
            ahead, todo, first_level = _unknown(engine, known, groups, edges, pool)
    if len(todo):
        walked = pool[todo]
        ahead[todo] = _best_below(scorer, engine, base, groups[walked], engine.next_node[edges[walked]], first_level,
                                  known)
    return pool[_best_per_group(groups[pool], scores[pool] + ahead, width)]


def _unknown(engine: Any, known: "_KnownAhead", groups: torch.Tensor, edges: torch.Tensor,
             pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The pool's known lookahead values (-inf where unknown), the pool positions still to walk, and their first
    lookahead level (`engine.edges_of` of their nodes)."""
    ahead, found = known.get(groups[pool], edges[pool])
    todo = torch.nonzero(~found).squeeze(-1)
    return ahead, todo, engine.edges_of(engine.next_node[edges[pool[todo]]])


def _best_below(scorer: Any, engine: Any, base: torch.Tensor, queries: torch.Tensor, nodes: torch.Tensor,
                first_level: tuple[torch.Tensor, torch.Tensor], known: "_KnownAhead") -> torch.Tensor:
    """Per node, the best sum of edge scores (base query vectors) over the paths of up to LOOKAHEAD_DEPTH edges below
    it, and deeper while the next level stays within LOOKAHEAD_FRONTIER edges per node and LOOKAHEAD_EDGE_BUDGET per
    query: at least two levels, because an image added to a grown collection keeps the codes of its neighbours and
    holds what sets it apart in the edge after them (its uniqueness token or EOS edge). `first_level` is
    `engine.edges_of(nodes)`, which the caller has already looked up to size the pool.

    Where the walk reached the end of every path (a small collection), the values are exact, and so are those of
    every edge on the way: they go into `known` for the later steps, whose candidates all lie below these nodes."""
    budget = min(LOOKAHEAD_FRONTIER * len(nodes), LOOKAHEAD_EDGE_BUDGET * len(torch.unique(queries)))
    levels = []  # per level walked: (row of each edge's parent in the level above, edges, their queries, scores)
    parents, child_edges = first_level
    owners = queries
    table = known.score_table(scorer, base)
    while len(child_edges) and (len(levels) < LOOKAHEAD_DEPTH or len(child_edges) <= budget):
        owners = owners[parents]
        scores = _scores(scorer, base, owners, child_edges, table)
        levels.append((parents, child_edges, owners, scores))
        parents, child_edges = engine.edges_of(engine.next_node[child_edges])
    exact = len(child_edges) == 0
    # Bottom-up: the best path below a level's edge stops at one of its children or goes on below that child.
    sizes = [len(nodes)] + [len(level[1]) for level in levels[:-1]]
    below = torch.full((len(levels[-1][1]) if levels else len(nodes),), float("-inf"), device=base.device)
    walked = []
    for (parents, child_edges, owners, scores), size in zip(reversed(levels), reversed(sizes)):
        walked.append((owners, child_edges, below))
        through = scores + below.clamp(min=0)
        below = torch.full((size,), float("-inf"), device=base.device).scatter_reduce(0, parents, through, "amax")
    if exact and walked:
        known.add(*(torch.cat(parts) for parts in zip(*walked)))
    return below


class _KnownAhead:
    """What one search's lookaheads share: its score table in a small trie, and exact lookahead values by (query,
    edge), the best sum of a path below the edge under the query's base vector. Beam search keeps a subset of the
    prefixes it looked ahead from, and the next step's candidates are
    their children, so once a lookahead has reached the identifiers' ends no later step walks that subtree again
    (semantic identifiers take 16 steps, and the first lookahead of a 1,000-image collection reaches their ends)."""

    def __init__(self, num_edges: int, device: torch.device) -> None:
        self.stride = num_edges + 1
        self.keys = torch.empty(0, dtype=torch.long, device=device)
        self.values = torch.empty(0, device=device)
        self._table: torch.Tensor | None = None

    def score_table(self, scorer: Any, base: torch.Tensor) -> torch.Tensor | None:
        """In a small trie, every query against every edge, one product made once per search (a lookahead that does
        not reach the ends runs at every step); None past SCORE_TABLE_LIMIT entries."""
        if self._table is None and len(base) * (self.stride - 1) <= SCORE_TABLE_LIMIT:
            self._table = scorer.shared_edge_scores(base, None)
        return self._table

    def get(self, queries: torch.Tensor, edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, found) for paired rows; -inf where not found."""
        if len(self.keys) == 0:
            missing = torch.full((len(edges),), float("-inf"), device=edges.device)
            return missing, torch.zeros_like(edges, dtype=torch.bool)
        wanted = queries * self.stride + edges
        position = torch.searchsorted(self.keys, wanted).clamp(max=len(self.keys) - 1)
        found = self.keys[position] == wanted
        return torch.where(found, self.values[position], float("-inf")), found

    def add(self, queries: torch.Tensor, edges: torch.Tensor, values: torch.Tensor) -> None:
        keys, order = torch.sort(torch.cat([self.keys, queries * self.stride + edges]))
        self.keys, self.values = keys, torch.cat([self.values, values])[order]


def _scores(scorer: Any, base: torch.Tensor, queries: torch.Tensor, edges: torch.Tensor,
            table: torch.Tensor | None) -> torch.Tensor:
    """scale * q . v(edge) of paired (query id, edge) rows under the base query vectors (read from the search's
    score table where it has one)."""
    if table is not None:
        return table[queries, edges].float()
    distinct, position = torch.unique(edges, return_inverse=True)
    if len(distinct) * len(base) <= SHARED_SCORE_RATIO * len(edges):
        # Every query against every distinct edge, one matrix product: near the root the queries of a batch look at
        # the same nodes, and deeper down a product is still cheaper than gathering a vector per (query, edge) pair.
        return scorer.shared_edge_scores(base, distinct)[queries, position].float()
    return scorer.owned_edge_scores(base, queries, edges).float()


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


__all__ = ["LOOKAHEAD_DEPTH", "LOOKAHEAD_EDGE_BUDGET", "LOOKAHEAD_FRONTIER", "LOOKAHEAD_POOL", "LOOKAHEAD_POOL_FLOOR",
           "SCORE_TABLE_LIMIT", "SHARED_SCORE_RATIO", "trie_beam_search"]
