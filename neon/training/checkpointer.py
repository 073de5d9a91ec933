"""A run's checkpoints, from its `checkpointing` section: resume from --load, save to --save.

The format and the atomic write are neon/training/checkpointing.py's; this class decides when
and what (it skips a save of an iteration already in --save) and keeps the run's state in step.
"""

from __future__ import annotations

import time
from typing import Optional

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
        sets state.last_checkpoint. Returns the seconds the save took, None when skipped. Collective."""
        c = self.settings
        if not c.save or state.last_checkpoint == checkpointing.iteration_dir(c.save, state.iteration):
            return None
        t0 = time.perf_counter()
        state.last_checkpoint = checkpointing.save(
            c.save, state.iteration, self.chunks, self.optimizer, self.scheduler,
            consumed_train_samples=state.consumed_samples, config=self.run_config, keep_last=c.ckpt_keep_last)
        return time.perf_counter() - t0
