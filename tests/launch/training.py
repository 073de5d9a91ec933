"""What the launcher tests train: settings for tiny CPU jobs and checks of their run directory.

The launchers (examples/slurm/, examples/sweeps/) start pretrain_neon.py. Until that script is
on this branch, the tests run tests/launch/standin_pretrain.py, which has the same launch
contract (torchrun, flags, metrics.jsonl, save on SIGTERM/SIGUSR1, --load).
"""

from __future__ import annotations

from pathlib import Path

ITERS = 12  # full run
RESUME_ITERS = 40  # the run that is signalled, saved, requeued and resumed
SIGNAL_AFTER = 4  # iterations logged before the signal
JOB_TIMEOUT = 240  # seconds for one sbatch --wait
LOSS_DROP = 0.1


def make_corpus(data_dir: Path) -> tuple[str, str]:
    return "", ""


def write_config(path: Path, corpus: tuple[str, str], **schedule) -> Path:
    path.write_text("{}")
    return path


def knobs(work_dir: Path, corpus: tuple[str, str], train_iters: int) -> dict:
    """Environment knobs of the sbatch scripts for a tiny TP=2 x DP=2 run."""
    return {
        "TRAIN_SCRIPT": "tests/launch/standin_pretrain.py",
        "CONFIG": "none",
        "TP": "2",
        "PP": "1",
        "MICRO_BATCH_SIZE": "1",
        "GLOBAL_BATCH_SIZE": "4",
        "TRAIN_ITERS": str(train_iters),
        "SAVE_INTERVAL": "1000",
    }


def check_run(run_dir: Path, records: list[dict], tensor_parallel: int, world_size: int) -> None:
    assert all(r["world_size"] == world_size for r in records), records
