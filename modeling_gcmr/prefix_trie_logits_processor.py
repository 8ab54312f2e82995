"""Trie-constrained decoding: `PrefixTrieLogitsProcessor` and `constrained_retrieve`.

The processor works on the CSR arrays of the tokenizer's prefix trie (see docs/architecture.md,
"Prefix trie"): `offsets`, `child_tokens`, `child_nodes` (an EOS edge points to `-(key_index + 1)`),
`eos_token_id`, `vocab_size`. It never imports the tokenizer package: on the Hub only the copied
modeling files exist, so plain arrays are the whole interface.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.utils import logging

logger = logging.get_logger(__name__)

_TRIE_KEYS = ("offsets", "child_tokens", "child_nodes", "eos_token_id", "vocab_size")
# Score given to an allowed token that came in as -inf: fp16's lowest finite value, so every float dtype
# holds it; far below any real log-probability, yet far above the -1e9 that beam search uses to mark an
# empty hypothesis, and safe to sum over many steps (the dtype's own minimum would overflow to -inf).
ALLOWED_FLOOR = float(torch.finfo(torch.float16).min)


class _DeviceTrie:
    """The trie on one device, extended with a "dead" node that only allows EOS (and padding).

    Rows reach the dead node after their EOS (greedy search keeps feeding finished rows padding) or on
    a prefix that is not in the trie; giving them a finite row keeps log-softmax and beam scores free
    of NaN. Edge keys `node * vocab + token` are globally sorted, so one `searchsorted` walks every
    row one token deeper at once.
    """

    def __init__(self, offsets: np.ndarray, child_tokens: np.ndarray, child_nodes: np.ndarray,
                 vocab_size: int, dead_tokens: list[int], device: torch.device) -> None:
        num_nodes = len(offsets) - 1
        self.dead = num_nodes
        self.vocab_size = vocab_size
        dead_tokens_arr = np.asarray(sorted(set(dead_tokens)), dtype=np.int64)
        # EOS edges end the walk: they lead to the dead node, which loops onto itself.
        next_nodes = np.where(child_nodes < 0, num_nodes, child_nodes).astype(np.int64)
        next_nodes = np.concatenate([next_nodes, np.full(len(dead_tokens_arr), num_nodes, np.int64)])
        tokens = np.concatenate([child_tokens.astype(np.int64), dead_tokens_arr])
        all_offsets = np.append(offsets.astype(np.int64), offsets[-1] + len(dead_tokens_arr))
        node_of_edge = np.repeat(np.arange(num_nodes + 1, dtype=np.int64), np.diff(all_offsets))
        key_index = np.where(child_nodes < 0, -child_nodes.astype(np.int64) - 1, -1)
        key_index = np.concatenate([key_index, np.full(len(dead_tokens_arr), -1, np.int64)])

        def put(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array)).to(device)

        self.offsets = put(all_offsets)
        self.fanout = put(np.diff(all_offsets))
        self.tokens = put(tokens)
        self.next_nodes = put(next_nodes)
        self.edge_keys = put(node_of_edge * vocab_size + tokens)
        self.key_index = put(key_index)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.offsets, self.fanout, self.tokens, self.next_nodes, self.edge_keys,
                                      self.key_index))

    def find_edges(self, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Edge index of (node, token) for every row, or -1 where the trie has no such edge."""
        in_vocab = (tokens >= 0) & (tokens < self.vocab_size) & (nodes < self.dead)
        keys = nodes * self.vocab_size + tokens.clamp(0, self.vocab_size - 1)
        edges = torch.searchsorted(self.edge_keys, keys).clamp_(max=len(self.edge_keys) - 1)
        found = in_vocab & (self.edge_keys[edges] == keys)
        return torch.where(found, edges, -1)

    def walk(self, prefixes: torch.Tensor) -> torch.Tensor:
        """Trie node reached by each row of `prefixes` (R, P); the dead node for anything else."""
        nodes = torch.zeros(prefixes.shape[0], dtype=torch.long, device=prefixes.device)
        for position in range(prefixes.shape[1]):
            edges = self.find_edges(nodes, prefixes[:, position])
            nodes = torch.where(edges >= 0, self.next_nodes[edges.clamp(min=0)], self.dead)
        return nodes

    def edges_of(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, edge) pairs listing every child edge of every row's node, without a loop over rows."""
        counts = self.fanout[nodes]
        total = int(counts.sum())  # the one host sync of the step
        rows = torch.repeat_interleave(torch.arange(len(nodes), device=nodes.device), counts, output_size=total)
        first_edge = self.offsets[nodes] - (torch.cumsum(counts, 0) - counts)
        edges = torch.arange(total, device=nodes.device) + first_edge[rows]
        return rows, edges


