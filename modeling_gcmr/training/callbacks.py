"""Callbacks for `transformers.Trainer`: Recall@K of trie-constrained decoding at every evaluation, hard negatives
mined from the model's own beam, a clock that logs training minutes (and stops at a time budget), so that recall
can be plotted against training time, a per-process seed for distributed training, and a frozen encoder's cache
filled before the first step."""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from transformers import TrainerCallback, set_seed
from transformers.utils import logging

from ..encoding_gcmr import prefill_encoder_cache

logger = logging.get_logger(__name__)


class RetrievalEvalCallback(TrainerCallback):
    """Adds Recall@K and MRR@10 of trie-constrained decoding to every `Trainer` evaluation.

    On each `on_evaluate`, the held-out `queries` are decoded with `model.retrieve` (each process decodes its
    share; accelerate gathers them), and `eval_recall@K` / `eval_mrr@10` are added to the metrics that
    `trainer.evaluate()` returns (so `metric_for_best_model="eval_recall@1"` works) and to the evaluation entry
    of `trainer.state.log_history` (saved with every checkpoint). It keeps no state of its own, so resuming
    from a checkpoint needs nothing from it.
    """

    def __init__(
        self,
        queries: Sequence[str],
        gold_keys: Sequence[str],
        tokenizer,
        ks: Sequence[int] = (1, 5, 10),
        num_beams: int | None = None,
        batch_size: int = 32,
        metric_key_prefix: str = "eval",
    ):
        if len(queries) != len(gold_keys):
            raise ValueError(f"{len(queries)} queries but {len(gold_keys)} gold keys")
        if not queries:
            raise ValueError("RetrievalEvalCallback needs at least one held-out query")
        self.queries, self.gold_keys = list(queries), list(gold_keys)
        self.tokenizer, self.ks = tokenizer, tuple(ks)
        self.num_beams, self.batch_size, self.prefix = num_beams, batch_size, metric_key_prefix

    def compute(self, model) -> dict[str, float]:
        """Decode every query (sharded over processes) and return the prefixed retrieval metrics."""
        from accelerate import PartialState
        from accelerate.utils import gather_object

        from ..evaluation.metrics import MRR_CUTOFF, retrieval_metrics

        was_training = model.training
        model.eval()
        try:
            with PartialState().split_between_processes(list(range(len(self.queries)))) as shard:
                hits = model.retrieve(
                    [self.queries[i] for i in shard],
                    self.tokenizer,
                    top_k=max(self.ks + (MRR_CUTOFF,)),
                    num_beams=self.num_beams,
                    batch_size=self.batch_size,
                    show_progress=False,
                )
            rankings = gather_object([[key for key, _ in ranked] for ranked in hits])
        finally:
            model.train(was_training)
        metrics = retrieval_metrics(rankings, self.gold_keys, ks=self.ks)
        return {f"{self.prefix}_{name}": float(value) for name, value in metrics.items()}

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        results = self.compute(model)
        if metrics is not None:
            metrics.update(results)
        # Trainer.log appended the evaluation entry just before this event; extend that entry.
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and f"{self.prefix}_loss" in last:
            last.update(results)
        else:
            state.log_history.append({**results, "step": state.global_step, "epoch": state.epoch})
        if state.is_world_process_zero:
            logger.info("retrieval at step %d: %s", state.global_step, results)


