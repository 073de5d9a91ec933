"""The runs of one round as a Slurm job array of examples/slurm/pretrain_dense.sbatch.

The tool writes one file per array task, WORK/slurm/round<K>/<task id>.args: the run directory
on the first line, then the run's pretrain_neon.py flags, one per line. The sbatch script's
array mode (ARRAY_PLAN_DIR set) trains the line-listed run of its SLURM_ARRAY_TASK_ID through
examples/slurm/launch.sh, so each task keeps the script's requeue-on-time-limit. `sbatch --wait`
returns when every task ended; the tool then reads each run's metrics.jsonl, as for local runs.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from neon.ablation import runs
from neon.ablation.runs import REPO, RunPoint


def write_plan(points: list[RunPoint], plan_dir: Path) -> None:
    plan_dir.mkdir(parents=True, exist_ok=True)
    for old in plan_dir.glob("*.args"):
        old.unlink()
    for i, p in enumerate(points):
        if any("\n" in f for f in p.flags):
            raise ValueError(f"a flag of {p.label} holds a newline: {p.flags}")
        (plan_dir / f"{i}.args").write_text("\n".join([str(p.run_dir), *p.flags]) + "\n")


def submit(points: list[RunPoint], plan_dir: Path, sbatch_script: Path, sbatch_args: str, train_iters: int,
           keep_checkpoints: bool) -> int:
    """Run the points as one array, wait for it; returns how many finished."""
    write_plan(points, plan_dir)
    command = ["sbatch", "--wait", f"--array=0-{len(points) - 1}", f"--output={plan_dir}/%A_%a.out",
               *shlex.split(sbatch_args), str(sbatch_script)]
    env = dict(os.environ, ARRAY_PLAN_DIR=str(plan_dir), CONFIG="", NEON_DIR=os.environ.get("NEON_DIR", str(REPO)))
    print(f"[ablate] sbatch: {' '.join(command)}", flush=True)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    job = result.stdout.strip().split()[-1] if result.stdout.strip() else "?"
    if result.returncode != 0 and not result.stdout.strip():
        reason = f"sbatch failed ({result.returncode}): {result.stderr.strip()[-500:]}"
        for p in points:
            runs.record_failure(p, result.returncode, reason, None)
        return 0
    finished = 0
    for i, p in enumerate(points):
        if runs.finish(p, train_iters, keep_checkpoints):
            finished += 1
        else:
            log = plan_dir / f"{job}_{i}.out"
            runs.record_failure(p, None, f"Slurm array task {job}_{i} ended without the final validation record",
                                log if log.is_file() else None)
    return finished