def _as_numpy(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"trie array {name!r} is not array-like ({type(value).__name__})") from error


class PrefixTrieLogitsProcessor(LogitsProcessor):
    """Allows, at every step, only the tokens that continue a real identifier (EOS only after a complete one).

    Args:
        trie_arrays: the dict from `PrefixTrie.arrays()` (numpy arrays or tensors): `offsets`,
            `child_tokens`, `child_nodes`, and 0-d `eos_token_id` / `vocab_size`.
        num_skip_tokens: leading decoder tokens that are not part of the identifier (1 for an
            encoder-decoder model: the decoder start token).
        pad_token_id: also allowed, next to EOS, on rows that are already finished (greedy search
            pads them) or off the trie.
        inplace: write into the given scores instead of a new tensor. Saves an allocation and a pass
            over a (rows, vocab) matrix per step; safe in beam search, where the scores are a fresh
            log-softmax, but not in greedy search with `output_logits=True`, which keeps the tensor.

    Each call re-walks every row's generated prefix through the trie (beam search reorders the rows,
    so no state is kept between steps) with one vectorised `searchsorted` per prefix position, then
    keeps the scores of the allowed tokens and sets every other token to `-inf`. Allowed tokens scored
    `-inf` (fp16/bf16 underflow, or another processor's ban) are raised to `ALLOWED_FLOOR` (-65504, at
    least on rows where no allowed token is finite), so such a row still picks one of them rather than
    an out-of-trie token, also when beam search sums the scores over steps. The trie is copied to each device it meets once and cached.
    """

    # A step gathers (row, allowed token) pairs unless they outnumber this share of the score matrix,
    # as an atomic root with a million children does; then it builds one mask per distinct node.
    dense_threshold: float = 1 / 16

    def __init__(self, trie_arrays: Mapping[str, Any], num_skip_tokens: int = 1,
                 pad_token_id: int | None = None, inplace: bool = False) -> None:
        missing = [key for key in _TRIE_KEYS if key not in trie_arrays]
        if missing:
            raise KeyError(f"trie arrays lack {missing}; expected the dict from PrefixTrie.arrays() "
                           f"with keys {list(_TRIE_KEYS)}")
        if num_skip_tokens < 0:
            raise ValueError(f"num_skip_tokens must be >= 0, got {num_skip_tokens}")
        self.offsets = _as_numpy(trie_arrays["offsets"], "offsets").astype(np.int64)
        self.child_tokens = _as_numpy(trie_arrays["child_tokens"], "child_tokens").astype(np.int64)
        self.child_nodes = _as_numpy(trie_arrays["child_nodes"], "child_nodes").astype(np.int64)
        self.eos_token_id = int(_as_numpy(trie_arrays["eos_token_id"], "eos_token_id"))
        self.vocab_size = int(_as_numpy(trie_arrays["vocab_size"], "vocab_size"))
        self.num_skip_tokens = num_skip_tokens
        self.pad_token_id = pad_token_id
        self.inplace = inplace
        self._validate()
        self._device_tries: dict[torch.device, _DeviceTrie] = {}

    def _validate(self) -> None:
        offsets, tokens, nodes = self.offsets, self.child_tokens, self.child_nodes
        if offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
            raise ValueError("trie 'offsets' must be a non-decreasing 1-d array starting at 0 with >= 2 entries")
        if tokens.shape != (offsets[-1],) or nodes.shape != tokens.shape:
            raise ValueError(f"trie 'child_tokens' {tokens.shape} and 'child_nodes' {nodes.shape} must both "
                             f"have offsets[-1] = {offsets[-1]} entries")
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"trie 'child_tokens' must lie in [0, vocab_size={self.vocab_size})")
        node_of_edge = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        if np.any(np.diff(node_of_edge * self.vocab_size + tokens) <= 0):
            raise ValueError("trie edges must be strictly sorted by (node, token)")
        if len(nodes) and nodes.max() >= len(offsets) - 1:
            raise ValueError(f"trie 'child_nodes' point past the last node ({len(offsets) - 2})")
        for name, token in (("eos_token_id", self.eos_token_id), ("pad_token_id", self.pad_token_id)):
            if token is not None and not 0 <= token < self.vocab_size:
                raise ValueError(f"{name}={token} is outside the trie's vocabulary [0, {self.vocab_size})")

    def device_nbytes(self, device: torch.device | str) -> int:
        """Bytes of the trie copy (with its search keys) that this processor keeps on `device`."""
        return self._trie_on(torch.device(device)).nbytes()

    def _trie_on(self, device: torch.device) -> _DeviceTrie:
        if device not in self._device_tries:
            dead_tokens = [self.eos_token_id] + ([self.pad_token_id] if self.pad_token_id is not None else [])
            self._device_tries[device] = _DeviceTrie(self.offsets, self.child_tokens, self.child_nodes,
                                                     self.vocab_size, dead_tokens, device)
        return self._device_tries[device]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[-1] < self.vocab_size:
            raise ValueError(f"scores have {scores.shape[-1]} columns but the trie needs vocab_size={self.vocab_size}; "
                             "resize the model's embeddings to the tokenizer (set_identifier_vocabulary)")
        trie = self._trie_on(scores.device)
        nodes = trie.walk(input_ids[:, self.num_skip_tokens:].to(scores.device))
        total = int(trie.fanout[nodes].sum())
        if total <= self.dense_threshold * scores.numel():
            rows, edges = trie.edges_of(nodes)
            tokens = trie.tokens[edges]
            allowed = scores[rows, tokens].nan_to_num(nan=ALLOWED_FLOOR, neginf=ALLOWED_FLOOR)
            processed = scores.fill_(float("-inf")) if self.inplace else torch.full_like(scores, float("-inf"))
            processed[rows, tokens] = allowed
            return processed
        # Few distinct nodes with a huge fan-out (an atomic root): one mask row per distinct node,
        # broadcast rather than copied when every row sits on the same node.
        unique_nodes, inverse = torch.unique(nodes, return_inverse=True)
        rows, edges = trie.edges_of(unique_nodes)
        banned = torch.ones(len(unique_nodes), scores.shape[-1], dtype=torch.bool, device=scores.device)
        banned[rows, trie.tokens[edges]] = False
        banned = banned.expand(scores.shape[0], -1) if len(unique_nodes) == 1 else banned[inverse]
        processed = scores.masked_fill_(banned, float("-inf")) if self.inplace else scores.masked_fill(banned, float("-inf"))
        # Reading the row maxima is cheaper than raising every allowed -inf: only rows left with
        # nothing finite need their allowed tokens lifted to ALLOWED_FLOOR.
        stuck = processed.amax(dim=-1).isneginf().nonzero().squeeze(-1)
        if len(stuck):
            processed[stuck] = torch.where(banned[stuck], float("-inf"), ALLOWED_FLOOR).to(scores.dtype)
        return processed

    def key_indices(self, sequences: torch.Tensor) -> torch.Tensor:
        """Identifier index of each generated row (`num_skip_tokens` + ids + EOS + padding), -1 if none.

        Vectorised over rows: walks the ids, then requires the next token to be the EOS edge; anything
        after that EOS must be padding (or EOS) for the row to count.
        """
        trie = self._trie_on(sequences.device)
        body = sequences[:, self.num_skip_tokens:]
        nodes = torch.zeros(body.shape[0], dtype=torch.long, device=sequences.device)
        keys = torch.full_like(nodes, -1)
        done = torch.zeros_like(nodes, dtype=torch.bool)
        trailing_ok = torch.ones_like(done)
        end_tokens = torch.tensor(sorted({self.eos_token_id, self.pad_token_id if self.pad_token_id is not None
                                          else self.eos_token_id}), device=sequences.device)
        for position in range(body.shape[1]):
            token = body[:, position]
            trailing_ok &= ~done | torch.isin(token, end_tokens)
            edges = trie.find_edges(nodes, token)
            key_here = torch.where(edges >= 0, trie.key_index[edges.clamp(min=0)], -1)
            newly_done = ~done & (key_here >= 0)
            keys = torch.where(newly_done, key_here, keys)
            nodes = torch.where(edges >= 0, trie.next_nodes[edges.clamp(min=0)], trie.dead)
            done |= newly_done
        return torch.where(done & trailing_ok, keys, -1)


