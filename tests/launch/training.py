"""What the launcher tests train: a tiny Neon model with pretrain_neon.py on a small real corpus.

The launchers (examples/slurm/, examples/sweeps/) are run on their real training script with a
tiny YAML config (written per test) and the test corpus of tests/neon/training/corpus.py (real
sentencepiece tokenizer, real megatron .bin/.idx).
"""

from __future__ import annotations

from pathlib import Path

import yaml

ITERS = 10  # full run
RESUME_ITERS = 24  # the run that is signalled, saved, requeued and resumed
SIGNAL_AFTER = 4  # iterations logged before the signal
JOB_TIMEOUT = 300  # seconds for one sbatch --wait (one run of the job)
LOSS_DROP = 0.1  # mean of the last 3 losses below the mean of the first 3 by this much


def make_corpus(data_dir: Path) -> tuple[str, str]:
    """(tokenizer model, data prefix); the `launch_corpus` fixture builds it once per session."""
    from tests.neon.training.corpus import make_corpus

    return make_corpus(data_dir)


def write_config(path: Path, corpus: tuple[str, str], **schedule) -> Path:
    """A tiny model YAML in pretrain_neon.py's sections."""
    tokenizer, data = corpus
    config = {
        "model": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=128, max_position_embeddings=64),
        "data": dict(data_path=[data], tokenizer_model=tokenizer, seq_length=32, split="90,10,0", num_workers=0),
        "optimizer": dict(lr=3e-3, min_lr=3e-4),
        "schedule": dict(lr_warmup_iters=1, eval_interval=1000, eval_iters=1, seed=7, **schedule),
        "logging": dict(log_interval=1),
    }
    path.write_text(yaml.safe_dump(config))
    return path


def knobs(work_dir: Path, corpus: tuple[str, str], train_iters: int) -> dict:
    """Environment knobs of the sbatch scripts for a tiny TP=2 x DP=2 run."""
    config = write_config(work_dir / f"tiny-{train_iters}.yaml", corpus)
    return {
        "TRAIN_SCRIPT": "pretrain_neon.py",
        "CONFIG": str(config),
        "TP": "2",
        "PP": "1",
        "MICRO_BATCH_SIZE": "1",
        "GLOBAL_BATCH_SIZE": "4",
        "TRAIN_ITERS": str(train_iters),
        "SAVE_INTERVAL": "1000",
    }


def check_run(run_dir: Path, records: list[dict], tensor_parallel: int, world_size: int) -> None:
    """The run's saved config has the parallel layout asked for; DP x MBS x accumulation = GBS."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["parallelism"]["tensor_model_parallel_size"] == tensor_parallel, config["parallelism"]
    assert config["schedule"]["global_batch_size"] == 4
    assert all(r["consumed_samples"] == 4 * r["iteration"] for r in records), records[:3]
    assert world_size // tensor_parallel == 2