class BeamNegativesCallback(TrainerCallback):
    """Hard negatives mined from the model's own beam: at the start of every `every_epochs`-th epoch, the training
    queries are decoded with trie-constrained beam search, and each image gets the `num_negatives` other images that
    its queries' beams rank highest (best rank first). The identifier loss then scores them with their own decoder
    states next to the shared-vector negatives (`identifier_loss_gcmr._with_mined_negatives`).

    Why: the shared-vector negatives are the identifiers that look best when every candidate is scored with the
    gold path's states; the beam's are the ones search actually returns above the gold. The table lives on the
    identifier head as `mined_negatives` (not a parameter or buffer: it is never saved, and a resumed run mines
    again at its next epoch). Every process mines the same table (the model is the same in each).

    Args:
        queries / gold_keys: the training queries (captions) and their images' keys.
        tokenizer: the model's `ImageIdTokenizer` (its `keys` order is the identifier rows' order).
        num_negatives: negatives kept per image.
        max_queries: decode an evenly spaced subset of at most this many queries (None: all).
    """

    def __init__(self, queries: Sequence[str], gold_keys: Sequence[str], tokenizer, num_negatives: int = 4,
                 num_beams: int | None = None, batch_size: int = 64, every_epochs: int = 1,
                 max_queries: int | None = None):
        if len(queries) != len(gold_keys):
            raise ValueError(f"{len(queries)} queries but {len(gold_keys)} gold keys")
        if not queries:
            raise ValueError("BeamNegativesCallback needs at least one training query")
        if num_negatives < 1 or every_epochs < 1:
            raise ValueError(f"num_negatives and every_epochs must be >= 1, got {num_negatives} and {every_epochs}")
        rows = {key: row for row, key in enumerate(tokenizer.keys)}
        unknown = next((key for key in gold_keys if key not in rows), None)
        if unknown is not None:
            raise ValueError(f"training query image {unknown!r} has no identifier in the tokenizer")
        step = max(1, -(-len(queries) // max_queries)) if max_queries else 1
        self.queries = list(queries)[::step]
        self.gold_rows = [rows[key] for key in list(gold_keys)[::step]]
        self.rows, self.tokenizer = rows, tokenizer
        self.num_negatives, self.num_beams, self.batch_size = num_negatives, num_beams, batch_size
        self.every_epochs = every_epochs

    def mine(self, model) -> torch.Tensor:
        """(num_identifiers, num_negatives) identifier rows that the beam ranks above or near each image's gold on
        its queries, best rank first, -1 padded."""
        hits = model.retrieve(self.queries, self.tokenizer, top_k=self.num_negatives + 1, num_beams=self.num_beams,
                              batch_size=self.batch_size, show_progress=False)
        found: dict[int, dict[int, int]] = {}
        for gold, ranked in zip(self.gold_rows, hits):
            best = found.setdefault(gold, {})
            for rank, (key, _) in enumerate(ranked):
                row = self.rows[key]
                if row != gold and rank < best.get(row, rank + 1):
                    best[row] = rank
        mined = torch.full((len(self.rows), self.num_negatives), -1, dtype=torch.long)
        for gold, best in found.items():
            chosen = sorted(best, key=best.__getitem__)[: self.num_negatives]
            mined[gold, : len(chosen)] = torch.tensor(chosen, dtype=torch.long)
        return mined

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        epoch = round(state.epoch or 0)
        if model is None or epoch % self.every_epochs:
            return
        head = model.identifier_head
        head.mined_negatives = self.mine(model).to(head.paths.device)
        if state.is_world_process_zero:
            logger.info("mined %d beam negatives per image from %d training queries at epoch %d",
                        self.num_negatives, len(self.queries), epoch)


class TrainingClockCallback(TrainerCallback):
    """Adds `train_minutes` (time inside training steps only: evaluation and saving are not counted) to every log
    and evaluation entry, and ends training at the first step after `budget_minutes` (0 or None: no budget)."""

    def __init__(self, budget_minutes: float | None = None):
        self.budget_seconds = (budget_minutes or 0) * 60
        self.seconds = 0.0
        self._step_start: float | None = None
        self.stopped_by_budget = False

    @property
    def minutes(self) -> float:
        return self.seconds / 60

    def on_train_begin(self, args, state, control, **kwargs):
        self.seconds, self.stopped_by_budget = 0.0, False

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_start is not None:
            self.seconds += time.perf_counter() - self._step_start
            self._step_start = None
        if self.budget_seconds and self.seconds >= self.budget_seconds:
            self.stopped_by_budget = control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.log_history:
            state.log_history[-1]["train_minutes"] = round(self.minutes, 4)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics is not None:
            metrics["train_minutes"] = round(self.minutes, 4)
        if state.log_history:
            state.log_history[-1]["train_minutes"] = round(self.minutes, 4)


class ProcessSeedCallback(TrainerCallback):
    """Gives each distributed process its own training randomness: dropout, sampled softmax candidates, interpolation.

    The Trainer seeds every process alike (`set_seed(args.seed)`), so each process would draw the very same dropout
    masks for its rows as the others for theirs. At the start of training each process is reseeded with
    `seed + process_index` (a single process keeps `seed`). The data order is untouched: the train sampler was
    built before training begins and keeps its own seed, shared by all processes; a resumed run restores each
    process's saved random state after this.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        if args.world_size > 1:
            set_seed(args.seed + args.process_index)
            # one line per process, as the example script's own "process rank" line
            logger.warning("process %d of %d: training randomness seeded with %d", args.process_index,
                           args.world_size, args.seed + args.process_index)


class EncoderCachePrefillCallback(TrainerCallback):
    """Encodes the training set's distinct queries into a frozen text encoder's cache, in batches of similar length,
    as the first training step begins (`prefill_encoder_cache`: about half the encoder time of meeting them in
    shuffled batches).

    It runs inside the first step, so its time counts in `train_runtime` and, placed after `TrainingClockCallback`,
    in the clock's training minutes, as the first epoch's encoding did. It reads the `input_ids` column of the
    Trainer's training set and does nothing where the encoder trains or the cache cannot hold every query.
    """

    def __init__(self):
        self._filled = False

    def on_train_begin(self, args, state, control, **kwargs):
        self._filled = False

    def on_step_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if self._filled:
            return
        self._filled = True
        dataset = getattr(train_dataloader, "dataset", None)
        if model is None or "input_ids" not in getattr(dataset, "column_names", ()):
            return
        started = time.perf_counter()
        encoded = prefill_encoder_cache(model, dataset["input_ids"], batch_size=args.per_device_train_batch_size)
        if encoded:
            logger.info("encoded %d distinct training queries into the frozen encoder's cache in %.1f s", encoded,
                        time.perf_counter() - started)


__all__ = [
    "BeamNegativesCallback", "EncoderCachePrefillCallback", "ProcessSeedCallback", "RetrievalEvalCallback",
    "TrainingClockCallback",
]
