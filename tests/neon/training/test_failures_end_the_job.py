"""A failure ends the job, it never hangs it (pretrain_neon.py under torchrun, default DataLoader
workers, real processes): a disk that fills at the second save, a rank SIGKILLed mid-run, a rank
that raises, a rank that stops answering, a DataLoader worker that dies, a store that vanishes, a
callable past its time limit. Each ends within its bound with a named error, leaves no process
behind (every process whose command line names the test's directory is gone), and loses nothing:
the intact checkpoint resumes to the uninterrupted run's losses bit for bit.

Asynchronous saves (--async-save): the same checkpoint bytes as a synchronous save; a SIGKILL
while one is being written leaves the previous checkpoint the latest; a failed one stops the run
at the next step, or with --save-failure continue is reported and the run goes on."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.neon.training.corpus import make_corpus
from tests.neon.training.runs import (
    FAULTS,
    check,
    kill_all,
    latest,
    launch,
    leftovers,
    metrics,
    start,
    tiny_args,
    wait_for,
)

pytestmark = pytest.mark.slow
N = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def args(corpus, save: Path, **kw) -> list[str]:
    """The tiny model, default DataLoader workers (num_workers unset), a checkpoint every 2 steps."""
    values = dict(train_iters=N, eval_interval=N, save=save, save_interval=2, num_workers=None)
    values.update(kw)
    return tiny_args(*corpus, **values)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The uninterrupted runs: one process and two (data parallel), every checkpoint kept."""
    out = {}
    for nproc in (1, 2):
        save = tmp_path_factory.mktemp(f"reference{nproc}")
        check(launch(args(corpus, save, ckpt_keep_last=0), nproc=nproc, timeout=300))
        out[nproc] = save
    return out


def ended(proc: subprocess.Popen, log: Path, bound: float) -> tuple[str, float]:
    """Wait for the job (at most `bound` seconds, then kill it and fail); (its log, seconds)."""
    t0 = time.monotonic()
    try:
        proc.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        kill_all(proc)
        raise AssertionError(f"the job did not end within {bound} s:\n{log.read_text()[-4000:]}") from None
    return log.read_text(), time.monotonic() - t0


def resumes_exactly(corpus, checkpoint: Path, reference: Path, work: Path, nproc: int) -> None:
    """The checkpoint, copied to a roomy disk, resumes to the reference run's losses bit for bit."""
    roomy = work / "roomy"
    roomy.mkdir()
    shutil.copytree(checkpoint, roomy / checkpoint.name)
    (roomy / "latest_checkpointed_iteration.txt").write_text(str(int(checkpoint.name[5:])))
    check(launch(args(corpus, roomy, load=roomy), nproc=nproc, timeout=300))
    got, want = metrics(roomy), metrics(reference)
    done = int(checkpoint.name[5:])
    assert sorted(got) == list(range(done + 1, N + 1)), sorted(got)
    assert [got[i]["loss"] for i in got] == [want[i]["loss"] for i in got]


# --- a full disk ------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path, reference):
    """A tmpfs that holds the run's files and one checkpoint but not two."""
    one = sum(f.stat().st_size for f in (reference[1] / "iter_0000002").rglob("*") if f.is_file())
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(1.5 * one) + (256 << 10)}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_disk_at_the_second_save_ends_the_job_and_the_intact_checkpoint_resumes(corpus, reference, small_disk,
                                                                                       tmp_path):
    save = small_disk / "ckpt"
    log = tmp_path / "full.log"
    proc = start(args(corpus, save), nproc=1, log=log)
    tmp4 = save / ".tmp_iter_0000004"
    wait_for(lambda: tmp4.exists(), proc, 200, "the second save")
    text, seconds = ended(proc, log, 60)
    assert proc.returncode != 0 and "exitcode  : 7" in text, text[-3000:]
    for words in ("saving iteration 4 to", "the disk is full", "bytes free", f"{save}/iter_0000002, is intact",
                  "--ckpt-keep-last", "--save"):
        assert words in text, (words, text[-3000:])
    assert "Traceback" not in text.split("pretrain_neon.py: error:")[0][-2000:]  # the named error, no bug report
    assert not leftovers(tmp_path), leftovers(tmp_path)
    assert latest(save) == 2 and not list(save.glob(".tmp_iter_*"))  # the partial directory removed
    resumes_exactly(corpus, save / "iter_0000002", reference[1], tmp_path, nproc=1)


def test_failed_async_save_stops_at_the_next_step_or_goes_on(corpus, reference, small_disk, tmp_path):
    save = small_disk / "ckpt"
    text = check(launch([*args(corpus, save), "--async-save"], nproc=1, timeout=300), code=1)
    assert "exitcode  : 7" in text and "the disk is full" in text, text[-3000:]
    assert latest(save) == 2 and not list(save.glob(".tmp_iter_*"))
    shutil.rmtree(save)
    text = check(launch([*args(corpus, save), "--async-save", "--save-failure", "continue"], nproc=1, timeout=300))
    assert "Training goes on (--save-failure continue)" in text and f" done: finished at iteration {N}" in text
    assert sorted(metrics(save)) == list(range(1, N + 1)) and latest(save) == 2


