"""The validation loss of a run: `eval_iters` global batches of the validation split, forward
only, the same samples at every evaluation (and, after training, of the test split)."""

from __future__ import annotations

from typing import Optional

from neon.config import NeonConfig
from neon.training.aux_losses import clear_router_aux_losses
from neon.training.data import TrainingData
from neon.training.step import evaluate, from_reporting_rank


class Evaluator:
    def __init__(self, schedule, data: TrainingData, chunks: list, *, model_config: NeonConfig,
                 num_microbatches: int, seq_length: int):
        """schedule: the run's `schedule` section (eval_iters, eval_interval, train_iters, micro_batch_size)."""
        self.schedule, self.data, self.chunks = schedule, data, chunks
        self.model_config, self.num_microbatches, self.seq_length = model_config, num_microbatches, seq_length

    @property
    def enabled(self) -> bool:
        return self.schedule.eval_iters > 0

    def due(self, iteration: int) -> bool:
        """Every eval_interval iterations and at the last one."""
        s = self.schedule
        return self.enabled and (iteration % s.eval_interval == 0 or iteration == s.train_iters)

    def loss(self, split: str = "valid") -> Optional[float]:
        """Mean token loss on the validation (or test) split, the same on every rank; None without
        that split. Collective."""
        if getattr(self.data, split) is None or not self.enabled:
            return None
        loss = evaluate(self.chunks, self.data.valid_batches(split), num_batches=self.schedule.eval_iters,
                        num_microbatches=self.num_microbatches, seq_length=self.seq_length,
                        micro_batch_size=self.schedule.micro_batch_size)
        clear_router_aux_losses()
        return from_reporting_rank([loss])[0]
