"""The identifier head: an identifier's score is the sum, over its steps, of a query vector times an edge vector.

Every edge of the identifier trie (a token in the context of the prefix before it, EOS edges included) has a vector
in the identifier space, the space of the image features the identifiers were built from. Decoding step t has a
query vector `q_t = q_0 + W h_t`: `q_0` is the query's own vector (pooled text through the query projection, or the
image feature), and `W h_t` a correction read from the decoder state, which starts at zero. The score of
identifier i with trie path e_0 .. e_L (the last one its EOS edge) is

    score(i) = scale * sum_t  q_t . v(e_t)

and beam search ranks prefixes by the same partial sums (RIPOR, Zeng et al. 2024, scores identifiers this way).

Why this form:
- Edge vectors start as "what each step adds" (`initialize_from_features`): v(e) is the mean, over the images
  below e, of what is left of their feature after the edges above e, so every path sums to its image's feature
  exactly. Before any training step, score(i) = scale * q_0 . x_i: beam search is a tree search over the
  identifiers that ranks complete identifiers exactly like dense inner-product search, and step 0 is inner-product
  search against the first-level centroids. For atomic identifiers it *is* dense search. Training then only has to
  add what dense similarity misses.
- Vectors belong to edges, not tokens: a GRACE structured token <s1_5> means "child 5" under every parent, so one
  vector per token would average unrelated clusters. On f30k-dev (MiniLM features, beam 10) shared token vectors
  reached R@1 20.6 (coarse_fine 32/2x32) and 6.7 (structured 30/30) at initialization; edge vectors 62.2 and 63.4,
  against 65.2 for dense search.
- Scores are summed, not log-softmax normalised per step: normalising made identifiers of different lengths
  incomparable and, per node, rewarded single-child paths (R@1 37-55 against 62-64 raw on the same data).

Training (`loss`) is softmax cross-entropy over all identifiers of these sums (sampled negatives past
`FULL_SOFTMAX_LIMIT` identifiers), plus, per depth, cross-entropy over the prefixes of that depth, which trains the
partial sums that beam search prunes with. Candidates are scored with the gold row's query vectors.
"""
from __future__ import annotations

import math
import weakref
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Up to this many identifiers the softmax covers them all; beyond, the gold rows and a uniform sample of this
# many (B x T x edges scores would not fit a training step at a million identifiers).
FULL_SOFTMAX_LIMIT = 32_768
# Rows per chunk when edge vectors start from features (bounds the scratch memory at any collection size).
INIT_CHUNK = 16_384
# The vector row that every forced EOS edge scores with when the config has `shared_eos_vector`.
SHARED_EOS_ROW = 0


