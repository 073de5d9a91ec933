"""How a run ends: one exit status per cause, each with a one-paragraph message.

See STATUSES below (pretrain_neon.py --help prints it).

Every ending leaves the previous checkpoint loadable: a checkpoint is committed only after all
of its files and their checksums are written (neon/training/checkpointing.py). pretrain_neon.py
lists these in its --help; docs/training.md explains them.
"""

from __future__ import annotations

import sys
import traceback
from typing import Optional

from megatron_plugins.distributed import PortInUse
from neon.flaming.callables import IOFunctionError
from neon.training import checkpointing
from neon.training.run_lock import RunDirectoryInUse

STATUSES = """\
    0    finished, or saved and stopped on SIGTERM/SIGUSR1, --exit-interval or --skip-train
    1    an unexpected error (a bug or a failing machine): Python's traceback, then a paragraph
         naming the latest checkpoint, which is intact
    2    bad configuration or input (settings, data files, tokenizer, an IO function's source),
         before anything is built; or a FlamingMoE IO function failed when called (it raised or
         returned the wrong shape: the function and the training step are named, nothing saved)
    3    the loss or gradient norm became NaN/inf (that step is not saved)
    4    the checkpoint to load cannot be used: damaged (the file is named), another model
         architecture (the settings are named), or missing
    5    --save / the run directory is in use by another live run
    6    MASTER_PORT is fixed and already in use
    130  interrupted by SIGINT (Ctrl-C) without saving
"""

OK, CRASHED, BAD_CONFIG, DIVERGED, BAD_CHECKPOINT, DIRECTORY_IN_USE, PORT_IN_USE, INTERRUPTED = 0, 1, 2, 3, 4, 5, 6, 130
EXPECTED = {checkpointing.CheckpointError: BAD_CHECKPOINT, RunDirectoryInUse: DIRECTORY_IN_USE,
            PortInUse: PORT_IN_USE, IOFunctionError: BAD_CONFIG}


def _latest(save_dir: Optional[str]) -> str:
    try:
        it = checkpointing.latest_iteration(save_dir) if save_dir else None
    except checkpointing.CheckpointError:
        it = None
    if it is None:
        return "there is no checkpoint to resume from"
    return (f"the latest checkpoint, {checkpointing.iteration_dir(save_dir, it)}, is intact: resume with "
            f"--load {save_dir}")


def report(e: BaseException, *, first_rank: bool, save_dir: Optional[str]) -> int:
    """Print the paragraph for how the run ended and return its exit status (SystemExit passes)."""
    if isinstance(e, SystemExit):
        raise e
    status = next((code for cls, code in EXPECTED.items() if isinstance(e, cls)), None)
    if status is not None:
        if first_rank:
            print(f"pretrain_neon.py: error: {e}", file=sys.stderr, flush=True)
        return status
    if isinstance(e, KeyboardInterrupt):
        if first_rank:
            print(f"pretrain_neon.py: interrupted (SIGINT) before saving; {_latest(save_dir)}. To stop with a "
                  f"save, send SIGTERM or SIGUSR1 instead.", file=sys.stderr, flush=True)
        return INTERRUPTED
    traceback.print_exception(e, file=sys.stderr)
    print(f"pretrain_neon.py: error: the run stopped on an unexpected error ({type(e).__name__}: {e}; the "
          f"traceback above is for a bug report); {_latest(save_dir)}.", file=sys.stderr, flush=True)
    return CRASHED
