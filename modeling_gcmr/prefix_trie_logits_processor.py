"""Trie-constrained `generate()`: `PrefixTrieLogitsProcessor`, `constrained_generate` and `generate_on_trie`.

Models with the text head (the LM head over the whole vocabulary: checkpoints made before the identifier head, and
models whose config asks for it) decode with transformers' `generate()`; this processor keeps every step on the
trie. Models with the identifier head decode with `trie_beam_search_gcmr`, and their `generate()` runs that same
search (`generate_on_trie`), so `generate()` and `retrieve()` rank alike for every checkpoint:

- identifier head: `generate(..., logits_processor=[PrefixTrieLogitsProcessor(tokenizer.prefix_trie)])` returns
  the hits of `retrieve()`'s trie beam search, best first, as token sequences (decoder start, identifier, EOS,
  padding) with `sequences_scores` the summed dot products. transformers' own beam loop cannot give this ranking:
  it log-softmax-normalises every step (per-node normalisation made identifiers of different lengths
  incomparable and cost 8-25 R@1 points on f30k-dev, see `identifier_head_gcmr.py`), and its early stop assumes
  that scores only fall, which summed dot products do not.
- text head: `retrieve()` is `generate()` under the processor with `length_penalty=0.0` (`constrained_generate`);
  `generate()` with transformers' default `length_penalty=1.0` divides each score by its length, so identifiers of
  different lengths (semantic, string) can rank differently there.

Every `PrefixTrieLogitsProcessor` given to `generate()` must walk the model's own identifiers: its trie carries the
tokenizer's identifier signature, checked against the model's. Both heads walk the trie through the tokenizer's
`PrefixTrie` (the one trie engine): a Hub file on this side may not import the tokenizer package, so it only calls
that object's methods (`trie.on(device)`).
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.utils import GenerateBeamEncoderDecoderOutput
from transformers.utils import logging

from .trie_beam_search_gcmr import trie_beam_search

logger = logging.get_logger(__name__)

# Score given to an allowed token that came in as -inf: fp16's lowest finite value, so every float dtype
# holds it; far below any real log-probability, yet far above the -1e9 that beam search uses to mark an
# empty hypothesis, and safe to sum over many steps (the dtype's own minimum would overflow to -inf).
ALLOWED_FLOOR = float(torch.finfo(torch.float16).min)


class PrefixTrieLogitsProcessor(LogitsProcessor):
    """Allows, at every step, only the tokens that continue a real identifier (EOS only after a complete one).

    Args:
        trie: the tokenizer's prefix trie (`tokenizer.prefix_trie`).
        num_skip_tokens: leading decoder tokens that are not part of the identifier (1 for an
            encoder-decoder model: the decoder start token).
        pad_token_id: also allowed, next to EOS, on rows that are already finished (greedy search
            pads them) or off the trie.
        inplace: write into the given scores instead of a new tensor. Saves an allocation and a pass
            over a (rows, vocab) matrix per step; safe in beam search, where the scores are a fresh
            log-softmax, but not in greedy search with `output_logits=True`, which keeps the tensor.

    Each call re-walks every row's generated prefix through the trie (beam search reorders the rows,
    so no state is kept between steps) with one vectorised `searchsorted` per prefix position, then
    keeps the scores of the allowed tokens and sets every other token to `-inf`. Rows that are finished
    or off the trie may only continue with EOS or padding, so no row turns NaN. Allowed tokens scored
    `-inf` (fp16/bf16 underflow, or another processor's ban) are raised to `ALLOWED_FLOOR` (-65504), so
    such a row still picks one of them rather than an out-of-trie token, also when beam search sums the
    scores over steps.
    """

    # A step gathers (row, allowed token) pairs unless they outnumber this share of the score matrix,
    # as an atomic root with a million children does; then it builds one mask per distinct node.
    dense_threshold: float = 1 / 16

    def __init__(self, trie: Any, num_skip_tokens: int = 1, pad_token_id: int | None = None,
                 inplace: bool = False) -> None:
        if not callable(getattr(trie, "on", None)):
            raise TypeError(f"trie must be the tokenizer's prefix trie (tokenizer.prefix_trie), got {type(trie).__name__}")
        if num_skip_tokens < 0:
            raise ValueError(f"num_skip_tokens must be >= 0, got {num_skip_tokens}")
        if pad_token_id is not None and not 0 <= pad_token_id < trie.vocab_size:
            raise ValueError(f"pad_token_id={pad_token_id} is outside the trie's vocabulary [0, {trie.vocab_size})")
        self.trie = trie
        self.eos_token_id = trie.eos_token_id
        self.vocab_size = trie.vocab_size
        self.num_skip_tokens = num_skip_tokens
        self.pad_token_id = pad_token_id
        self.inplace = inplace
        self._end_tokens = sorted({self.eos_token_id, self.eos_token_id if pad_token_id is None else pad_token_id})

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[-1] < self.vocab_size:
            raise ValueError(f"scores have {scores.shape[-1]} columns but the trie needs vocab_size={self.vocab_size}; "
                             "resize the model's embeddings to the tokenizer (set_identifier_vocabulary)")
        engine = self.trie.on(scores.device)
        nodes = engine.walk(input_ids[:, self.num_skip_tokens:].to(scores.device))
        live_edges = int(engine.fanout[nodes].sum())
        if live_edges + len(self._end_tokens) * len(nodes) <= self.dense_threshold * scores.numel():
            rows, tokens = self._allowed_pairs(engine, nodes)
            allowed = scores[rows, tokens].nan_to_num(nan=ALLOWED_FLOOR, neginf=ALLOWED_FLOOR)
            processed = scores.fill_(float("-inf")) if self.inplace else torch.full_like(scores, float("-inf"))
            processed[rows, tokens] = allowed
            return processed
        # Few distinct nodes with a huge fan-out (an atomic root): one mask row per distinct node,
        # broadcast rather than copied when every row sits on the same node.
        unique_nodes, inverse = torch.unique(nodes, return_inverse=True)
        rows, tokens = self._allowed_pairs(engine, unique_nodes)
        banned = torch.ones(len(unique_nodes), scores.shape[-1], dtype=torch.bool, device=scores.device)
        banned[rows, tokens] = False
        banned = banned.expand(scores.shape[0], -1) if len(unique_nodes) == 1 else banned[inverse]
        processed = scores.masked_fill_(banned, float("-inf")) if self.inplace else scores.masked_fill(banned, float("-inf"))
        # Reading the row maxima is cheaper than raising every allowed -inf: only rows left with
        # nothing finite need their allowed tokens lifted to ALLOWED_FLOOR.
        stuck = processed.amax(dim=-1).isneginf().nonzero().squeeze(-1)
        if len(stuck):
            processed[stuck] = torch.where(banned[stuck], float("-inf"), ALLOWED_FLOOR).to(scores.dtype)
        return processed

    def _allowed_pairs(self, engine: Any, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, token) pairs: the children of live rows, and EOS/padding for rows at no node."""
        rows, edges = engine.edges_of(nodes)
        ended = torch.nonzero(nodes < 0).squeeze(-1)
        end_tokens = torch.tensor(self._end_tokens, device=nodes.device)
        rows = torch.cat([rows, ended.repeat_interleave(len(end_tokens))])
        tokens = torch.cat([engine.tokens[edges], end_tokens.repeat(len(ended))])
        return rows, tokens


# One processor per tokenizer (its trie is fixed), so repeated retrieve() calls reuse it.
_PROCESSORS: "weakref.WeakKeyDictionary[Any, PrefixTrieLogitsProcessor]" = weakref.WeakKeyDictionary()


def _processor_for(tokenizer: Any, num_skip_tokens: int, pad_token_id: int | None) -> PrefixTrieLogitsProcessor:
    cached = _PROCESSORS.get(tokenizer)
    if cached is None or cached.trie is not tokenizer.prefix_trie or cached.num_skip_tokens != num_skip_tokens \
            or cached.pad_token_id != pad_token_id:
        cached = PrefixTrieLogitsProcessor(tokenizer.prefix_trie, num_skip_tokens, pad_token_id)
        _PROCESSORS[tokenizer] = cached
    return cached


def constrained_generate(model: Any, tokenizer: Any, encoder_inputs: dict[str, torch.Tensor], top_k: int,
                         num_beams: int) -> list[list[tuple[int, float]]]:
    """Trie-constrained `generate()` for a text-head model: per input row, up to `top_k` (key index, score).

    `encoder_inputs` are keyword arguments for `model.generate`. The caller (`retrieve()`, through the query front
    door) has validated `top_k <= num_beams`. The score is the identifier's log-probability under the model,
    summed over its tokens and the closing EOS, each normalised over the full vocabulary (not renormalised over
    the trie's allowed tokens); beam search runs with `length_penalty=0` so that `sequences_scores` is exactly
    this sum. `num_beams=1` is greedy search. Hits are best first and duplicate-free.
    """
    generation_config = model.generation_config
    num_skip_tokens = 1 if model.config.is_encoder_decoder else encoder_inputs["input_ids"].shape[1]
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
    generated = output.sequences[:, num_skip_tokens:]
    if beam:
        scores = output.sequences_scores
    else:
        # Greedy returns processed (masked) scores; the log-probability comes from the raw logits.
        generated = generated[:, : len(output.logits)]
        log_probs = torch.stack(output.logits, dim=1).float().log_softmax(dim=-1)
        token_log_probs = log_probs.gather(-1, generated[..., None]).squeeze(-1)
        is_eos = generated == processor.eos_token_id
        after_eos = (torch.cumsum(is_eos, dim=1) - is_eos.long()) > 0  # the padding of finished rows
        scores = token_log_probs.masked_fill(after_eos, 0.0).sum(dim=1)
    # Everything after a row's EOS is padding; the trie's lookup stops at the first EOS.
    key_indices = tokenizer.prefix_trie.lookup(generated).view(-1, num_beams).tolist()
    scores = scores.float().view(-1, num_beams).tolist()
    results: list[list[tuple[int, float]]] = []
    for row_keys, row_scores in zip(key_indices, scores):
        hits: list[tuple[int, float]] = []
        seen: set[int] = set()
        # Beams come back best first; a later copy of an identifier is a worse path to the same key.
        for key_index, score in sorted(zip(row_keys, row_scores), key=lambda pair: -pair[1]):
            if key_index < 0 or key_index in seen:
                continue
            seen.add(key_index)
            hits.append((key_index, float(score)))
            if len(hits) == top_k:
                break
        results.append(hits)
    return results


# What generate() of an identifier-head model hands to `model.encode` (the query, as for forward()).
ENCODER_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_embeds", "image_mask", "inputs_embeds")


def generate_on_trie(model: Any, generate: Any, inputs: Any = None, generation_config: Any = None,
                     logits_processor: Any = None, **kwargs: Any) -> Any:
    """`GcmrForRetrieval.generate`: the tries of the processors are checked against the model, then the text head
    runs transformers' `generate` and the identifier head its trie beam search (module docstring)."""
    tries = [p.trie for p in (logits_processor or []) if isinstance(p, PrefixTrieLogitsProcessor)]
    for trie in tries:
        check_trie(model, trie)
    if model.config.identifier_head != "identifier":
        return generate(inputs, generation_config=generation_config, logits_processor=logits_processor, **kwargs)
    if not tries:
        raise ValueError("this model scores identifiers with its identifier head, which decodes on the identifier trie "
                         "only: pass logits_processor=[PrefixTrieLogitsProcessor(tokenizer.prefix_trie)], or call "
                         "model.retrieve(queries, tokenizer)")
    return _identifier_head_generate(model, tries[0], inputs, generation_config, kwargs)


def check_trie(model: Any, trie: Any) -> None:
    """Raise a ValueError when `trie` does not spell the identifiers `model` was fitted to."""
    expected, found = model.config.identifier_signature, getattr(trie, "identifier_signature", None)
    if expected is not None and found is not None and found != expected:
        raise ValueError(
            f"the PrefixTrieLogitsProcessor walks the identifiers of another tokenizer (signature {found[:16]}...) "
            f"than the one this model was fitted to ({expected[:16]}...): build it from the tokenizer saved with "
            "this model, PrefixTrieLogitsProcessor(tokenizer.prefix_trie)"
        )
    if model.config.identifier_head == "identifier":
        # The head matches the trie's paths against its own (`IdentifierHead.edge_rows`, cached per trie, which the
        # beam search then reads): counting edges against rows proves nothing with a shared EOS vector.
        if not _spells_head_paths(model, trie):
            raise ValueError(f"the PrefixTrieLogitsProcessor's trie has {trie.num_edges} edges and does not spell "
                             f"this model's identifiers ({model.config.num_identifier_edges} edge vectors): build "
                             "it from the tokenizer saved with this model, "
                             "PrefixTrieLogitsProcessor(tokenizer.prefix_trie)")
    elif trie.vocab_size > model.vocab_size:
        raise ValueError(f"the PrefixTrieLogitsProcessor's trie spells tokens up to id {trie.vocab_size - 1}, this "
                         f"model's LM head has {model.vocab_size} rows: build it from the tokenizer saved with this "
                         "model, PrefixTrieLogitsProcessor(tokenizer.prefix_trie)")


def _spells_head_paths(model: Any, trie: Any) -> bool:
    try:
        model.identifier_head.edge_rows(trie)
    except ValueError:
        return False
    return True


@torch.no_grad()
def _identifier_head_generate(model: Any, trie: Any, inputs: Any, generation_config: Any, kwargs: dict) -> Any:
    """The trie beam search of `retrieve()`, shaped as transformers' beam-search output."""
    config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    model_kwargs = config.update(**kwargs)
    if inputs is not None:
        model_kwargs.setdefault(model.main_input_name, inputs)
    num_beams, num_return = config.num_beams or 1, config.num_return_sequences or 1
    needed = model.config.max_identifier_length + 1
    if config.do_sample:
        raise ValueError("generate() of an identifier-head model is a trie beam search: do_sample=True is not "
                         "supported")
    if num_return > num_beams:
        raise ValueError(f"num_return_sequences ({num_return}) must be <= num_beams ({num_beams})")
    if config.max_new_tokens is not None and config.max_new_tokens < needed:
        raise ValueError(f"max_new_tokens={config.max_new_tokens} cannot hold an identifier: the longest takes "
                         f"{needed} tokens with its EOS")
    unknown = sorted(set(model_kwargs) - set(ENCODER_INPUTS) - {"encoder_outputs"})
    if unknown:
        raise ValueError(f"generate() of an identifier-head model takes the query ({', '.join(ENCODER_INPUTS)} or "
                         f"encoder_outputs) and generation options; unknown argument(s): {', '.join(unknown)}")
    encoded = model_kwargs.get("encoder_outputs")
    if encoded is None:
        encoded = model.encode(**{name: model_kwargs[name] for name in ENCODER_INPUTS if name in model_kwargs})
    hits = trie_beam_search(model, trie, encoded, num_beams, num_return)
    sequences, scores = _hit_sequences(model, trie, hits, num_return, config)
    if not config.return_dict_in_generate:
        return sequences
    return GenerateBeamEncoderDecoderOutput(sequences=sequences,
                                            sequences_scores=scores if config.output_scores else None)


def _hit_sequences(model: Any, trie: Any, hits: list[list[tuple[int, float]]], num_return: int,
                   config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(B * num_return, T) decoder start + identifier + EOS + padding, and the scores; missing hits: padding, -inf."""
    device = model.identifier_head.token_rows.device
    indices = torch.full((len(hits), num_return), -1, dtype=torch.long)
    scores = torch.full((len(hits), num_return), float("-inf"))
    for row, row_hits in enumerate(hits):
        for rank, (index, score) in enumerate(row_hits):
            indices[row, rank], scores[row, rank] = index, score
    indices, scores = indices.flatten().to(device), scores.flatten().to(device)
    tokens = model.identifier_head.token_rows.long()[indices.clamp(min=0)]
    lengths = torch.where(indices >= 0, (tokens >= 0).sum(dim=1), -1)
    width = int(lengths.max()) + 2 if len(lengths) else 2
    pad = config.pad_token_id if config.pad_token_id is not None else model.config.pad_token_id
    start = config.decoder_start_token_id
    start = model.config.decoder_start_token_id if start is None else start
    sequences = torch.full((len(indices), width), int(pad), dtype=torch.long, device=device)
    sequences[:, 0] = int(start)
    sequences[:, 1 : tokens.shape[1] + 1] = torch.where(tokens >= 0, tokens, int(pad))[:, : width - 1]
    sequences[indices >= 0, (lengths + 1)[indices >= 0]] = trie.eos_token_id
    sequences[indices < 0, 1:] = int(pad)
    return sequences, scores
