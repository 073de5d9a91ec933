"""pretrain_neon.py with test-only faults, armed from the environment (tests launch this module in
pretrain_neon.py's place: `python -m tests.faults ...`, `runs.command(..., script=FAULTS)`, or as
the sbatch scripts' TRAIN_SCRIPT=tests/faults.py):

    NEON_TEST_NAN_AT=N          iteration N's loss reads NaN (as a corrupt batch would give)
    NEON_TEST_PAUSE_SAVE_AT=N   the save of iteration N sleeps after writing its files, before
                                committing them (a test kills the job there); an asynchronous
                                save's writer process sleeps after writing, while training goes on
    NEON_TEST_HOLD_SAVE_AT=N:GATE  the save of iteration N waits, before writing anything, until
                                the file GATE exists (a test shrinks the disk meanwhile)
    NEON_TEST_RAISE_AT=N:R      rank R raises RuntimeError at iteration N
    NEON_TEST_HANG_AT=N:R       rank R stops answering at iteration N (sleeps; the others wait in
                                the next collective)

The production code has no fault hooks: the faults wrap its functions here, in the job's own
processes, before pretrain_neon.main() runs.
"""

from __future__ import annotations

import math
import os
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "pretrain_neon.py"


def _at(name: str) -> tuple[int, int] | None:
    """(iteration, rank) of a fault `N` or `N:R` set in the environment, else None."""
    value = os.environ.get(name)
    if not value:
        return None
    iteration, _, rank = value.partition(":")
    return int(iteration), int(rank or -1)


def _this_rank(rank: int) -> bool:
    return rank < 0 or int(os.environ.get("RANK", "0")) == rank


def arm() -> None:
    from neon.training import checkpointing, trainer

    if (nan := _at("NEON_TEST_NAN_AT")) is not None:
        check_finite = trainer.Trainer.check_finite

        def nan_at(self, loss, grad_norm, has_norm):
            return check_finite(self, math.nan if self.state.iteration == nan[0] else loss, grad_norm, has_norm)

        trainer.Trainer.check_finite = nan_at

    if (pause := _at("NEON_TEST_PAUSE_SAVE_AT")) is not None:
        real = checkpointing.dist_checkpointing

        class PausingSave:
            def __getattr__(self, name):
                return getattr(real, name)

            @staticmethod
            def save(state, path, *args, **kwargs):
                out = real.save(state, path, *args, **kwargs)
                if not Path(path).name.endswith(f"{pause[0]:07d}"):
                    return out
                if out is None:  # a synchronous save: pause before the commit
                    time.sleep(300)
                    return out
                write = out.async_fn

                def write_then_pause(*a, **kw):
                    write(*a, **kw)
                    time.sleep(300)

                return out._replace(async_fn=write_then_pause)

        checkpointing.dist_checkpointing = PausingSave()

    if hold := os.environ.get("NEON_TEST_HOLD_SAVE_AT"):
        iteration, _, gate = hold.partition(":")
        unheld = checkpointing.dist_checkpointing

        class HeldSave:
            def __getattr__(self, name):
                return getattr(unheld, name)

            @staticmethod
            def save(state, path, *args, **kwargs):
                while Path(path).name.endswith(f"{int(iteration):07d}") and not Path(gate).exists():
                    time.sleep(0.1)
                return unheld.save(state, path, *args, **kwargs)

        checkpointing.dist_checkpointing = HeldSave()

    for name, fault in (("NEON_TEST_RAISE_AT", "raise"), ("NEON_TEST_HANG_AT", "hang")):
        if (at := _at(name)) is None or not _this_rank(at[1]):
            continue
        step = trainer.Trainer.step

        def faulty_step(self, _step=step, _at=at, _fault=fault):
            if self.state.iteration + 1 == _at[0]:
                if _fault == "raise":
                    raise RuntimeError(f"injected fault on rank {os.environ.get('RANK', '0')} at iteration {_at[0]}")
                time.sleep(3600)
            return _step(self)

        trainer.Trainer.step = faulty_step


if __name__ == "__main__":
    sys.path[0] = str(ROOT)  # as `python -m tests.faults` from the repository root: `neon`, not tests/neon
    arm()
    sys.argv[0] = str(PRETRAIN)
    runpy.run_path(str(PRETRAIN), run_name="__main__")
