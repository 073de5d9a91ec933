"""One run of the ablation: a (variant, lr, seed) point, its directory and its state.

    WORK/runs/<variant>/lr<lr>-seed<seed>/
        point.json     the pretrain_neon.py flags of the run (a rerun with other flags is refused)
        metrics.jsonl  pretrain_neon.py's records; the run is finished when it holds the
                       validation record of the last iteration
        train.log      torchrun's output (local runs)
        FAILED.json    written when the run ended without that record (exit status, log tail);
                       a failed run is not retried unless --retry-failed
        checkpoints/   --save/--load of the run, so an interrupted run resumes; removed once the
                       run finished unless --keep-checkpoints
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from neon.ablation.variants import AblationError

REPO = Path(__file__).resolve().parents[2]
FAILED = "FAILED.json"
ERROR_LINE = re.compile(r"^(pretrain_neon\.py: error: |[\w.]*(Error|Exception): )")
ATTEMPT = "# ablate.py attempt "  # heads each local attempt's output in train.log


@dataclass
class RunPoint:
    variant: str
    lr: float
    seed: int
    run_dir: Path
    flags: list[str]  # every pretrain_neon.py flag of this run

    @property
    def label(self) -> str:
        return f"{self.variant} lr={self.lr:g} seed={self.seed}"


def make_point(work: Path, variant: str, config: Path, lr: float, seed: int, min_lr_ratio: float,
               common: list[str]) -> RunPoint:
    run_dir = work / "runs" / variant / f"lr{lr:g}-seed{seed}"
    flags = ["--config", str(config), "--lr", f"{lr:g}", "--min-lr", f"{lr * min_lr_ratio:.6g}",
             "--seed", str(seed), *common,
             "--run-dir", str(run_dir), "--save", str(run_dir / "checkpoints"), "--load", str(run_dir / "checkpoints")]
    return RunPoint(variant, lr, seed, run_dir, flags)


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return records


def validation_curve(run_dir: Path) -> dict[int, dict]:
    """Validation records by iteration (a resumed run's later record wins)."""
    return {r["iteration"]: r for r in read_records(run_dir) if r.get("kind") == "valid"}


def final_loss(run_dir: Path, train_iters: int) -> float | None:
    record = validation_curve(run_dir).get(train_iters)
    return None if record is None else float(record["loss"])


def state(point: RunPoint, train_iters: int) -> str:
    """'finished', 'failed' or 'pending'; refuses a directory made with other flags."""
    marker = point.run_dir / "point.json"
    if marker.is_file():
        stored = json.loads(marker.read_text()).get("flags")
        if stored != point.flags:
            raise AblationError(
                f"{point.run_dir} holds a run made with other settings ({' '.join(stored or [])}) than this "
                f"command's ({' '.join(point.flags)}). Fix: use another --work-dir, or delete that directory.")
    if final_loss(point.run_dir, train_iters) is not None:
        return "finished"
    return "failed" if (point.run_dir / FAILED).is_file() else "pending"


def prepare(point: RunPoint) -> None:
    point.run_dir.mkdir(parents=True, exist_ok=True)
    (point.run_dir / "point.json").write_text(json.dumps({"variant": point.variant, "lr": point.lr, "seed": point.seed,
                                                           "flags": point.flags}, indent=1))


def first_error(lines: list[str]) -> str | None:
    """The first error line of a worker (its exception or pretrain_neon.py's message), not torchrun's."""
    for line in lines:
        text = re.sub(r"^\[rank\d+\]:\s*", "", line.strip())
        if ERROR_LINE.match(text) and "ChildFailedError" not in text:
            return text[:400]
    return None


def record_failure(point: RunPoint, returncode: int | None, reason: str, log: Path | None) -> None:
    lines = log.read_text(errors="replace").splitlines() if log and log.is_file() else []
    starts = [i for i, line in enumerate(lines) if line.startswith(ATTEMPT)]
    lines = lines[starts[-1]:] if starts else lines  # this attempt's output only
    error = first_error(lines)
    reason = f"{reason}: {error}" if error else reason
    tail = lines[-15:]
    (point.run_dir / FAILED).write_text(json.dumps({"returncode": returncode, "reason": reason,
                                                     "log": str(log) if log else None, "log_tail": tail}, indent=1))


def failure(point: RunPoint) -> dict:
    path = point.run_dir / FAILED
    return json.loads(path.read_text()) if path.is_file() else {}


def finish(point: RunPoint, train_iters: int, keep_checkpoints: bool) -> bool:
    """After the run's process ended: True if finished (checkpoints dropped unless kept)."""
    if final_loss(point.run_dir, train_iters) is None:
        return False
    if not keep_checkpoints:
        shutil.rmtree(point.run_dir / "checkpoints", ignore_errors=True)
    return True


def run_local(point: RunPoint, train_iters: int, nproc: int, timeout_s: float, keep_checkpoints: bool) -> bool:
    """Train one point with torchrun on this machine; True when it finished."""
    log = point.run_dir / "train.log"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(REPO / "pretrain_neon.py"), *point.flags]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", "1")
    with open(log, "a") as out:
        out.write(f"\n{ATTEMPT}{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(command)}\n")
        out.flush()
        # its own process group, so that a timeout ends torchrun's workers too
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            rc = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            record_failure(point, None, f"did not finish within --run-timeout {timeout_s:g} s", log)
            return False
        except BaseException:  # Ctrl-C: stop the run (its checkpoint stays for the next invocation)
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
            raise
    if finish(point, train_iters, keep_checkpoints):
        return True
    reason = f"pretrain_neon.py exited with status {rc}" if rc else "ended without the final validation record"
    record_failure(point, rc, reason, log)
    return False
