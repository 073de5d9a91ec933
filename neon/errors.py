"""Neon's errors and the exit status each one ends a command with: the one source of both.

Every error Neon raises on purpose is a `NeonError` whose message names the value, the file or the
rank at fault and the fix. Each class carries the exit status of the command it ends
(`exit_status`); entry points (pretrain_neon.py, tools/*.py) catch `NeonError`, print its message
without a traceback and return that status (`cli_main`). Anything else is a bug or a failing
machine: status 1, with Python's traceback.

This module imports nothing from Neon, so every layer may use it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

OK = 0
CRASHED = 1
BAD_INPUT = 2
DIVERGED = 3
BAD_CHECKPOINT = 4
DIRECTORY_IN_USE = 5
PORT_IN_USE = 6
INFRASTRUCTURE = 7
INTERRUPTED = 130

STATUSES = """\
    0    finished, or saved and stopped on SIGTERM/SIGUSR1, --exit-interval or --skip-train
    1    an unexpected error (a bug): Python's traceback, then a paragraph naming the latest
         checkpoint, which is intact
    2    bad configuration or input (settings, data files, tokenizer, an IO function's source),
         before anything is built; or a FlamingMoE IO function failed when called (it raised,
         timed out or returned the wrong shape: the function, the call and the training step
         are named, nothing saved)
    3    the loss or gradient norm became NaN/inf (that step is not saved)
    4    the checkpoint to load cannot be used: damaged (the file is named), another model
         architecture (the settings are named), or missing
    5    --save / the run directory is in use by another live run
    6    MASTER_PORT is fixed and already in use
    7    the machine failed the run: the save disk is full or read-only, a rank was lost or
         stopped answering (collective timeout), a data file, store or frozen model changed
         or vanished; the path or rank is named, with the intact checkpoint to resume from
    130  interrupted by SIGINT (Ctrl-C) without saving
"""


class NeonError(Exception):
    """An error Neon raises on purpose; the message names what is wrong and the fix."""

    exit_status = CRASHED
    every_rank = False
    """True for errors one rank may raise alone (a step's, the machine's): each rank that has it
    prints it, naming itself; the others are printed once, by the first rank."""


class ConfigError(NeonError, ValueError):
    """A setting (or a combination of settings) Neon cannot use."""

    exit_status = BAD_INPUT


class DataError(NeonError, ValueError):
    """A data file or data setting Neon cannot train from; the message names the file."""

    exit_status = BAD_INPUT


class IOSourceError(ConfigError):
    """An IO function's source cannot be used (missing, foreign, truncated, not the recorded one)."""


class StepError(NeonError, RuntimeError):
    """A failure inside a training step that the Trainer names the step of (`at_step`)."""

    every_rank = True

    def at_step(self, step: int) -> StepError:
        return type(self)(f"training step {step}: {self}")


class IOFunctionError(StepError):
    """An IO function failed while running (raised, timed out or returned the wrong shape); the
    message names it and the call, and the Trainer adds the training step."""

    exit_status = BAD_INPUT


class TrainingDiverged(NeonError, RuntimeError):
    """The loss or the gradient norm became NaN/inf; nothing of that state was saved."""

    exit_status = DIVERGED


class CheckpointError(NeonError, RuntimeError):
    """A checkpoint that cannot be used; the message names the path and the fix."""

    exit_status = BAD_CHECKPOINT


class RunDirectoryInUse(NeonError, RuntimeError):
    """Another live run owns the directory; the message names it and the fix."""

    exit_status = DIRECTORY_IN_USE


class PortInUseError(NeonError, RuntimeError):
    """The rendezvous port that MASTER_PORT fixes is taken."""

    exit_status = PORT_IN_USE


class InfrastructureError(NeonError, RuntimeError):
    """The machine failed the run (disk, a rank, a collective, a file that changed): not a bug."""

    exit_status = INFRASTRUCTURE
    every_rank = True


class ConversionError(NeonError, RuntimeError):
    """A checkpoint, directory or tokenizer the converters cannot use."""

    exit_status = BAD_INPUT


class AblationError(ConfigError):
    """Bad input to the ablation command."""


def cli_main(prog: str, main: Callable[[], int]) -> int:
    """Run a command's `main()`; a NeonError prints `prog: error: <message>` (no traceback) and
    returns its exit status."""
    try:
        return main()
    except NeonError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return e.exit_status
