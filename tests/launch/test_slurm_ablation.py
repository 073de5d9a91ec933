"""tools/ablate.py --slurm on the local Slurm cluster of test_slurm.py: each round of the grid is
one job array of examples/slurm/pretrain_dense.sbatch, one (variant, lr, seed) run per task;
the tool collects the results and a rerun submits nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.launch.test_slurm import slurm  # noqa: F401 - the module-scoped cluster fixture

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 600

pytestmark = pytest.mark.slow


def test_ablation_runs_each_round_as_a_job_array(slurm, launch_corpus, tmp_path):  # noqa: F811
    tokenizer, data = launch_corpus
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                      max_position_embeddings=32),
        "data": dict(data_path=[data], tokenizer_model=tokenizer, seq_length=32, split="90,10,0", num_workers=0),
        "optimizer": dict(lr=1e-2, min_lr=1e-3),
        "schedule": dict(train_iters=3, micro_batch_size=2, global_batch_size=2, eval_interval=3, eval_iters=1),
    }))
    work = tmp_path / "work"
    env = dict(slurm, NEON_DEVICE="cpu", CPU_PROCS_PER_NODE="1")
    argv = [sys.executable, str(ROOT / "tools" / "ablate.py"), "--config", str(config), "--work-dir", str(work),
            "--variants", "base", "--seeds", "1", "--max-rates", "3", "--slurm",
            "--sbatch-args", "--nodes=1 --gpus-per-node=0 --time=10 --job-name=neon-test-ablate"]
    try:
        first = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--name=neon-test-ablate"], env=slurm, timeout=30)
        raise
    log = first.stdout + first.stderr
    assert first.returncode == 0, log
    plans = sorted((work / "slurm" / "round1").glob("*.args"))
    assert len(plans) == 3 and "--array=0-2" in first.stdout, log
    data = json.loads((work / "ablation.json").read_text())
    base = data["variants"][0]
    assert base["failed"] == [] and sorted(map(float, base["grid"])) == [0.00333, 0.01, 0.03], log
    assert all(v["1"] is not None for v in base["grid"].values()), base["grid"]
    # each task trained the run its plan file names
    for plan in plans:
        run_dir = Path(plan.read_text().splitlines()[0])
        assert (run_dir / "metrics.jsonl").is_file(), (plan, log)

    again = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert again.returncode == 0 and "sbatch" not in again.stdout, again.stdout + again.stderr
