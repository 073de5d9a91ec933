"""Pretrain a Neon model with megatron-core.

    torchrun --nproc-per-node N pretrain_neon.py --config examples/configs/neon_125m.yaml [--flag VALUE ...]

Flags keep Megatron-LM's names (`--help` lists every one with its default). `--print-config`
prints the resolved configuration (each value's origin as a comment) and exits 0 before anything
is built. SIGTERM or SIGUSR1 makes every rank finish its step, save a checkpoint to --save and
exit with status 0; rerunning the same command with --load pointing at that directory resumes
exactly.
Exit status (every ending leaves the previous checkpoint loadable; docs/training.md):
  0    finished, or saved and stopped on SIGTERM/SIGUSR1, --exit-interval or --skip-train
  1    unexpected error (a bug or a failing machine): traceback, then the latest checkpoint
  2    bad configuration or input, before anything is built (or a FlamingMoE IO function
       failed when called: the function and the training step are named)
  3    loss or gradient norm became NaN/inf (that step is not saved)
  4    the checkpoint to load is damaged (file named), of another architecture, or missing
  5    --save / the run directory is in use by another live run
  6    MASTER_PORT is fixed and already in use
  130  interrupted by SIGINT (Ctrl-C) without saving
torchrun reports 1 when a worker exits non-zero; the worker's own status is in its log.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    from neon.training.config import ConfigError, dump_yaml, resolve_command_line

    first_rank = os.environ.get("RANK", "0") == "0"
    try:
        cfg, print_config = resolve_command_line(argv)
    except ConfigError as e:
        if first_rank:
            print(f"pretrain_neon.py: error: {e}", file=sys.stderr)
        return 2
    if print_config:
        if first_rank:
            print(dump_yaml(cfg), end="", flush=True)
        return 0
    from megatron_plugins import distributed
    from neon.training import exits
    from neon.training.loop import TrainingDiverged, pretrain

    try:
        summary = pretrain(cfg)
    except TrainingDiverged as e:
        if first_rank:
            print(f"pretrain_neon.py: error: {e}", file=sys.stderr, flush=True)
        return 3
    except BaseException as e:  # every other ending: one paragraph, a documented status (neon/training/exits.py)
        return exits.report(e, first_rank=first_rank, save_dir=cfg.checkpointing.save)
    finally:
        distributed.shutdown()
    if first_rank:
        print(f" done: {summary.exit_reason} at iteration {summary.iteration}; "
              f"checkpoint: {summary.last_checkpoint or 'none'}; metrics: {summary.run_dir}/metrics.jsonl", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
