"""The pretraining run: a Trainer built from a resolved Config trains, evaluates and checkpoints;
it stops cleanly on SIGTERM/SIGUSR1, loudly on a non-finite loss.

Every rank runs `pretrain(cfg)`, that is `Trainer(cfg).run()`. The Trainer owns the model chunks,
optimizer and scheduler (megatron-core's: neon/training/step.py, optim.py) and an explicit
TrainerState; each collaborator is built from the config section it needs:
- Checkpointer (`checkpointing`): resumes the state from --load, saves to --save;
- TrainingData (`data`, `schedule`): the datasets and this rank's micro-batches;
- Evaluator (`schedule`): the validation loss (and the test split's after training);
- TaskEvaluator (`schedule`): downstream task scores (lm-eval's --eval-tasks);
- MetricsLogger (`logging`): console lines, metrics.jsonl, TensorBoard, wandb.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.num_microbatches_calculator import (
    destroy_num_microbatches_calculator,
    get_num_microbatches,
    init_num_microbatches_calculator,
)

from megatron_plugins import cpu_runtime, distributed
from neon.errors import PortInUseError, StepError, TrainingDiverged
from neon.flops import training_flops_per_token
from neon.model import build_model
from neon.training import faults, recipe_resume, run_lock
from neon.training.aux_losses import step_reports
from neon.training.checkpointer import Checkpointer
from neon.training.checkpointing import latest_iteration
from neon.training.config import Config, dump_yaml
from neon.training.data import TrainingData
from neon.training.evaluator import Evaluator, TaskEvaluator
from neon.training.metrics import MetricsLogger
from neon.training.optim import build_optimizer, current_lr, optimizer_config, scheduler_for
from neon.training.signals import SignalFlag
from neon.training.state import TrainerState
from neon.training.step import after_step, build_model_chunks, from_reporting_rank, train_step


@dataclass
class RunSummary:
    iteration: int
    exit_reason: str  # "finished" | "signal SIGTERM" | "exit interval" | "skip-train"
    last_checkpoint: Optional[str]
    train_loss: Optional[float]
    valid_loss: Optional[float]
    run_dir: str


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.logging.run_dir or cfg.checkpointing.save or "runs/neon")


def start_parallel(cfg: Config) -> int:
    """torch.distributed, megatron-core's parallel groups and its micro-batch calculator for the
    run's `parallelism` and `schedule` sections. Returns the micro-batches per step and rank."""
    p, s = cfg.parallelism, cfg.schedule
    try:
        distributed.initialize(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                               p.expert_model_parallel_size, cfg.virtual_pipeline_size, s.seed,
                               timeout_s=60 * p.distributed_timeout_minutes,
                               expert_tensor_parallel=1,  # as neon_config(): experts are whole on each TP rank
                               context_parallel=p.context_parallel_size)
    except distributed.PortInUse as e:  # megatron_plugins knows no Neon error class
        raise PortInUseError(str(e)) from None
    if not cpu_runtime.cuda_available():  # the CPU runtime's RNG tracker forks the CPU generator itself
        logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)
    destroy_num_microbatches_calculator()
    init_num_microbatches_calculator(dist.get_rank(), None, s.global_batch_size, s.micro_batch_size,
                                     parallel_state.get_data_parallel_world_size())
    return get_num_microbatches()


def layout_line(cfg: Config) -> str:
    """Megatron-LM's start-up line of the parallel layout."""
    p = cfg.parallelism
    return (f"using world size: {cfg.world_size}, data-parallel size: {cfg.data_parallel_size}, context-parallel "
            f"size: {p.context_parallel_size}, tensor-model-parallel size: {p.tensor_model_parallel_size}, "
            f"pipeline-model-parallel size: {p.pipeline_model_parallel_size}")


