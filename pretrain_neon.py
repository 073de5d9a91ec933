"""Pretrain a Neon model with megatron-core.

    torchrun --nproc-per-node N pretrain_neon.py --config examples/configs/neon_125m.yaml [--flag VALUE ...]

Flags keep Megatron-LM's names (`--help` lists every one with its default). `--print-config`
prints the resolved configuration (each value's origin as a comment) and exits 0 before anything
is built. SIGTERM or SIGUSR1 makes every rank finish its step, save a checkpoint to --save and
exit with status 0; rerunning the same command with --load pointing at that directory resumes
exactly.

Exit statuses: `--help` lists them (neon/errors.py, docs/training.md). torchrun reports 1 when a
worker exits non-zero; the worker's own status is in its log.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    from neon.errors import NeonError
    from neon.training.config import dump_yaml, resolve_command_line

    first_rank = os.environ.get("RANK", "0") == "0"
    try:
        cfg, print_config = resolve_command_line(argv)
    except NeonError as e:
        if first_rank:
            print(f"pretrain_neon.py: error: {e}", file=sys.stderr)
        return e.exit_status
    if print_config:
        if first_rank:
            print(dump_yaml(cfg), end="", flush=True)
        return 0
    from megatron_plugins import distributed
    from neon.training import exits
    from neon.training.trainer import pretrain

    try:
        summary = pretrain(cfg)
    except BaseException as e:  # every ending: one paragraph, a documented status (neon/training/exits.py)
        return exits.report(e, first_rank=first_rank, save_dir=cfg.checkpointing.save,
                            timeout_minutes=cfg.parallelism.distributed_timeout_minutes)
    finally:
        distributed.shutdown()
    if first_rank:
        print(f" done: {summary.exit_reason} at iteration {summary.iteration}; "
              f"checkpoint: {summary.last_checkpoint or 'none'}; metrics: {summary.run_dir}/metrics.jsonl", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
