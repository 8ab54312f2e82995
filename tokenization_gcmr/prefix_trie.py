"""A prefix trie over identifier token ids, stored as flat CSR arrays.

Every identifier is inserted as ``ids + [eos_token_id]``, so identifiers that are prefixes of each
other (semantic ids) stay apart: only the EOS edge ends one. Node 0 is the root; the edges of node
``n`` are ``offsets[n]:offsets[n + 1]``, sorted by token, and the edges of all nodes together are
sorted by ``(node, token)``, so ``node * vocab_size + token`` is a sorted search key. An EOS edge
points to ``-(key_index + 1)`` instead of a node. Nodes are numbered level by level, which is what
lets the build run as a handful of numpy passes (one per token position) instead of a Python loop
per identifier.
"""
from __future__ import annotations

import numpy as np

_INT32_MAX = np.iinfo(np.int32).max


def _smallest_int(max_abs: int) -> type:
    return np.int32 if max_abs <= _INT32_MAX else np.int64


class PrefixTrieError(ValueError):
    """Identifier rows that cannot form a trie (duplicates, bad padding, tokens out of range)."""


class PrefixTrie:
    """Constrained-decoding trie over identifier token ids (CSR arrays, see the module docstring)."""

    def __init__(
        self,
        offsets: np.ndarray,
        child_tokens: np.ndarray,
        child_nodes: np.ndarray,
        eos_token_id: int,
        vocab_size: int,
    ) -> None:
        self.offsets = np.asarray(offsets)
        self.child_tokens = np.asarray(child_tokens)
        self.child_nodes = np.asarray(child_nodes)
        self.eos_token_id = int(eos_token_id)
        self.vocab_size = int(vocab_size)
        if self.offsets.ndim != 1 or self.offsets.size < 1 or self.offsets[0] != 0:
            raise PrefixTrieError("offsets must be 1-D, start at 0 and have num_nodes + 1 entries")
        if self.child_tokens.shape != self.child_nodes.shape or self.offsets[-1] != self.child_tokens.size:
            raise PrefixTrieError(
                f"offsets end at {self.offsets[-1]} but there are {self.child_tokens.size} tokens and "
                f"{self.child_nodes.size} child nodes"
            )
        self.num_identifiers = int((self.child_nodes < 0).sum())

    @classmethod
    def from_sequences(cls, rows: np.ndarray, eos_token_id: int, vocab_size: int) -> "PrefixTrie":
        """Build the trie from identifier token ids: ``rows`` is (N, L), right-padded with -1.

        Row ``i`` becomes key index ``i``. Rows must be unique, non-empty and free of EOS.
        """
        rows = np.asarray(rows)
        if rows.ndim != 2:
            raise PrefixTrieError(f"rows must be 2-D (N, L), got shape {rows.shape}")
        num_rows, width = rows.shape
        eos_token_id, vocab_size = int(eos_token_id), int(vocab_size)
        if not 0 <= eos_token_id < vocab_size:
            raise PrefixTrieError(f"eos_token_id {eos_token_id} is outside the vocabulary [0, {vocab_size})")
        valid = rows >= 0
        lengths = valid.sum(axis=1)
        if num_rows and width:
            if (rows < -1).any() or (rows >= vocab_size).any():
                bad = int(np.argwhere((rows < -1) | (rows >= vocab_size))[0, 0])
                raise PrefixTrieError(f"row {bad} has a token outside [0, {vocab_size}) (padding is -1): {rows[bad].tolist()}")
            malformed = (valid[:, 1:] & ~valid[:, :-1]).any(axis=1) | (lengths == 0)
            if malformed.any():
                bad = int(np.flatnonzero(malformed)[0])
                raise PrefixTrieError(f"row {bad} is empty or not right-padded with -1: {rows[bad].tolist()}")
            if (rows == eos_token_id).any():
                bad = int(np.argwhere(rows == eos_token_id)[0, 0])
                raise PrefixTrieError(f"row {bad} contains the EOS token {eos_token_id}: {rows[bad].tolist()}")
        elif num_rows:
            raise PrefixTrieError("every identifier needs at least one token")

        token_dtype = _smallest_int(vocab_size)
        # Append EOS after each row's last token; the padding after it never influences the trie.
        seq = np.full((num_rows, width + 1), -1, dtype=token_dtype)
        seq[:, :width] = rows
        seq[np.arange(num_rows), lengths] = eos_token_id
        order = np.lexsort(seq.T[::-1]) if num_rows else np.zeros(0, dtype=np.int64)
        seq = seq[order]

        # first_diff[i]: first position where sorted row i differs from row i - 1 (0 for the first row).
        first_diff = np.zeros(num_rows, dtype=np.int64)
        if num_rows > 1:
            differs = seq[1:] != seq[:-1]
            same = ~differs.any(axis=1)
            if same.any():
                i = int(np.flatnonzero(same)[0])
                a, b = sorted((int(order[i]), int(order[i + 1])))
                raise PrefixTrieError(f"rows {a} and {b} are the same identifier: {rows[a].tolist()}")
            first_diff[1:] = differs.argmax(axis=1)

        node_of_row = np.zeros(num_rows, dtype=np.int64)
        next_node = 1
        parents, tokens, children = [], [], []
        for depth in range(width + 1):
            token = seq[:, depth]
            # A row opens a new edge at this depth when its prefix up to and including `depth` is new.
            opens = (first_diff <= depth) & (token >= 0)
            edge_rows = np.flatnonzero(opens)
            if edge_rows.size == 0:
                break
            edge_tokens = token[edge_rows]
            is_eos = edge_tokens == eos_token_id
            new_nodes = next_node + np.cumsum(~is_eos) - 1
            child = np.where(is_eos, -(order[edge_rows] + 1), new_nodes)
            parents.append(node_of_row[edge_rows])
            tokens.append(edge_tokens)
            children.append(child)
            next_node += int((~is_eos).sum())
            # Rows that share the new prefix continue from the node their first row created;
            # node ids grow along the sorted rows, so a running maximum fills them forward.
            fill = np.full(num_rows, -1, dtype=np.int64)
            fill[edge_rows] = np.maximum(child, -1)
            node_of_row = np.maximum.accumulate(fill)

        num_nodes = next_node
        parent = np.concatenate(parents) if parents else np.zeros(0, dtype=np.int64)
        num_edges = parent.size
        offsets = np.zeros(num_nodes + 1, dtype=_smallest_int(num_edges))
        np.cumsum(np.bincount(parent, minlength=num_nodes), out=offsets[1:])
        child_tokens = np.concatenate(tokens).astype(token_dtype) if tokens else np.zeros(0, dtype=token_dtype)
        child_dtype = _smallest_int(max(num_nodes, num_rows + 1))
        child_nodes = np.concatenate(children).astype(child_dtype) if children else np.zeros(0, dtype=child_dtype)
        return cls(offsets, child_tokens, child_nodes, eos_token_id, vocab_size)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "PrefixTrie":
        """Inverse of :meth:`arrays`."""
        return cls(
            arrays["offsets"], arrays["child_tokens"], arrays["child_nodes"],
            int(arrays["eos_token_id"]), int(arrays["vocab_size"]),
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """The CSR arrays plus ``eos_token_id`` and ``vocab_size`` as 0-d arrays: all the model side needs."""
        return {
            "offsets": self.offsets,
            "child_tokens": self.child_tokens,
            "child_nodes": self.child_nodes,
            "eos_token_id": np.array(self.eos_token_id, dtype=np.int64),
            "vocab_size": np.array(self.vocab_size, dtype=np.int64),
        }

    @property
    def num_nodes(self) -> int:
        return int(self.offsets.size - 1)

    @property
    def num_edges(self) -> int:
        return int(self.child_tokens.size)

    @property
    def nbytes(self) -> int:
        return int(self.offsets.nbytes + self.child_tokens.nbytes + self.child_nodes.nbytes)

    @property
    def max_fanout(self) -> int:
        return int(np.diff(self.offsets).max()) if self.num_nodes else 0

    @property
    def depth(self) -> int:
        """Edges on the longest root-to-EOS path (the longest identifier plus its EOS).

        Relies on the level-by-level node numbering: each level is a contiguous range of nodes.
        """
        depth, first, last = 0, 0, 1
        while first < last and self.offsets[last] > self.offsets[first]:
            depth += 1
            children = self.child_nodes[self.offsets[first] : self.offsets[last]]
            inner = children[children >= 0]
            first, last = (int(inner.min()), int(inner.max()) + 1) if inner.size else (0, 0)
        return depth

    def find_edges(self, nodes: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Edge index of ``(node, token)`` for each pair, or -1 where the node has no such child.

        A vectorised binary search inside each node's slice: log2(max fan-out) numpy steps.
        """
        nodes = np.asarray(nodes, dtype=np.int64)
        tokens = np.asarray(tokens, dtype=np.int64)
        lo = self.offsets[nodes].astype(np.int64)
        end = self.offsets[nodes + 1].astype(np.int64)
        hi = end.copy()
        while True:
            active = lo < hi
            if not active.any():
                break
            mid = (lo + hi) // 2
            go_right = active & (self.child_tokens[np.minimum(mid, max(self.num_edges - 1, 0))] < tokens)
            lo = np.where(go_right, mid + 1, lo)
            hi = np.where(active & ~go_right, mid, hi)
        found = lo < end
        found[found] = self.child_tokens[lo[found]] == tokens[found]
        return np.where(found, lo, -1)

    def lookup(self, rows: np.ndarray) -> np.ndarray:
        """Key index of each row of token ids, or -1 where the row is not an identifier.

        ``rows`` is (B, L); a row ends at its first -1 or EOS (anything after that is ignored).
        """
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 2:
            raise PrefixTrieError(f"rows must be 2-D (B, L), got shape {rows.shape}")
        batch, width = rows.shape
        node = np.zeros(batch, dtype=np.int64)
        result = np.full(batch, -1, dtype=np.int64)
        alive = np.full(batch, self.num_edges > 0)
        for depth in range(width + 1):
            if not alive.any():
                break
            token = rows[:, depth] if depth < width else np.full(batch, -1, dtype=np.int64)
            ends = alive & ((token < 0) | (token == self.eos_token_id))
            step = np.where(ends, self.eos_token_id, token)
            idx = np.flatnonzero(alive)
            edge = self.find_edges(node[idx], step[idx])
            child = np.where(edge >= 0, self.child_nodes[np.maximum(edge, 0)], 0)
            finished = ends[idx]
            hit = finished & (edge >= 0)
            result[idx[hit]] = -child[hit] - 1
            moves = ~finished & (edge >= 0) & (child >= 0)
            alive[idx] = moves
            node[idx[moves]] = child[moves]
        return result

    def allowed(self, prefix: list[int] | np.ndarray) -> np.ndarray:
        """Tokens that may follow ``prefix`` (EOS included where the prefix is a whole identifier)."""
        node = 0
        for token in prefix:
            edge = int(self.find_edges(np.array([node]), np.array([token]))[0])
            if edge < 0 or self.child_nodes[edge] < 0:
                return np.zeros(0, dtype=self.child_tokens.dtype)
            node = int(self.child_nodes[edge])
        return self.child_tokens[self.offsets[node] : self.offsets[node + 1]].copy()

    def __repr__(self) -> str:
        return (
            f"PrefixTrie(identifiers={self.num_identifiers}, nodes={self.num_nodes}, edges={self.num_edges}, "
            f"nbytes={self.nbytes}, eos_token_id={self.eos_token_id}, vocab_size={self.vocab_size})"
        )
