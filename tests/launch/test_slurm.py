"""The sbatch scripts of examples/slurm/ on a real Slurm cluster started on this machine.

tools/slurm_local/ installs Slurm from Debian's packages and starts slurmctld + two slurmd
"nodes" (n1, n2) on loopback; the real sbatch script is submitted with `sbatch --wait` on tiny
CPU settings, with pretrain_neon.py's default DataLoader workers (which the job's SIGTERM
reaches too):
- the dense script, 2 nodes x 2 processes (TP=2 x DP=2), is sent SIGUSR1 mid-run (what
  `#SBATCH --signal=B:USR1@T` does before the time limit): it saves, requeues itself, resumes
  from its checkpoint and runs to the end with the loss falling;
- the FlamingMoE script runs EP=2 x DP=2 over the two nodes;
- failures end the job (one rank per node): a save disk (a tmpfs) that fills at the second save,
  and a rank SIGKILLed mid-run, each end the job with a named error within their bound and leave
  no process; the same job submitted again resumes to the first run's losses bit for bit.
The cluster is stopped when this module's tests end, pass or fail. Skipped only when Slurm is
missing and cannot be installed (not root, or no apt-get).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.launch import training
from tests.neon.training.runs import latest, leftovers

ROOT = Path(__file__).resolve().parents[2]
SLURM_LOCAL = ROOT / "tools" / "slurm_local"
DENSE = ROOT / "examples" / "slurm" / "pretrain_dense.sbatch"
MOE = ROOT / "examples" / "slurm" / "pretrain_flaming_moe.sbatch"

pytestmark = pytest.mark.slow


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_block(n: int) -> int:
    """The first of n consecutive free ports (slurmctld and one per slurmd)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65000 and all(_port_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no block of free ports found")


def _logs(state: Path) -> str:
    out = []
    for f in sorted((state / "log").glob("*.log")):
        out.append(f"--- {f.name} (last lines)\n" + "\n".join(f.read_text(errors="replace").splitlines()[-30:]))
    return "\n".join(out)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running two-node Slurm cluster: yields the environment to run sbatch & co. with.
    Module-scoped: the daemons stop as soon as this module's tests are done, pass or fail."""
    r = subprocess.run(["bash", str(SLURM_LOCAL / "install.sh")], capture_output=True, text=True, timeout=900)
    if r.returncode in (10, 11):
        pytest.skip(f"Slurm is not installed and cannot be installed here: {r.stderr.strip()}")
    assert r.returncode == 0, f"installing Slurm failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"

    state = tmp_path_factory.mktemp("slurm")
    base = _free_port_block(3)
    env = dict(os.environ, SLURM_LOCAL_CTLD_PORT=str(base), SLURM_LOCAL_NODE_PORT=str(base + 1),
               SLURM_CONF=str(state / "slurm.conf"),
               # torchrun and python of this test run, on every "node"
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    try:
        r = subprocess.run(["bash", str(SLURM_LOCAL / "start.sh"), str(state)], env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, f"start.sh failed:\n{r.stdout}\n{r.stderr}\n{_logs(state)}"
        env["SLURM_STATE"] = str(state)
        yield env
    finally:
        r = subprocess.run(["bash", str(SLURM_LOCAL / "stop.sh"), str(state)], env=env, capture_output=True,
                           text=True, timeout=240)
        assert r.returncode == 0, f"stop.sh failed:\n{r.stdout}\n{r.stderr}"
        assert not (state / "slurmctld.pid").exists()


def _submit(slurm_env: dict, run_dir: Path, name: str, knobs: dict, script: Path = DENSE) -> subprocess.Popen:
    """`sbatch --wait` of a real sbatch script with CPU settings on both nodes."""
    run_dir.mkdir(parents=True, exist_ok=True)
    # launch.sh's default rendezvous port is 15000 + job id; another local test cluster on this
    # machine numbers its jobs from 1 too, so each job gets a port that is free now.
    env = dict(slurm_env, NEON_DEVICE="cpu", CPU_PROCS_PER_NODE="2", RUN_DIR=str(run_dir),
               MASTER_PORT=str(_free_port_block(1)))
    env.update(knobs)
    cmd = ["sbatch", "--wait", "--nodes=2", "--gpus-per-node=0", "--time=20", f"--job-name={name}",
           f"--output={run_dir}/slurm-%j.out", str(script)]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, slurm_env: dict, run_dir: Path, name: str, timeout: float) -> tuple[int, str]:
    """Wait for sbatch --wait; on timeout cancel the job and fail with its log."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", f"--name={name}"], env=slurm_env, timeout=30)
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"job {name} did not finish within {timeout}s\n{out}\n{_job_log(run_dir)}\n"
                    f"{_logs(Path(slurm_env['SLURM_STATE']))}")
    return proc.returncode, out + _job_log(run_dir)


def _job_log(run_dir: Path) -> str:
    return "\n".join(f.read_text(errors="replace") for f in sorted(run_dir.glob("slurm-*.out")))


def _job_state(slurm_env: dict, name: str) -> str:
    r = subprocess.run(["squeue", "-h", f"--name={name}", "-o", "%T"], env=slurm_env, capture_output=True,
                       text=True, timeout=30)
    return r.stdout.strip()


def _train_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("kind") == "train"]


def _default_data_workers(knobs: dict) -> dict:
    """The run's YAML without data.num_workers: pretrain_neon.py's default DataLoader worker per
    rank, which the job's SIGTERM (scancel --signal=TERM) reaches as well."""
    config = Path(knobs["CONFIG"])
    values = yaml.safe_load(config.read_text())
    values["data"].pop("num_workers")
    config.write_text(yaml.safe_dump(values))
    return knobs


def test_dense_sbatch_trains_on_two_nodes_and_requeues_on_sigusr1(slurm, launch_corpus, tmp_path):
    """TP=2 x DP=2 over two nodes, default DataLoader workers: SIGUSR1 mid-run saves, requeues and
    resumes; the job then runs to the end with the loss falling."""
    run_dir = tmp_path / "run"
    name = "neon-test-requeue"
    knobs = _default_data_workers(training.knobs(tmp_path, launch_corpus, train_iters=training.RESUME_ITERS))
    proc = _submit(slurm, run_dir, name, knobs)
    deadline = time.monotonic() + training.JOB_TIMEOUT
    while len(_train_records(run_dir)) < training.SIGNAL_AFTER:
        if proc.poll() is not None or time.monotonic() > deadline:
            subprocess.run(["scancel", f"--name={name}"], env=slurm, timeout=30)
            pytest.fail(f"job ended or stalled before iteration {training.SIGNAL_AFTER}:\n{_job_log(run_dir)}")
        time.sleep(0.5)
    # What `#SBATCH --signal=B:USR1@T` sends T seconds before the time limit.
    subprocess.run(["scancel", "--batch", "--signal=USR1", f"--name={name}"], env=slurm, check=True, timeout=30)

    # The first run's records: those written before the job left RUNNING (it saves, then requeues).
    while _job_state(slurm, name) == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
    first = [r["iteration"] for r in _train_records(run_dir)]

    rc, log = _finish(proc, slurm, run_dir, name, timeout=training.JOB_TIMEOUT + 60)
    assert rc == 0, log
    assert "requeueing job" in log and " run 1: 2 nodes x 2 processes" in log, log
    assert "DataLoader worker" not in log, log
    iterations = [r["iteration"] for r in _train_records(run_dir)]
    # The first run stopped at some step s after the signal and saved it; the requeued run went on
    # from s + 1 to the end.
    stopped_at = first[-1] if first else 0
    assert training.SIGNAL_AFTER <= stopped_at < training.RESUME_ITERS, (first, log)
    assert first == list(range(1, stopped_at + 1)), (first, log)
    assert iterations[len(first):] == list(range(stopped_at + 1, training.RESUME_ITERS + 1)), (iterations, log)

    assert "2 nodes x 2 processes (cpu)" in log, log
    # one torchrun per node: each wrote its two ranks' logs
    rank_logs = list((run_dir / "logs").glob("job*-run0/*/attempt_0/*/stdout.log"))
    assert len(rank_logs) == 4, (rank_logs, log)
    records = _train_records(run_dir)
    training.check_run(run_dir, records, tensor_parallel=2, world_size=4)
    losses = [r["loss"] for r in records]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - training.LOSS_DROP, losses


def test_flaming_moe_sbatch_runs_expert_parallel_over_two_nodes(slurm, launch_corpus, tmp_path):
    """The FlamingMoE script: CP=2 x DP=2 over the two nodes (each sequence split over the two ranks
    of a node), the function banks sharded over EP=2, both banks on, a short run."""
    run_dir = tmp_path / "run"
    name = "neon-test-moe"
    knobs = training.knobs(tmp_path, launch_corpus, train_iters=training.ITERS)
    knobs.update(TP="1", EP="2", CP="2", FLAMING_MOE="between", GLOBAL_FUNCTIONS="4", LAYER_FUNCTIONS="4",
                 ROUTER="topk", TOPK="1")
    rc, log = _finish(_submit(slurm, run_dir, name, knobs, script=MOE), slurm, run_dir, name,
                      timeout=training.JOB_TIMEOUT)
    assert rc == 0, log
    assert "2 nodes x 2 processes (cpu)" in log, log
    assert [r["iteration"] for r in _train_records(run_dir)] == list(range(1, training.ITERS + 1)), log
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["parallelism"]["expert_model_parallel_size"] == 2, config["parallelism"]
    assert config["parallelism"]["context_parallel_size"] == 2, config["parallelism"]
    assert "data-parallel size: 2, context-parallel size: 2" in log, log
    model = config["model"]
    assert (model["flaming_moe"], model["flaming_global_functions"], model["flaming_layer_functions"]) == (
        "between", 4, 4), model


# --- a failure ends the job: a full disk, a lost rank ---------------------------------------------

FAULT_ITERS = 6  # a checkpoint every 2 steps: the first at 2, the second at 4


def _fault_knobs(tmp_path: Path, launch_corpus) -> dict:
    """One rank per node (DP=2 over the two nodes), default DataLoader workers, a checkpoint every
    2 steps."""
    knobs = _default_data_workers(training.knobs(tmp_path, launch_corpus, train_iters=FAULT_ITERS))
    knobs.update(CPU_PROCS_PER_NODE="1", TP="1", SAVE_INTERVAL="2")
    return knobs


def _wait_until(predicate, proc: subprocess.Popen, slurm_env: dict, run_dir: Path, name: str, what: str) -> None:
    deadline = time.monotonic() + training.JOB_TIMEOUT
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            subprocess.run(["scancel", f"--name={name}"], env=slurm_env, timeout=30)
            pytest.fail(f"job ended or stalled before {what}:\n{_job_log(run_dir)}")
        time.sleep(0.1)


def _resumes_exactly(slurm_env: dict, run_dir: Path, name: str, knobs: dict, uninterrupted: dict[int, float]) -> None:
    """The same job submitted again resumes from the latest checkpoint; the iterations the first
    run also trained after that checkpoint have its losses bit for bit."""
    resumed_from = latest(run_dir / "checkpoints")
    before = len(_train_records(run_dir))
    rc, log = _finish(_submit(slurm_env, run_dir, name, knobs), slurm_env, run_dir, name, timeout=training.JOB_TIMEOUT)
    assert rc == 0, log
    resumed = {r["iteration"]: r["loss"] for r in _train_records(run_dir)[before:]}
    assert sorted(resumed) == list(range(resumed_from + 1, FAULT_ITERS + 1)), (resumed, log)
    overlap = sorted(set(resumed) & set(uninterrupted))
    assert overlap, (resumed, uninterrupted)
    assert [resumed[i] for i in overlap] == [uninterrupted[i] for i in overlap]


@pytest.fixture
def checkpoint_tmpfs(tmp_path):
    """RUN_DIR/checkpoints on a tmpfs (roomy until a test shrinks it); lazily unmounted after."""
    mount = tmp_path / "run" / "checkpoints"
    mount.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_disk_ends_the_sbatch_job_and_the_intact_checkpoint_resumes(slurm, launch_corpus, checkpoint_tmpfs,
                                                                          tmp_path):
    """The disk fills at the second save: the job exits non-zero within 60 s with the named
    error, no process is left, and the intact checkpoint resumes on a roomy disk exactly."""
    run_dir, name, checkpoints = tmp_path / "run", "neon-test-disk-full", checkpoint_tmpfs
    gate = tmp_path / "disk-shrunk"
    knobs = _fault_knobs(tmp_path, launch_corpus)
    proc = _submit(slurm, run_dir, name, dict(knobs, TRAIN_SCRIPT="tests/faults.py",
                                              NEON_TEST_HOLD_SAVE_AT=f"4:{gate}"))
    _wait_until(lambda: latest(checkpoints) == 2, proc, slurm, run_dir, name, "the first checkpoint")
    # The save of iteration 4 waits for the gate: shrink the disk to hold half a checkpoint more.
    one = sum(f.stat().st_size for f in (checkpoints / "iter_0000002").rglob("*") if f.is_file())
    size = shutil.disk_usage(checkpoints).used + one // 2
    subprocess.run(["mount", "-o", f"remount,size={size}", str(checkpoints)], check=True, timeout=30)
    gate.touch()
    rc, log = _finish(proc, slurm, run_dir, name, timeout=60)
    assert rc != 0 and "exitcode  : 7" in log, log[-4000:]
    for words in ("the disk is full", "bytes free", f"{checkpoints}/iter_0000002, is intact", "--ckpt-keep-last"):
        assert words in log, (words, log[-4000:])
    for rank in range(2):  # each rank names the fault, none asks for a bug report
        assert f"rank {rank}: saving iteration 4 to {checkpoints} failed: the disk is full" in log, (rank, log[-4000:])
    assert "unexpected error" not in log, log[-4000:]
    assert not leftovers(tmp_path), leftovers(tmp_path)
    assert latest(checkpoints) == 2 and not list(checkpoints.glob(".tmp_iter_*"))  # the partial directory removed

    uninterrupted = {r["iteration"]: r["loss"] for r in _train_records(run_dir)}
    assert sorted(uninterrupted) == [1, 2, 3, 4], (uninterrupted, log[-4000:])
    kept = tmp_path / "kept"
    shutil.copytree(checkpoints, kept)
    subprocess.run(["umount", str(checkpoints)], check=True, timeout=30)  # the roomy disk under it
    shutil.copytree(kept, checkpoints, dirs_exist_ok=True)
    _resumes_exactly(slurm, run_dir, name, knobs, uninterrupted)


def _rank_process(run_dir: Path, rank: int) -> psutil.Process:
    """The job's training process of `rank` (a child of torchrun; its DataLoader workers share
    its environment but are its children)."""
    for p in psutil.process_iter():
        try:
            env = p.environ()
            if (env.get("RUN_DIR"), env.get("RANK")) == (str(run_dir), str(rank)) and \
                    "torchrun" in " ".join(p.parent().cmdline()):
                return p
        except psutil.Error:
            continue
    raise AssertionError(f"no rank {rank} process of {run_dir}")


def test_killed_rank_ends_the_sbatch_job_and_it_resumes_exactly(slurm, launch_corpus, tmp_path):
    """Rank 1 SIGKILLed mid-run (a lost node): the job ends within 120 s, no process is left, and
    the same job submitted again resumes exactly."""
    run_dir, name = tmp_path / "run", "neon-test-killed-rank"
    knobs = _fault_knobs(tmp_path, launch_corpus)
    proc = _submit(slurm, run_dir, name, knobs)
    _wait_until(lambda: latest(run_dir / "checkpoints") == 2 and len(_train_records(run_dir)) >= 3, proc, slurm,
                run_dir, name, "iteration 3")
    _rank_process(run_dir, 1).kill()
    rc, log = _finish(proc, slurm, run_dir, name, timeout=120)
    assert rc != 0, log[-4000:]
    assert "a rank was lost" in log and "unexpected error" not in log, log[-4000:]
    assert not leftovers(tmp_path), leftovers(tmp_path)
    uninterrupted = {r["iteration"]: r["loss"] for r in _train_records(run_dir)}
    _resumes_exactly(slurm, run_dir, name, knobs, uninterrupted)