class Trainer:
    """One pretraining run on this rank: build everything in __init__ (collective), then run();
    close() releases what it started (DataLoader workers, an unfinished asynchronous save, the logs,
    the run lock, the signal handlers), and a failing __init__ releases what it had started."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.closing = contextlib.ExitStack()
        try:
            self.build(cfg)
        except BaseException:
            self.close(crashed=True)
            raise

    def build(self, cfg: Config) -> None:
        self.signals = SignalFlag(cfg.checkpointing.exit_signal_handler)  # before DataLoader workers fork
        self.closing.callback(self.signals.restore)
        self.num_microbatches = start_parallel(cfg)
        self.rank0 = dist.get_rank() == 0
        if self.rank0:
            print(layout_line(cfg), flush=True)
        self.lock = run_lock.acquire([cfg.checkpointing.save, run_dir_of(cfg)])  # one run per directory
        self.closing.callback(self.lock.release)
        adopted = recipe_resume.adopt_checkpoint_settings(cfg)  # before anything is built from cfg.model
        if adopted and self.rank0:
            print("resuming: recipe settings that the checkpoint fixes:\n" + "\n".join(adopted), flush=True)
        self.model_config = cfg.neon_config()
        self.chunks, self.optimizer, self.scheduler = self.build_model()
        self.checkpointer = Checkpointer(cfg.checkpointing, chunks=self.chunks, optimizer=self.optimizer,
                                         scheduler=self.scheduler, run_config=cfg.to_dict(),
                                         distributed_optimizer=cfg.parallelism.use_distributed_optimizer)
        self.state: TrainerState = self.checkpointer.resume(announce=self.rank0)
        self.data = TrainingData(cfg.data, cfg.schedule, vocab_size=self.model_config.vocab_size,
                                 num_chunks=len(self.chunks), dp_rank=parallel_state.get_data_parallel_rank(),
                                 dp_size=parallel_state.get_data_parallel_world_size())
        self.closing.callback(self.data.close)  # its DataLoader workers
        self.train_batches = self.data.train_batches(self.state.consumed_samples)
        self.evaluator = Evaluator(cfg.schedule, self.data, self.chunks, model_config=self.model_config,
                                   num_microbatches=self.num_microbatches, seq_length=cfg.data.seq_length)
        self.task_evaluator = TaskEvaluator(cfg.schedule, self.chunks, tokenizer=self.data.tokenizer,
                                            vocab_size=self.model_config.vocab_size,
                                            max_length=self.model_config.max_position_embeddings)
        self.run_dir = self.open_run_dir()
        self.logger = MetricsLogger(
            cfg.logging, cfg.schedule, seq_length=cfg.data.seq_length,
            flops_per_token=training_flops_per_token(self.model_config, cfg.data.seq_length, causal="half"),
            flops_per_token_full_attention=training_flops_per_token(self.model_config, cfg.data.seq_length,
                                                                    causal="full"),
            num_devices=dist.get_world_size(), run_dir=self.run_dir, start_iteration=self.state.iteration,
            run_config=cfg.to_dict(), enabled=self.rank0)
        self.closing.callback(self.logger.close)

    def close(self, crashed: bool = False) -> None:
        """Release everything this rank started, in reverse order; on a crash first stop the
        asynchronous save in flight (its files never become the latest checkpoint)."""
        checkpointer = getattr(self, "checkpointer", None)
        if crashed and checkpointer is not None:
            checkpointer.abandon()
        self.closing.close()

    def build_model(self):
        """(model chunks in megatron DDP, optimizer, LR scheduler), fresh. Collective."""
        p = self.cfg.parallelism
        chunks = build_model_chunks(self.model_config, build_model, ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=p.overlap_grad_reduce,
            use_distributed_optimizer=p.use_distributed_optimizer))
        optimizer = build_optimizer(chunks, optimizer_config(self.cfg))
        return chunks, optimizer, scheduler_for(self.cfg, optimizer)

    def open_run_dir(self) -> Path:
        """The run directory (metrics.jsonl, config.yaml); rank 0 writes the resolved config.yaml."""
        run_dir = run_dir_of(self.cfg)
        if self.rank0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(dump_yaml(self.cfg))
        return run_dir

    def run(self) -> RunSummary:
        """Train (with skip_train: only evaluate). Whatever ends it, close() releases what the
        Trainer started: after a normal end every save is committed first."""
        skip = self.cfg.schedule.skip_train
        try:
            if skip:
                self.validate()
                self.evaluate_tasks()
            exit_reason = "skip-train" if skip else self.train()
            self.log_line(self.checkpointer.finish())
        except BaseException:
            self.close(crashed=True)
            raise
        self.close()
        s = self.state
        last = None if skip or s.last_checkpoint is None else str(s.last_checkpoint)  # skip-train reports none
        return RunSummary(iteration=s.iteration, exit_reason=exit_reason, last_checkpoint=last,
                          train_loss=s.train_loss, valid_loss=s.valid_loss, run_dir=str(self.run_dir))

    def train(self) -> str:
        """The training loop, until train_iters, a signal or the exit interval. Returns why it stopped."""
        s, c, state = self.cfg.schedule, self.cfg.checkpointing, self.state
        while state.iteration < s.train_iters:
            signalled = self.step()
            self.log_line(self.checkpointer.poll())  # an asynchronous save whose files are written
            self.signals.raise_if_interrupted()
            if self.evaluator.due(state.iteration):
                self.validate()
            if self.task_evaluator.due(state.iteration):
                self.evaluate_tasks()
            if signalled:
                reason = f"signal {self.signals.received or 'on another rank'}"
                self.logger.print(f" received {reason} at iteration {state.iteration}: saving and exiting")
                self.save()
                return reason
            if c.save_interval and state.iteration % c.save_interval == 0:
                self.save()
            if s.exit_interval and state.iteration % s.exit_interval == 0:
                self.save()
                return "exit interval"
        self.save()
        self.test()
        return "finished"

    def log_line(self, line) -> None:
        if line:
            self.logger.print(line)

    def step(self) -> bool:
        """One optimizer step over a global batch, then its log line (an iteration listed in
        --iterations-to-skip only drops its batch). Returns whether any rank was signalled. Raises
        TrainingDiverged on a non-finite loss or gradient norm. Collective."""
        t0, state, s = time.perf_counter(), self.state, self.cfg.schedule
        if state.iteration + 1 in s.iterations_to_skip:
            return self.skip_step()
        faults.mark_step(state.iteration + 1)  # the step this rank started: read back if a collective times out
        try:
            result = train_step(self.chunks, self.optimizer, self.train_batches, self.model_config,
                                num_microbatches=self.num_microbatches, seq_length=self.cfg.data.seq_length,
                                micro_batch_size=s.micro_batch_size)
        except StepError as e:  # e.g. an IO function that failed: name the step
            raise e.at_step(state.iteration + 1) from None
        if not result.skipped:
            self.scheduler.step(increment=1)
        state.iteration += 1
        state.consumed_samples += s.global_batch_size
        for line in after_step(self.chunks, self.model_config, state.iteration):
            self.log_line(line)
        signalled, loss, grad_norm = from_reporting_rank([result.loss, result.grad_norm],
                                                         flags=(float(self.signals.received is not None),))
        step_time = time.perf_counter() - t0
        aux = step_reports(self.chunks, self.model_config, iteration=state.iteration,
                           num_microbatches=self.num_microbatches, step_time_s=step_time)
        has_norm = result.grad_norm is not None
        self.check_finite(loss, grad_norm, has_norm)
        state.train_loss = loss
        self.logger.train_step(iteration=state.iteration, loss=loss, grad_norm=grad_norm if has_norm else None,
                               lr=current_lr(self.optimizer), consumed_samples=state.consumed_samples,
                               step_time_s=step_time, skipped=result.skipped, aux=aux)
        return bool(signalled)

    def skip_step(self) -> bool:
        """An iteration of --iterations-to-skip (as Megatron-LM's): every rank draws the global
        batch from its data iterators and drops it; no forward, backward, update or scheduler step.
        Returns whether any rank was signalled. Collective."""
        state, s = self.state, self.cfg.schedule
        for iterator in self.train_batches if isinstance(self.train_batches, list) else [self.train_batches]:
            for _ in range(self.num_microbatches):
                next(iterator)
        state.iteration += 1
        state.consumed_samples += s.global_batch_size
        (signalled,) = from_reporting_rank([], flags=(float(self.signals.received is not None),))
        self.logger.print(f" skipped iteration {state.iteration} (--iterations-to-skip): its {s.global_batch_size} "
                          f"samples consumed, no forward, backward or update")
        return bool(signalled)

    def check_finite(self, loss: float, grad_norm: float, has_norm: bool) -> None:
        """TrainingDiverged unless the loss and (when the optimizer reports one) the grad norm are finite."""
        if math.isfinite(loss) and (not has_norm or math.isfinite(grad_norm)):
            return
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        raise TrainingDiverged(
            f"iteration {self.state.iteration}: the training {what} is not finite (loss {loss}, grad norm "
            f"{grad_norm}); stopping without saving this state. {self.recovery_advice()}")

    def recovery_advice(self) -> str:
        """What to do after a non-finite step: the checkpoint to resume from and the exact flags
        that resume past the diverged iteration with a tenth of the learning rate."""
        n, last, o, s = self.state.iteration, self.state.last_checkpoint, self.cfg.optimizer, self.cfg.schedule
        lower = f"--lr {o.lr / 10:g}" + (f" --min-lr {o.min_lr / 10:g}" if o.min_lr else "") + (
            f" --lr-warmup-init {s.lr_warmup_init / 10:g}" if s.lr_warmup_init else "")
        if last is None:
            return (f"This run has no checkpoint in --save to resume from. Fix: rerun from the start with a lower "
                    f"learning rate ({lower}), a longer --lr-warmup-iters or --clip-grad on, and --save-interval "
                    f"to keep checkpoints.")
        save, good = last.parent, int(last.name.removeprefix("iter_"))
        start, why = good, f"its steps ran finite until iteration {n}"
        if good == n - 1:
            kept = (p.name.removeprefix("iter_") for p in save.glob("iter_*") if (p / "metadata.json").is_file())
            earlier = [int(i) for i in kept if i.isdigit() and int(i) < good]
            why = "its next step is the one that diverged, so resuming it unchanged diverges again"
            if earlier:
                start = max(earlier)
                why += f"; the advice starts from iteration {start}, the checkpoint before it"
        pick = "" if latest_iteration(save) == start else f" --ckpt-step {start}"
        skips = " ".join(str(i) for i in sorted({*s.iterations_to_skip, n}))
        return (f"Last good checkpoint: {last} (iteration {good}); {why}. To go on, rerun the same command with "
                f"these flags added: --load {save}{pick} --iterations-to-skip {skips} "
                f"--override-opt-param-scheduler {lower} (this skips iteration {n}'s batch and lowers the "
                f"learning rate tenfold: without --override-opt-param-scheduler a resumed run keeps the "
                f"checkpoint's schedule and ignores --lr). If it diverges again, lower the rate further or start "
                f"from an earlier checkpoint (--ckpt-step)"
                + (f"; once the run has saved past iteration {n}, drop --ckpt-step" if pick else "")
                + ". Also check the data, --lr-warmup-iters and --clip-grad.")

    def validate(self) -> None:
        """Evaluate and log the validation loss (nothing with eval_iters 0). Collective."""
        if not self.evaluator.enabled:
            return
        self.state.valid_loss = self.evaluator.loss()
        self.logger.evaluation(iteration=self.state.iteration, loss=self.state.valid_loss,
                               consumed_samples=self.state.consumed_samples)

    def evaluate_tasks(self) -> None:
        """Evaluate and log the --eval-tasks scores (nothing without tasks). Collective."""
        if not self.task_evaluator.enabled:
            return
        scores = self.task_evaluator.scores()
        self.logger.tasks(iteration=self.state.iteration, scores=scores, consumed_samples=self.state.consumed_samples)

    def test(self) -> None:
        """Evaluate and log the test split's loss (when the run has one). Collective."""
        loss = self.evaluator.loss("test")
        if loss is not None:
            self.logger.evaluation(iteration=self.state.iteration, loss=loss,
                                   consumed_samples=self.state.consumed_samples, split="test")

    def save(self) -> None:
        """A checkpoint of the current state (unless --save is unset or already holds it), after
        checking that the data files are the ones the run started with. Collective."""
        self.data.check_unchanged()
        seconds = self.checkpointer.save(self.state)
        if seconds is None:
            return
        if self.checkpointer.in_flight:
            self.logger.print(f" started the checkpoint of iteration {self.state.iteration} (asynchronously: the "
                              f"training loop waited {seconds:.2f} s)")
        else:
            self.logger.print(f" saved checkpoint {self.state.last_checkpoint} at iteration "
                              f"{self.state.iteration} in {seconds:.1f} s")


def pretrain(cfg: Config) -> RunSummary:
    """The whole run on this rank (every rank calls it)."""
    return Trainer(cfg).run()