# --- ranks: killed, raising, silent ---------------------------------------------------------------


def rank_process(proc: subprocess.Popen, rank: int) -> psutil.Process:
    """torchrun's worker of `rank` (its own children, DataLoader workers, share its environment)."""
    for p in psutil.Process(proc.pid).children():
        try:
            if p.environ().get("RANK") == str(rank):
                return p
        except psutil.Error:
            continue
    raise AssertionError(f"no rank {rank} process")


def test_a_killed_rank_ends_the_job_and_it_resumes_exactly(corpus, reference, tmp_path):
    save, log = tmp_path / "ckpt", tmp_path / "killed.log"
    proc = start(args(corpus, save), nproc=2, log=log)
    wait_for(lambda: latest(save) == 2 and max(metrics(save), default=0) >= 3, proc, 200, "iteration 3")
    rank_process(proc, 1).kill()
    text, _ = ended(proc, log, 120)
    lost = "rank 0: a rank was lost" in text or "rank 0: another rank failed" in text
    assert proc.returncode != 0 and lost, text[-3000:]
    assert not leftovers(tmp_path), leftovers(tmp_path)
    resumes_exactly(corpus, save / f"iter_{latest(save):07d}", reference[2], tmp_path, nproc=2)


def test_a_rank_that_raises_ends_the_job_naming_it(corpus, tmp_path):
    save, log = tmp_path / "ckpt", tmp_path / "raises.log"
    proc = start(args(corpus, save), nproc=2, log=log, script=FAULTS, NEON_TEST_RAISE_AT="3:1")
    text, seconds = ended(proc, log, 90)
    assert "rank 1: the run stopped on an unexpected error (RuntimeError: injected fault on rank 1" in text, \
        text[-3000:]
    assert "rank 0: another rank failed (rank 1 stopped on RuntimeError: injected fault on rank 1" in text, \
        text[-3000:]
    assert not leftovers(tmp_path), leftovers(tmp_path)
    assert latest(save) == 2


def test_a_rank_that_stops_answering_ends_the_job_at_the_collective_timeout(corpus, tmp_path):
    save, log = tmp_path / "ckpt", tmp_path / "hangs.log"
    proc = start(args(corpus, save, distributed_timeout_minutes=0.1), nproc=2, log=log, script=FAULTS,
                 NEON_TEST_HANG_AT="3:1")
    wait_for(lambda: max(metrics(save), default=0) >= 2, proc, 200, "iteration 2")
    # the timeout (6 s), then torchrun's stop of the silent rank (SIGTERM, SIGKILL after 30 s), and a margin
    text, seconds = ended(proc, log, 6 + 30 + 30)
    assert "rank 0: a collective timed out after 0.1 minutes (--distributed-timeout-minutes)" in text, text[-3000:]
    assert "rank(s) [1] stopped answering (the last step they started: 2, the others' 3)" in text, text[-3000:]
    assert "exitcode  : 7" in text and not leftovers(tmp_path), leftovers(tmp_path)


# --- a DataLoader worker, a store, a callable -------------------------------------------------------


def test_a_dead_dataloader_worker_ends_the_job(corpus, tmp_path):
    save, log = tmp_path / "ckpt", tmp_path / "worker.log"
    proc = start(args(corpus, save, train_iters=40, eval_interval=40, save_interval=20), nproc=1, log=log)
    wait_for(lambda: max(metrics(save), default=0) >= 2, proc, 200, "iteration 2")
    trainer = rank_process(proc, 0)
    workers = trainer.children()
    assert workers, "no DataLoader worker: the test would prove nothing"
    for w in workers:
        w.kill()
    text, _ = ended(proc, log, 60)
    assert "exitcode  : 7" in text and "a DataLoader worker process died" in text, text[-3000:]
    assert not leftovers(tmp_path), leftovers(tmp_path)


def test_a_store_that_vanishes_ends_the_run_at_the_next_save(corpus, tmp_path):
    from tests.neon.test_flaming_moe_io_checkpoint import build_store

    store = build_store(tmp_path / "store", seed=0)
    save, log = tmp_path / "ckpt", tmp_path / "store.log"
    io = ["--flaming-moe", "between", "--flaming-layer-functions", "1", "--flaming-io-functions",
          f"name=facts,kind=store,source={store},topk=2"]
    proc = start([*args(corpus, save, train_iters=30, eval_interval=30, save_interval=10), *io], nproc=1, log=log)
    wait_for(lambda: max(metrics(save), default=0) >= 1, proc, 200, "iteration 1")
    shutil.rmtree(store)  # its memory map stays valid: the run goes on until it records the source
    text, _ = ended(proc, log, 120)
    assert "exitcode  : 7" in text and "IO function 'facts'" in text and "changed or vanished during the run" in text, \
        text[-3000:]
    assert latest(save) is None and not list(save.glob(".tmp_iter_*")) and not leftovers(tmp_path)