# One processor per tokenizer (its trie is fixed), so repeated retrieve() calls reuse device copies.
_PROCESSORS: "weakref.WeakKeyDictionary[Any, tuple[Any, PrefixTrieLogitsProcessor]]" = weakref.WeakKeyDictionary()


def _processor_for(tokenizer: Any, num_skip_tokens: int, pad_token_id: int | None) -> PrefixTrieLogitsProcessor:
    trie = tokenizer.prefix_trie
    cached = _PROCESSORS.get(tokenizer)
    if cached is not None and cached[0] is trie and cached[1].num_skip_tokens == num_skip_tokens \
            and cached[1].pad_token_id == pad_token_id:
        return cached[1]
    processor = PrefixTrieLogitsProcessor(trie.arrays(), num_skip_tokens=num_skip_tokens, pad_token_id=pad_token_id)
    _PROCESSORS[tokenizer] = (trie, processor)
    return processor


def constrained_retrieve(model: Any, tokenizer: Any, encoder_inputs: Mapping[str, torch.Tensor], top_k: int,
                         num_beams: int | None = None) -> list[list[tuple[str, float]]]:
    """Decode identifiers under the tokenizer's trie and return, per input row, up to `top_k` (key, score) pairs.

    `encoder_inputs` are keyword arguments for `model.generate` (`input_ids`/`attention_mask`,
    `pixel_values`, `image_embeds`, ...). `num_beams` defaults to `model.config.num_beams` (else
    `model.generation_config.num_beams`); a `top_k` above it raises the beam count to `top_k` (with a
    one-time warning), because beam search cannot return more distinct identifiers than beams.
    `num_beams=1` is greedy search (one hit per query).

    The score is the identifier's log-probability under the model, summed over its tokens and the
    closing EOS, each normalised over the full vocabulary (not renormalised over the trie's allowed
    tokens); beam search runs with `length_penalty=0` so that `sequences_scores` is exactly this sum.
    Hits are best first, duplicate-free, and every key is a real identifier of the tokenizer.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    if num_beams is None:
        num_beams = getattr(model.config, "num_beams", None) or model.generation_config.num_beams or 1
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if top_k > num_beams:
        logger.warning_once(f"top_k={top_k} > num_beams={num_beams}: raising num_beams to {top_k} so that "
                            "beam search can return top_k distinct identifiers")
        num_beams = top_k
    generation_config = model.generation_config
    is_encoder_decoder = model.config.is_encoder_decoder
    num_skip_tokens = 1 if is_encoder_decoder else encoder_inputs["input_ids"].shape[1]
    beam = num_beams > 1
    # A shallow copy shares the cached device tries; in place is safe for beam search's fresh log-probs.
    processor = copy.copy(_processor_for(tokenizer, num_skip_tokens, generation_config.pad_token_id))
    processor.inplace = beam
    # length_penalty only exists for beam search; passing it to greedy search makes generate() warn.
    beam_options = {"length_penalty": 0.0} if beam else {}
    output = model.generate(
        **encoder_inputs,
        logits_processor=LogitsProcessorList([processor]),
        do_sample=False,
        num_beams=num_beams,
        num_return_sequences=num_beams,
        max_new_tokens=tokenizer.max_identifier_length + 1,
        min_new_tokens=0,
        eos_token_id=processor.eos_token_id,
        return_dict_in_generate=True,
        output_scores=beam,
        output_logits=not beam,
        **beam_options,
    )
    sequences = output.sequences
    if beam:
        scores = output.sequences_scores
    else:
        # Greedy returns processed (masked) scores; the log-probability comes from the raw logits.
        generated = sequences[:, num_skip_tokens : num_skip_tokens + len(output.logits)]
        log_probs = torch.stack(output.logits, dim=1).float().log_softmax(dim=-1)
        token_log_probs = log_probs.gather(-1, generated[..., None]).squeeze(-1)
        is_eos = generated == processor.eos_token_id
        after_eos = (torch.cumsum(is_eos, dim=1) - is_eos.long()) > 0  # the padding of finished rows
        scores = token_log_probs.masked_fill(after_eos, 0.0).sum(dim=1)
    key_indices = processor.key_indices(sequences).view(-1, num_beams).tolist()
    scores = scores.float().view(-1, num_beams).tolist()
    keys = tokenizer.keys
    results: list[list[tuple[str, float]]] = []
    for row_keys, row_scores in zip(key_indices, scores):
        hits: list[tuple[str, float]] = []
        seen: set[int] = set()
        # Beams come back best first; a later copy of an identifier is a worse path to the same key.
        for key_index, score in sorted(zip(row_keys, row_scores), key=lambda pair: -pair[1]):
            if key_index < 0 or key_index in seen:
                continue
            seen.add(key_index)
            hits.append((keys[key_index], float(score)))
            if len(hits) == top_k:
                break
        results.append(hits)
    return results