class IdentifierHead(nn.Module):
    """Edge vectors of the identifier trie, the per-step query correction, and the decoder's input vectors.

    Args:
        identifier_dim: width of the identifier space.
        decoder_dim: width of the decoder states.
        num_identifiers, num_edges, max_length: sizes of the identifier table and its trie.
        score_scale: initial inverse temperature of the scores (learned).
    """

    def __init__(self, identifier_dim: int, decoder_dim: int, num_identifiers: int, num_edges: int, max_length: int,
                 score_scale: float):
        super().__init__()
        self.edge_vectors = nn.Parameter(torch.zeros(num_edges, identifier_dim))
        # paths[i, t]: the trie edge identifier i takes at step t (its EOS edge last), -1 after it.
        self.register_buffer("paths", torch.full((num_identifiers, max_length + 1), -1, dtype=torch.int32))
        # token_rows[i]: identifier i's token ids (-1 padded), to find the identifier a label spells.
        self.register_buffer("token_rows", torch.full((num_identifiers, max_length), -1, dtype=torch.int32))
        self.step_query = nn.Linear(decoder_dim, identifier_dim)
        self.step_query.gcmr_init = "zeros"  # q_t starts as q_0: step 0 of beam search is inner-product search
        self.edge_input = nn.Linear(identifier_dim, decoder_dim)
        self.start_input = nn.Parameter(torch.zeros(decoder_dim))
        self.log_scale = nn.Parameter(torch.tensor(math.log(score_scale)))
        self._row_index_cache: tuple[np.ndarray, np.ndarray] | None = None
        self._edge_rows_cache: tuple[weakref.ref, torch.Tensor | None] | None = None
        # Set by the training set-up for a sampled softmax (`training/optimization.py`): the lookups' gradient is then
        # sparse (the rows read), for `LazyAdamW`; never saved.
        self.sparse_gradients = False

    @property
    def num_identifiers(self) -> int:
        return int(self.paths.shape[0])

    @property
    def samples_softmax(self) -> bool:
        """Whether training scores a batch against a sample of identifiers (past FULL_SOFTMAX_LIMIT) or all."""
        return self.num_identifiers > FULL_SOFTMAX_LIMIT

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    @property
    def reads_decoder_states(self) -> bool:
        """Whether a step's query depends on the decoder: False while the correction `W h_t + b` is exactly zero (as
        initialised, and where training keeps it fixed: `--decoder_learning_rate 0`), so that beam search scores
        every step with the base query and runs no decoder."""
        correction = self.step_query
        return bool(correction.weight.any()) or (correction.bias is not None and bool(correction.bias.any()))

    @property
    def decoder_is_idle(self) -> bool:
        """Whether the decoder can change no score, now or by training: its step correction is zero and frozen
        (`optimizer_cls_and_kwargs` freezes the parts whose learning rate is 0). Training then runs no decoder."""
        return not self.reads_decoder_states and not any(p.requires_grad for p in self.step_query.parameters())

    # ----------------------------------------------------------------------------------------------- set-up
    @torch.no_grad()
    def set_identifiers(self, paths: torch.Tensor, token_rows: torch.Tensor, num_edges: int,
                        vectors: torch.Tensor | None = None) -> None:
        """Point the head at a new identifier table and trie (sizes change; edge vectors restart at zero, or are
        `vectors` (num_edges, D), which the head then owns)."""
        self.paths = paths.to(self.paths.device, torch.int32)
        self.token_rows = token_rows.to(self.token_rows.device, torch.int32)
        self._row_index_cache = None
        self._edge_rows_cache = None
        if vectors is None and self.edge_vectors.shape[0] == num_edges:
            self.edge_vectors.zero_()
            return
        # The old vectors go before the new ones exist: at a million identifiers each set is gigabytes.
        empty = self.edge_vectors.new_empty(0, self.edge_vectors.shape[1])
        requires_grad = self.edge_vectors.requires_grad
        self.edge_vectors = nn.Parameter(empty, requires_grad=requires_grad)
        if vectors is None:
            self.edge_vectors = nn.Parameter(empty.new_zeros(num_edges, empty.shape[1]))
        else:
            self.edge_vectors = nn.Parameter(vectors.to(empty.device), requires_grad=requires_grad)

    @torch.no_grad()
    def initialize_from_features(self, features: torch.Tensor) -> None:
        """Edge vectors that sum to each identifier's feature along its path (module docstring).

        `features` (N, D) follows the identifier rows. Depth by depth, each edge takes the mean of what is left
        of the features below it; the EOS edge, unique to its identifier, takes the rest.
        """
        # Depth by depth, chunk by chunk, in place: what is left of a row is recomputed from its path (at most
        # max_length gathers) instead of kept, and an edge's sum builds up in its own (still zero) row, so nothing
        # of size (N x D) or (edges x D) is held besides the vectors themselves (at a million identifiers each
        # such scratch matrix was 2 to 6 GB).
        vectors = self.edge_vectors
        vectors.zero_()
        for depth in range(self.paths.shape[1]):
            edges = self.paths[:, depth].long()
            rows = torch.nonzero(edges >= 0).squeeze(-1)
            for start in range(0, len(rows), INIT_CHUNK):
                chunk = rows[start : start + INIT_CHUNK]
                left = features[chunk.to(features.device)].to(vectors.device, torch.float32)
                left -= vectors[self.paths[chunk, :depth].long()].sum(dim=1)
                vectors.index_add_(0, edges[chunk], left.to(vectors.dtype))
            counts = torch.bincount(edges[rows], minlength=len(vectors))
            touched = torch.nonzero(counts).squeeze(-1)
            for start in range(0, len(touched), INIT_CHUNK):
                part = touched[start : start + INIT_CHUNK]
                vectors[part] /= counts[part, None].to(vectors.dtype)

    @torch.no_grad()
    def initialize_from_tokens(self, token_vectors: torch.Tensor, edge_tokens: torch.Tensor) -> None:
        """Each edge starts at its token's vector (rows of NaN: zero); a rough start when no features are given."""
        vectors = token_vectors[edge_tokens.clamp(min=0)].nan_to_num(0.0)
        self.edge_vectors.copy_(torch.where((edge_tokens >= 0)[:, None], vectors, 0.0))

    # ----------------------------------------------------------------------------------------------- trie edges
    def edge_rows(self, trie: Any) -> torch.Tensor | None:
        """The row of `edge_vectors` that each edge of `trie` (the tokenizer's, numbered in (node, token) order)
        scores with; None where the two numberings coincide (a head fitted to this trie and never grown).

        `add_images` appends the new edges' vectors after the old ones instead of rewriting the table in the rebuilt
        trie's order (at a million images that rewrite was 5.5-7 of an add's 9-10 s), so after an add the numberings
        differ. They are matched once per trie object: each identifier's edges in the trie against its row of `paths`
        (which is in vector rows). A reloaded pair matches them again the same way; nothing extra is saved."""
        cached = self._edge_rows_cache
        if cached is not None and cached[0]() is trie:
            return cached[1]
        trie_paths = torch.as_tensor(trie.paths(self.token_rows.cpu().numpy()))
        paths = self.paths.long().cpu()
        valid = paths >= 0
        matches = trie_paths.shape == paths.shape and torch.equal(trie_paths >= 0, valid)
        if matches:
            rows = torch.full((trie.num_edges,), -1, dtype=torch.long)
            rows[trie_paths[valid]] = paths[valid]
            # One row per trie edge: a trie whose edges the model's paths would score with two different rows
            # spells other identifiers. (Counting edges against rows proves nothing: with `shared_eos_vector` every
            # forced EOS edge scores with one row.)
            matches = bool(torch.equal(rows[trie_paths[valid]], paths[valid])) and (
                len(rows) == 0 or int(rows.max()) < len(self.edge_vectors))
        if not matches:
            raise ValueError(f"the trie ({trie.num_edges} edges) does not spell this model's {self.num_identifiers} "
                             f"identifiers ({len(self.edge_vectors)} edge vectors): use the tokenizer saved with the "
                             "model")
        self.remember_edge_rows(trie, rows)
        return self._edge_rows_cache[1]

    def remember_edge_rows(self, trie: Any, rows: torch.Tensor) -> None:
        """Record `edge_rows(trie)` where the caller already knows it (an add builds it with the grown trie)."""
        if (rows < 0).any():
            raise ValueError("every trie edge needs an edge vector row; a trie edge lies on no identifier's path")
        identity = torch.equal(rows, torch.arange(len(rows)))
        self._edge_rows_cache = (weakref.ref(trie), None if identity else rows.to(self.edge_vectors.device))

    def on_trie(self, trie: Any) -> "TrieEdgeScores":
        """The scores below, addressed by the edge numbers of `trie` (what beam search walks)."""
        return TrieEdgeScores(self, self.edge_rows(trie))

    # ----------------------------------------------------------------------------------------------- decoding pieces
    def vectors_of(self, edges: torch.Tensor) -> torch.Tensor:
        """The edge vectors of an index tensor of any shape: (...,) -> (..., D).

        Every lookup goes through `index_select`: its backward adds the rows into the gradient with `index_add_`,
        where advanced indexing's accumulating `index_put_` took twice as long on CPU (200k edges, 32k sampled
        paths: 2.0 s -> 0.9 s per backward); with `sparse_gradients`, the gradient holds only the rows read and goes
        to `edge_vectors.sparse_grad` (`_RowsWithSparseGradient`)."""
        flat = edges.reshape(-1)
        if self.sparse_gradients and torch.is_grad_enabled() and self.edge_vectors.requires_grad:
            rows = _RowsWithSparseGradient.apply(self.edge_vectors, flat)
        else:
            rows = self.edge_vectors.index_select(0, flat)
        return rows.view(*edges.shape, self.edge_vectors.shape[1])

    def decoder_inputs(self, previous_edges: torch.Tensor) -> torch.Tensor:
        """Decoder input vectors: the start vector at step 0, then each step's previous edge; (B, T) -> (B, T, dec)."""
        batch, steps = previous_edges.shape
        start = self.start_input.expand(batch, 1, -1)
        if steps == 1:
            return start
        taken = self.vectors_of(previous_edges[:, :-1].clamp(min=0))
        return torch.cat([start, self.edge_input(taken)], dim=1)

    def step_queries(self, base: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """q_t = q_0 + W h_t for every step: base (B, D), states (B, T, dec) -> (B, T, D)."""
        return base[:, None, :] + self.step_query(states)

    def edge_scores(self, queries: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """scale * q . v(edge) for paired rows: queries (R, D), edges (R,) -> (R,). A row-wise einsum, which skips
        the (R, D) product that `(q * v).sum(-1)` writes (a third faster on CPU at 63k rows of 384), except in half
        precision on CPU: there the einsum runs as R one-row matrix products without a fast kernel (14k rows of 512
        in bf16: 12-13 ms, `torch.linalg.vecdot` 1.2 ms; the 1M search's largest cost in a bf16 checkpoint)."""
        vectors = self.vectors_of(edges)
        if vectors.device.type == "cpu" and vectors.dtype in (torch.bfloat16, torch.float16):
            return self.scale * torch.linalg.vecdot(queries, vectors)
        return self.scale * torch.einsum("rd,rd->r", queries, vectors)

    def owned_edge_scores(self, queries: torch.Tensor, owners: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """scale * queries[owner] . v(edge) for paired rows: queries (Q, D), owners and edges (R,) -> (R,).

        Search only (no gradient). On CPU one matrix-vector product per query over its own edges' vectors, instead of
        a gathered query row per pair next to a gathered edge vector: at a million images the lookahead scores
        ~170k pairs of queries near distinct images at a time, and the pairwise product was memory-bound (174k pairs
        of 512: 274 ms with the einsum over both gathered copies, 38 ms grouped by query; `benchmarks/
        scale_search.py`). Elsewhere (a GPU) the einsum of `edge_scores`."""
        if queries.device.type != "cpu" or len(edges) == 0:
            return self.edge_scores(queries[owners], edges)
        order = None
        if bool((owners[1:] < owners[:-1]).any()):
            # The lookahead's pairs come grouped by query; anything else is grouped here.
            order = torch.argsort(owners, stable=True)
            owners, edges = owners[order], edges[order]
        scores = torch.empty(len(edges), dtype=queries.dtype, device=queries.device)
        ids, counts = torch.unique_consecutive(owners, return_counts=True)
        start = 0
        for query, count in zip(ids.tolist(), counts.tolist()):
            scores[start : start + count] = self.vectors_of(edges[start : start + count]) @ queries[query]
            start += count
        scores = self.scale * scores
        if order is None:
            return scores
        return torch.empty_like(scores).index_copy_(0, order, scores)

    def shared_edge_scores(self, queries: torch.Tensor, edges: torch.Tensor | None) -> torch.Tensor:
        """scale * q . v(edge) for every query against the same edges (None: every edge of the trie): queries (R, D),
        edges (E,) -> (R, E). One matrix product, where pairing would gather an (R * E, D) copy of the edge vectors
        (at the root of a million atomic identifiers, gigabytes per batch)."""
        vectors = self.edge_vectors if edges is None else self.vectors_of(edges)
        return self.scale * (queries @ vectors.T)

    # ----------------------------------------------------------------------------------------------- labels
    def identifier_index(self, labels: torch.Tensor, eos_token_id: int) -> torch.Tensor:
        """The identifier each label row spells (token ids, then EOS, then -100 or padding); a ValueError if none."""
        if self.num_identifiers == 0:
            raise ValueError("this model has no identifiers yet: call model.set_identifier_vocabulary(tokenizer)")
        width = self.token_rows.shape[1]
        tokens = labels.long().clone()
        ended = torch.cumsum((tokens == eos_token_id) | (tokens < 0), dim=1) > 0
        tokens[ended] = -1
        too_long = (tokens[:, width:] >= 0).any(dim=1) if tokens.shape[1] > width else torch.zeros_like(ended[:, 0])
        rows = torch.full((len(tokens), width), -1, dtype=torch.long, device=tokens.device)
        rows[:, : min(width, tokens.shape[1])] = tokens[:, :width]
        sorted_rows, order = self._row_index()
        wanted = _as_void_rows(rows.cpu().numpy())
        position = np.minimum(np.searchsorted(sorted_rows, wanted), len(sorted_rows) - 1)
        match = (sorted_rows[position] == wanted) & ~too_long.cpu().numpy()
        if not match.all():
            bad = int(np.flatnonzero(~match)[0])
            raise ValueError(
                f"labels row {bad} ({labels[bad].tolist()}) is not the identifier of any image of this model; build "
                "labels with tokenizer.encode_identifiers(keys) from the tokenizer saved with the model"
            )
        return torch.as_tensor(order[position], device=labels.device)

    def _row_index(self) -> tuple[np.ndarray, np.ndarray]:
        """The identifier rows as sorted byte strings (exact match by binary search), and their row numbers."""
        if self._row_index_cache is None:
            rows = _as_void_rows(self.token_rows.cpu().numpy().astype(np.int64))
            order = np.argsort(rows, kind="stable")
            self._row_index_cache = (rows[order], order)
        return self._row_index_cache

    # ----------------------------------------------------------------------------------------------- training
    def candidates(self, gold: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(candidate identifiers or None for all, the gold rows' positions among them)."""
        if not self.samples_softmax:
            return None, gold
        sample = torch.randint(self.num_identifiers, (FULL_SOFTMAX_LIMIT,), device=gold.device)
        candidates, inverse = torch.unique(torch.cat([gold, sample]), return_inverse=True)
        return candidates, inverse[: len(gold)]

    def step_scores(self, queries: torch.Tensor, candidates: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-step scores of the candidates under each row's query vectors: (B, T, C), and their paths (C, T)."""
        paths = self.paths.long() if candidates is None else self.paths.long()[candidates]
        steps = paths.shape[1]
        queries = queries[:, :steps]
        rows = paths.clamp(min=0)
        if candidates is None and not self.sparse_gradients:
            per_edge = torch.einsum("btd,ed->bte", queries, self.edge_vectors)
        else:
            # Each edge read once: sampled paths share their first levels (and, with a shared EOS vector, their
            # last), so a (C, T, D) gather of every path's vectors held each shared edge many times, with its
            # gradient (1M coarse_fine: 194k rows gathered for 60k distinct; the training step's transient memory).
            read, rows = torch.unique(rows, return_inverse=True)
            per_edge = torch.einsum("btd,ed->bte", queries, self.vectors_of(read))
        scores = per_edge.gather(2, rows.T.unsqueeze(0).expand(len(queries), -1, -1))
        return scores * (paths.T >= 0), paths

    def loss(self, queries: torch.Tensor, gold: torch.Tensor, prefix_weight: float,
             teacher_scores: torch.Tensor | None = None, distill_weight: float = 0.0,
             candidates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training loss and the identifier logits (B, C) it was computed from.

        Args:
            queries: (B, T, D) step query vectors of the gold paths (teacher forcing).
            gold: (B,) gold positions among the candidates.
            prefix_weight: weight of the mean per-depth prefix cross-entropy.
            teacher_scores: (B, C) dense teacher logits for distillation; rows with NaN have no teacher.
            candidates: from `candidates()`; None for all identifiers.
        """
        scores, paths = self.step_scores(queries, candidates)
        partial = self.scale * scores.cumsum(dim=1)
        logits = partial[:, -1]
        loss = F.cross_entropy(logits.float(), gold)
        if prefix_weight > 0:
            loss = loss + prefix_weight * _prefix_loss(partial, paths, gold)
        if distill_weight > 0 and teacher_scores is not None:
            taught = ~teacher_scores.isnan().any(dim=-1)
            if taught.any():
                # Summed over the taught rows, divided by all rows: a mean of per-row terms, as the other losses.
                divergence = F.kl_div(
                    logits[taught].float().log_softmax(-1), teacher_scores[taught].float().log_softmax(-1),
                    log_target=True, reduction="sum",
                )
                loss = loss + distill_weight * divergence / len(logits)
        return loss, logits


class _RowsWithSparseGradient(torch.autograd.Function):
    """`weight.index_select(0, rows)` whose gradient for `weight` is sparse (the rows read) and is added to
    `weight.sparse_grad` instead of `.grad`, which stays None: transformers' Trainer takes the norm of every `.grad`
    at every step with torch's `clip_grad_norm_`, which has no sparse kernel. `training/lazy_adamw.py` reads it."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.weight = weight
        ctx.save_for_backward(rows)
        return weight.index_select(0, rows)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:
        (rows,) = ctx.saved_tensors
        update = torch.sparse_coo_tensor(rows[None], grad, ctx.weight.shape, check_invariants=False)
        held = getattr(ctx.weight, "sparse_grad", None)
        ctx.weight.sparse_grad = update if held is None else held + update
        return None, None


class TrieEdgeScores:
    """The identifier head's vectors and scores addressed by the edge numbers of a trie (`IdentifierHead.on_trie`):
    beam search walks the tokenizer's trie, whose numbering an add leaves behind the head's vector rows."""

    def __init__(self, head: IdentifierHead, rows: torch.Tensor | None) -> None:
        self.head, self.rows = head, rows

    def _rows(self, edges: torch.Tensor) -> torch.Tensor:
        return edges if self.rows is None else self.rows[edges]

    def vectors_of(self, edges: torch.Tensor) -> torch.Tensor:
        return self.head.vectors_of(self._rows(edges))

    def edge_scores(self, queries: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        return self.head.edge_scores(queries, self._rows(edges))

    def owned_edge_scores(self, queries: torch.Tensor, owners: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        return self.head.owned_edge_scores(queries, owners, self._rows(edges))

    def shared_edge_scores(self, queries: torch.Tensor, edges: torch.Tensor | None) -> torch.Tensor:
        """(R, E) scores; `edges` None: every edge of the trie, in the trie's order."""
        if edges is None:
            return self.head.shared_edge_scores(queries, self.rows)
        return self.head.shared_edge_scores(queries, self._rows(edges))


def forced_eos_edges(trie_paths: torch.Tensor, num_edges: int, elsewhere: torch.Tensor | None = None) -> torch.Tensor:
    """The trie edges (numbers) that are forced EOS edges of the identifiers in `trie_paths` (N, L + 1: each one's
    trie edges, its EOS edge last, -1 after it): the edge before the EOS lies on no other identifier's path.

    `elsewhere` (bool per trie edge): edges that other identifiers, not in `trie_paths`, also take (an add passes
    the old identifiers' edges and only the new identifiers' paths, so it costs what it adds, not the collection)."""
    valid = trie_paths >= 0
    lengths = valid.sum(dim=1)
    through = torch.bincount(trie_paths[valid].long(), minlength=num_edges)
    index = torch.arange(len(trie_paths))
    before = trie_paths[index, (lengths - 2).clamp(min=0)].long()
    forced = (lengths >= 2) & (through[before] == 1)
    if elsewhere is not None:
        forced &= ~elsewhere[before]
    return trie_paths[index[forced], lengths[forced] - 1].long()


def share_forced_eos_rows(trie_paths: torch.Tensor, num_edges: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vector rows for a trie's edges where every forced EOS edge shares `SHARED_EOS_ROW` (`shared_eos_vector`).

    An EOS edge is forced where the edge before it lies on no other identifier's path: that edge then already
    belongs to the identifier alone, and a second vector of its own adds nothing that search without decoder states
    can tell apart. Returns (the paths in rows, the row of each of the `num_edges` trie edges); the other edges keep
    their order after the shared row."""
    own = torch.ones(num_edges, dtype=torch.bool)
    own[forced_eos_edges(trie_paths, num_edges)] = False
    rows = torch.full((num_edges,), SHARED_EOS_ROW, dtype=torch.long)
    rows[own] = SHARED_EOS_ROW + 1 + torch.arange(int(own.sum()))
    return torch.where(trie_paths >= 0, rows[trie_paths.clamp(min=0).long()], -1), rows


def _prefix_loss(partial: torch.Tensor, paths: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """Per row, the mean over its depths (before its last edge) of the cross-entropy of its gold prefix against the
    other prefixes; then the mean over the rows.

    Candidates that share a prefix share its partial sum, so each distinct edge of a depth is scored once. As in
    beam search, identifiers that end at a depth (their EOS edge) or before it do not compete for its beams; rows
    whose own identifier ends there take no part in it. A mean of per-row terms (not of per-depth means, whose row
    counts depend on the batch): a batch split over DDP processes or gradient-accumulation steps then gets the
    gradient it gets whole, also where identifiers differ in length.
    """
    gold_length = (paths[gold] >= 0).sum(dim=1)  # edges on the gold path, EOS included
    per_row = partial.new_zeros(len(gold), dtype=torch.float32)
    for depth in range(paths.shape[1] - 1):
        rows = torch.nonzero(depth < gold_length - 1).squeeze(-1)
        if len(rows) == 0:
            continue
        edges, inverse = torch.unique(paths[:, depth], return_inverse=True)
        representative = torch.zeros(len(edges), dtype=torch.long, device=paths.device)
        representative.scatter_(0, inverse, torch.arange(len(inverse), device=paths.device))
        logits = partial[rows, depth][:, representative].float()
        ends_here = paths[representative, depth + 1] < 0
        logits = logits.masked_fill(((edges < 0) | ends_here)[None], float("-inf"))
        per_row = per_row.index_add(0, rows, F.cross_entropy(logits, inverse[gold[rows]], reduction="none"))
    return (per_row / (gold_length - 1).clamp(min=1)).mean()


def _as_void_rows(rows: np.ndarray) -> np.ndarray:
    """Each int64 row as one opaque byte string: numpy sorts and searches those by memcmp, exactly."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    return rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).reshape(-1)


__all__ = ["FULL_SOFTMAX_LIMIT", "SHARED_EOS_ROW", "IdentifierHead", "TrieEdgeScores", "forced_eos_edges",
           "share_forced_eos_rows"]