def test_a_callable_past_its_timeout_ends_the_run_naming_it(corpus, tmp_path):
    save, log = tmp_path / "ckpt", tmp_path / "slow.log"
    io = ["--flaming-moe", "between", "--flaming-layer-functions", "1", "--flaming-io-functions",
          "name=slow,kind=callable,source=tests.neon.io_callables:sleeps,width=2,timeout=0.5,retries=1"]
    proc = start([*args(corpus, save), *io], nproc=1, log=log)
    text, _ = ended(proc, log, 120)
    assert "exitcode  : 2" in text, text[-3000:]
    for words in ("training step 1", "IO function 'slow'", "timed out (after 2 attempts)", "timeout="):
        assert words in text, (words, text[-3000:])
    assert not leftovers(tmp_path), leftovers(tmp_path)


# --- asynchronous saves -------------------------------------------------------------------------------


def test_async_saves_write_the_sync_bytes(corpus, reference, tmp_path):
    """Every .distcp file byte for byte (every tensor and object, the RNG states included); the
    rest differs only in what names the save: torch DCP's .metadata records the directory and a
    fresh UUID per save (storage_meta) and lists the items in the order the writer processes
    finished, common.pt the run's config (--async-save itself, --save)."""
    import pickle

    import torch

    save = tmp_path / "async"
    text = check(launch([*args(corpus, save, ckpt_keep_last=0), "--async-save"], nproc=1, timeout=300))
    assert "(asynchronously: the training loop waited" in text and "committed" in text
    for it in (2, 4, 6):
        ours, theirs = save / f"iter_{it:07d}", reference[1] / f"iter_{it:07d}"
        names = sorted(p.name for p in ours.iterdir())
        assert names == sorted(p.name for p in theirs.iterdir())
        for name in (n for n in names if n.endswith(".distcp")):
            assert (ours / name).read_bytes() == (theirs / name).read_bytes(), (it, name)
        meta = [vars(pickle.loads((d / ".metadata").read_bytes())) for d in (ours, theirs)]
        for m in meta:
            m.pop("storage_meta")
        assert meta[0] == meta[1], it  # every item at the same file and offset, whatever the listing's order
        common = [torch.load(d / "common.pt", weights_only=False) for d in (ours, theirs)]
        for c in common:
            c["config"]["checkpointing"] = {k: v for k, v in c["config"]["checkpointing"].items()
                                            if k not in ("async_save", "save", "load")}
            c["config"].get("logging", {}).pop("run_dir", None)
        assert common[0] == common[1], it
    assert [r["loss"] for r in metrics(save).values()] == [r["loss"] for r in metrics(reference[1]).values()]


def test_sigkill_during_an_async_save_keeps_the_previous_checkpoint(corpus, reference, tmp_path):
    save, log = tmp_path / "ckpt", tmp_path / "inflight.log"
    proc = start([*args(corpus, save), "--async-save"], nproc=1, log=log, script=FAULTS, NEON_TEST_PAUSE_SAVE_AT="4")
    # training goes on while iteration 4's writer sleeps after writing its files
    wait_for(lambda: max(metrics(save), default=0) >= 5 and (save / ".tmp_iter_0000004").exists(), proc, 200,
             "iteration 5 with the save of 4 in flight")
    kill_all(proc)
    assert latest(save) == 2 and not (save / "iter_0000004").exists()
    assert not leftovers(tmp_path), leftovers(tmp_path)
    resumes_exactly(corpus, save / "iter_0000002", reference[1], tmp_path, nproc=1)


def test_a_second_sigterm_ends_a_blocked_run_at_once(corpus, tmp_path):
    """A rank blocked in a collective cannot act on SIGTERM (its Python handler waits for the C
    call): a second SIGTERM a few seconds later ends it anyway (exit 128 + 15), its DataLoader
    worker with it. (A signal delivered twice at once, as under Slurm, is one stop: the Slurm
    tests' requeue after SIGUSR1 saves.)"""
    save, log = tmp_path / "ckpt", tmp_path / "blocked.log"
    proc = start(args(corpus, save, train_iters=40, eval_interval=40), nproc=2, log=log, script=FAULTS,
                 NEON_TEST_HANG_AT="3:1")
    wait_for(lambda: max(metrics(save), default=0) >= 2, proc, 200, "iteration 2")
    time.sleep(2)  # rank 0 is now waiting in step 3's collectives
    rank0 = rank_process(proc, 0)
    rank0.send_signal(signal.SIGTERM)
    time.sleep(3)  # past the grace the first signal's handler had
    assert rank0.is_running(), "the first SIGTERM alone ended the blocked rank: nothing left to test"
    rank0.send_signal(signal.SIGTERM)
    rank0.wait(timeout=20)
    text, _ = ended(proc, log, 60)
    assert "a second stop signal (SIGTERM): stopping now" in text, text[-3000:]
    assert not leftovers(tmp_path), leftovers(tmp_path)
