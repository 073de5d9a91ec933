"""How a run ends: the paragraph it prints and its exit status.

The statuses and the error classes that carry them are neon/errors.py's (`STATUSES`, printed by
pretrain_neon.py --help; docs/training.md explains them). Every ending leaves the previous
checkpoint loadable: a checkpoint is committed only after all of its files and their checksums
are written (neon/training/checkpointing.py).
"""

from __future__ import annotations

import sys
import traceback
from typing import Optional

import torch.distributed as dist

from neon.errors import CRASHED, INTERRUPTED, NeonError
from neon.training import checkpointing


def _latest(save_dir: Optional[str]) -> str:
    try:
        it = checkpointing.latest_iteration(save_dir) if save_dir else None
    except NeonError:
        it = None
    if it is None:
        return "there is no checkpoint to resume from"
    return (f"the latest checkpoint, {checkpointing.iteration_dir(save_dir, it)}, is intact: resume with "
            f"--load {save_dir}")


def report(e: BaseException, *, first_rank: bool, save_dir: Optional[str], timeout_minutes: float = 10) -> int:
    """Print the paragraph for how the run ended and return its exit status (SystemExit passes).
    An error of torch.distributed or the DataLoader that is the machine's (a lost rank, a
    collective timeout, a dead worker) becomes the InfrastructureError naming it (neon/training/
    faults.py). Errors that every rank raises alike are printed by the first rank; the others
    (a rank's own failure) by the rank that has them, naming it."""
    if isinstance(e, SystemExit):
        raise e
    from neon.training import faults

    e = faults.diagnose(e, timeout_minutes, _latest(save_dir)) or e
    faults.report_failure(e)  # for the other ranks' messages
    rank = f"rank {dist.get_rank()}: " if dist.is_initialized() and dist.get_world_size() > 1 else ""
    if isinstance(e, NeonError):
        if first_rank or e.every_rank:
            print(f"pretrain_neon.py: error: {rank if e.every_rank else ''}{e}", file=sys.stderr, flush=True)
        return e.exit_status
    if isinstance(e, KeyboardInterrupt):
        if first_rank:
            print(f"pretrain_neon.py: interrupted (SIGINT) before saving; {_latest(save_dir)}. To stop with a "
                  f"save, send SIGTERM or SIGUSR1 instead.", file=sys.stderr, flush=True)
        return INTERRUPTED
    traceback.print_exception(e, file=sys.stderr)
    print(f"pretrain_neon.py: error: {rank}the run stopped on an unexpected error ({type(e).__name__}: {e}; the "
          f"traceback above is for a bug report); {_latest(save_dir)}.", file=sys.stderr, flush=True)
    return CRASHED
