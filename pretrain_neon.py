"""Pretrain a Neon model with megatron-core.

    torchrun --nproc-per-node N pretrain_neon.py --config examples/configs/neon_125m.yaml [--flag VALUE ...]

Flags keep Megatron-LM's names (`--help` lists every one with its default). `--print-config`
prints the resolved configuration (each value's origin as a comment) and exits 0 before anything
is built. SIGTERM or SIGUSR1 makes every rank finish its step, save a checkpoint to --save and
exit with status 0; rerunning the same command with --load pointing at that directory resumes
exactly.
Exit status: 0 finished or saved on a signal, 2 bad configuration, 3 loss became NaN/inf.
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
    from neon.training.loop import TrainingDiverged, pretrain

    try:
        summary = pretrain(cfg)
    except TrainingDiverged as e:
        if first_rank:
            print(f"pretrain_neon.py: error: {e}", file=sys.stderr, flush=True)
        return 3
    finally:
        distributed.shutdown()
    if first_rank:
        print(f" done: {summary.exit_reason} at iteration {summary.iteration}; "
              f"checkpoint: {summary.last_checkpoint or 'none'}; metrics: {summary.run_dir}/metrics.jsonl", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
