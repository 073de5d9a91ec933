"""Evaluation during a run:
- Evaluator: the validation loss, `eval_iters` global batches of the validation split, forward
  only, the same samples at every evaluation (and, after training, of the test split);
- TaskEvaluator: lm-evaluation-harness tasks (`eval_tasks`) on the live model chunks at the run's
  parallel layout; every rank runs the same requests (each forward pass is collective), rank 0
  logs the scores."""

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


class TaskEvaluator:
    def __init__(self, schedule, chunks: list, *, tokenizer, vocab_size: int, max_length: int):
        """schedule: the run's `schedule` section (eval_tasks and their settings, eval_interval, train_iters)."""
        self.schedule, self.chunks, self.tokenizer = schedule, chunks, tokenizer
        self.vocab_size, self.max_length = vocab_size, max_length
        self.manager = None  # lm-eval's task index, built at the first evaluation

    @property
    def enabled(self) -> bool:
        return bool(self.schedule.eval_tasks)

    def due(self, iteration: int) -> bool:
        """Every eval_tasks_interval (default: eval_interval) iterations and at the last one."""
        s = self.schedule
        return self.enabled and (iteration % (s.eval_tasks_interval or s.eval_interval) == 0
                                 or iteration == s.train_iters)

    def scores(self, show_progress: bool = False) -> dict:
        """{task: {metric: value}} on the first rank of each node ({} elsewhere). Collective."""
        from neon.evaluation.forward import ModelLogits
        from neon.evaluation.harness import NeonLM
        from neon.evaluation.tasks import run_tasks, task_manager

        s = self.schedule
        if self.manager is None:
            self.manager = task_manager(s.eval_tasks_include_path, s.eval_tasks)
        lm = NeonLM(ModelLogits(self.chunks, self.vocab_size), self.tokenizer, max_length=self.max_length,
                    show_progress=show_progress)
        return run_tasks(lm, s.eval_tasks, include_path=s.eval_tasks_include_path, limit=s.eval_tasks_limit,
                         num_fewshot=s.eval_tasks_num_fewshot, manager=self.manager)["metrics"]
