"""A run's checkpoints, from its `checkpointing` section: resume from --load, save to --save.

The format and the atomic write are neon/training/checkpointing.py's; this class decides when
and what (it skips a save of an iteration already in --save), keeps the run's state in step, and
runs the asynchronous saves (--async-save): at most one in flight, written by a forked process
from a copy-on-write snapshot of the training state, committed at the first `poll()` (each step)
after every rank has written, finished at the end of the run and on a signal, discarded on a
crash (its files never become the latest checkpoint). A save that fails for the machine stops the
run (InfrastructureError), or with --save-failure continue is reported and tried again at the
next save.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from neon.errors import InfrastructureError
from neon.training import checkpointing
from neon.training.state import TrainerState


class Checkpointer:
    def __init__(self, settings, *, chunks: list, optimizer, scheduler, run_config: dict,
                 distributed_optimizer: bool):
        """settings: the run's `checkpointing` section; run_config: cfg.to_dict(), saved in each
        checkpoint; distributed_optimizer: the run's, checked against a checkpoint's optimizer state."""
        self.settings, self.run_config = settings, run_config
        self.chunks, self.optimizer, self.scheduler = chunks, optimizer, scheduler
        self.distributed_optimizer = distributed_optimizer
        self.in_flight: Optional[tuple] = None  # (iteration, started, the state to update) of an async save
        self.queue = None
        if settings.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.queue = AsyncCallsQueue()

    def resume(self, announce: bool) -> TrainerState:
        """The state of --load's latest checkpoint (or --ckpt-step's), loaded into the model,
        optimizer and scheduler; a fresh state without one. `announce`: print what happened."""
        c = self.settings
        if not c.load:
            return TrainerState()
        loaded = checkpointing.load(c.load, self.chunks, self.optimizer, self.scheduler,
                                    load_optimizer=not c.no_load_optim, load_rng=not c.no_load_rng,
                                    iteration=c.ckpt_step, distributed_optimizer=self.distributed_optimizer,
                                    config=self.run_config)
        if loaded is None:
            if announce:
                print(f" no checkpoint in {c.load}: starting from scratch", flush=True)
            return TrainerState()
        state = TrainerState(iteration=loaded.iteration, consumed_samples=loaded.consumed_train_samples)
        if c.load == c.save:
            state.last_checkpoint = checkpointing.iteration_dir(c.save, state.iteration)
        if announce:
            how = " (resharded to this layout; RNG re-seeded)" if loaded.resharded else ""
            print(f" loaded checkpoint {checkpointing.iteration_dir(c.load, state.iteration)} at iteration "
                  f"{state.iteration}, {state.consumed_samples} samples consumed{how}", flush=True)
        return state

    def save(self, state: TrainerState) -> Optional[float]:
        """Save `state` to --save unless there is no --save or it holds this iteration already;
        sets state.last_checkpoint (an asynchronous save: when it is committed). Returns the
        seconds the training loop spent on it, None when skipped. Collective."""
        c = self.settings
        if not c.save or state.last_checkpoint == checkpointing.iteration_dir(c.save, state.iteration):
            return None
        if self.in_flight and self.in_flight[0] == state.iteration:
            return None
        t0 = time.perf_counter()
        self.finish()  # one save in flight at a time
        try:
            saved = checkpointing.save(
                c.save, state.iteration, self.chunks, self.optimizer, self.scheduler,
                consumed_train_samples=state.consumed_samples, config=self.run_config, keep_last=c.ckpt_keep_last,
                asynchronous=self.queue is not None)
        except InfrastructureError as e:
            self.failed(e)
            return None
        if self.queue is None:
            state.last_checkpoint = saved
        else:
            self.queue.schedule_async_request(saved[1])
            self.in_flight = (state.iteration, time.perf_counter(), state)
        return time.perf_counter() - t0

    def poll(self, blocking: bool = False) -> Optional[str]:
        """Commit the asynchronous save in flight if every rank has written it (blocking: wait for
        that); returns a line for the log when one was committed. Collective."""
        if self.queue is None or not self.in_flight:
            return None
        iteration, started, state = self.in_flight
        try:
            done = self.queue.maybe_finalize_async_calls(blocking=blocking)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - torch DCP's (a BaseException): a writer failed
            self.in_flight = None
            failure = checkpointing.save_failure(e, checkpointing.Path(self.settings.save), iteration)
            if not isinstance(failure, InfrastructureError):
                raise
            self.failed(failure)
            return None
        if not done:
            return None
        self.in_flight = None
        state.last_checkpoint = checkpointing.iteration_dir(self.settings.save, iteration)
        return (f" saved checkpoint {state.last_checkpoint} at iteration {iteration} (asynchronously, committed "
                f"{time.perf_counter() - started:.1f} s after it started)")

    def finish(self) -> Optional[str]:
        """Wait for the save in flight and commit it (the end of the run, a signal). Collective."""
        return self.poll(blocking=True)

    def failed(self, error: InfrastructureError) -> None:
        """A save failed for the machine: stop, or (--save-failure continue) report and go on."""
        if self.settings.save_failure == "stop":
            raise error
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"warning: {error} Training goes on (--save-failure continue); the next save tries again.",
                  file=sys.stderr, flush=True)

    def abandon(self) -> None:
        """On a crash: stop the writer of a save in flight (no collective) and remove its partial
        directory; the previous checkpoint stays the latest."""
        if self.queue is not None and self.in_flight:
            for call in self.queue.async_calls:
                call.async_caller.close(abort=True)  # kills its writer process
            self.queue.async_calls.clear()
            checkpointing.discard(self.settings.save, self.in_flight[0])
            self.in_flight = None
