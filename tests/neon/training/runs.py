"""Launch pretrain_neon.py under torchrun (real processes, gloo) with a timeout, and read back
what a run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[3]
PRETRAIN = REPO / "pretrain_neon.py"
FAULTS = "tests.faults"  # a module: pretrain_neon.py with the test-only faults its environment arms


def tiny_args(tokenizer: str, data: str, **overrides) -> list[str]:
    """A 4-layer, 64-wide Neon model on the test corpus; keyword overrides use flag names with _."""
    values = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                  max_position_embeddings=64, seq_length=32, micro_batch_size=2, global_batch_size=8,
                  train_iters=8, lr=3e-3, min_lr=3e-4, lr_warmup_iters=1, eval_interval=4, eval_iters=2,
                  log_interval=1, split="90,10,0", num_workers=0, seed=7)
    values.update(overrides)
    return ["--data-path", data, "--tokenizer-model", tokenizer, *as_flags(values)]


def as_flags(values: dict) -> list[str]:
    """{"train_iters": 8, "bf16": True, "sequence_parallel": False} -> pretrain_neon.py flags."""
    args = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False and not key.startswith("no_"):  # no_* settings are off unless given
            args.append("--no-" + key.replace("_", "-"))
        elif value is not None:
            args += [flag, str(value)]
    return args


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", WANDB_MODE="offline")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def command(args: list[str], nproc: int, script: Path | str = PRETRAIN) -> list[str]:
    """torchrun with nproc processes; nproc=0: one process started with plain python (no torchrun).
    script: pretrain_neon.py, or a module run with -m from the repository root (FAULTS: a run
    with test-only faults; a test module that registers a feature first)."""
    target = [str(script)] if isinstance(script, Path) else ["-m", script]
    if nproc == 0:
        return [sys.executable, *target, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", *target, *args]


def launch(args: list[str], nproc: int = 1, timeout: float = 150, script: Path | str = PRETRAIN,
           **env) -> subprocess.CompletedProcess:
    return subprocess.run(command(args, nproc, script), cwd=REPO, env={**_env(), **env}, capture_output=True,
                          text=True, timeout=timeout)


def start(args: list[str], nproc: int = 1, log: Path | None = None, script: Path | str = PRETRAIN,
          **env) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(command(args, nproc, script), cwd=REPO, env={**_env(), **env}, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every worker (torchrun starts workers in their own sessions). The family
    is stopped (SIGSTOP) first, listing it again until no new process appears: a process forked
    between a listing and the kill (a checkpoint writer's) would be orphaned and missed."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
    except psutil.NoSuchProcess:
        return
    family: dict[int, psutil.Process] = {}
    while True:
        try:
            new = [p for p in (root, *root.children(recursive=True)) if p.pid not in family]
        except psutil.NoSuchProcess:
            new = []
        if not new:
            break
        for p in new:
            family[p.pid] = p
            try:
                p.suspend()
            except psutil.NoSuchProcess:
                pass
    for p in family.values():
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (exit {proc.returncode}) before {what}")
        time.sleep(poll)
    kill_all(proc)
    raise AssertionError(f"timed out waiting for {what}")


def metrics(run_dir: Path, kind: str = "train") -> dict[int, dict]:
    """iteration -> the last record of that kind (a resumed run appends to the same file)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if record["kind"] == kind:
            out[record["iteration"]] = record
    return out


def latest(save_dir: Path) -> int | None:
    marker = Path(save_dir) / "latest_checkpointed_iteration.txt"
    return int(marker.read_text()) if marker.is_file() else None


def check(result: subprocess.CompletedProcess, code: int = 0) -> str:
    text = result.stdout + result.stderr
    if result.returncode != code:
        worker = [line for line in text.splitlines() if line.startswith("[rank") and "^^^" not in line]
        shown = "\n".join(worker[-40:]) if worker else text[-6000:]
        raise AssertionError(f"exit {result.returncode} (expected {code}):\n{shown}")
    return text


def leftovers(marker: Path, grace: float = 10.0) -> list[str]:
    """Processes whose command line names `marker` (the run's workers, DataLoader workers,
    writers), after waiting up to `grace` seconds for them to go."""
    deadline = time.monotonic() + grace
    while True:
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if str(marker) in " ".join(p.info["cmdline"] or []):
                    found.append(f"{p.info['pid']}: {' '.join(p.info['cmdline'])[:160]}")
            except psutil.Error:
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)
