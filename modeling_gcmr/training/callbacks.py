"""Callbacks for `transformers.Trainer`: Recall@K of trie-constrained decoding at every evaluation, a clock that
logs training minutes (and stops at a time budget), so that recall can be plotted against training time, and a
per-process seed for distributed training."""
from __future__ import annotations

import time
from collections.abc import Sequence

from transformers import TrainerCallback, set_seed
from transformers.utils import logging

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


__all__ = ["RetrievalEvalCallback", "TrainingClockCallback"]


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
