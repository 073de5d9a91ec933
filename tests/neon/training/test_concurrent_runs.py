"""Real runs of `python pretrain_neon.py` (single process, no torchrun) side by side.

A second run on the same --save stops with exit status 5 and a message naming the owner,
instead of mixing the two runs' checkpoints and metrics; getting that far also shows that two
single-process runs on one machine no longer collide on a rendezvous port. A run killed with
SIGKILL leaves its lock file behind, and the next run takes it over and resumes; Ctrl-C
(SIGINT) stops that run with status 130 and names the checkpoint to resume from. A MASTER_PORT
fixed to a port in use stops with status 6 and names it.
"""

import json
import re
import signal
import socket

import pytest

from neon.training.run_lock import LOCK_FILE
from tests.neon.training.runs import kill_all, latest, launch, start, tiny_args, wait_for

pytestmark = pytest.mark.slow


def test_second_run_on_a_directory_is_refused_and_a_killed_runs_lock_is_not(corpus, tmp_path):
    save = tmp_path / "run"
    args = tiny_args(*corpus, num_layers=2, eval_iters=0, train_iters=4000, save=save, load=save, save_interval=2)
    first = start(args, nproc=0, log=tmp_path / "first.log")
    try:
        wait_for(lambda: latest(save) is not None, first, 240, "the first run's first checkpoint")
        second = launch(args, nproc=0, timeout=120)
        assert first.poll() is None, "the second run disturbed the first"
    finally:
        kill_all(first)  # SIGKILL: no clean-up, the lock file stays
    owner = json.loads((save / LOCK_FILE).read_text())
    assert second.returncode == 5, second.stdout + second.stderr
    assert (f"pretrain_neon.py: error: {save} is in use by pid {owner['pid']} on {socket.gethostname()} (started "
            in second.stderr), second.stderr
    assert "Traceback" not in second.stderr and "EADDRINUSE" not in second.stderr, second.stderr
    stopped = latest(save)

    # The killed run's lock does not block: the next run resumes from its checkpoint.
    third = start(args, nproc=0, log=tmp_path / "third.log")
    try:
        third_log = tmp_path / "third.log"  # (metrics.jsonl already holds the killed run's later steps)
        step = re.compile(r" iteration +\d+/")  # a step's line, not "loaded checkpoint ... at iteration N"
        wait_for(lambda: step.search(third_log.read_text()), third, 240, "the resumed run's first step")
        third.send_signal(signal.SIGINT)
        assert third.wait(timeout=60) == 130
    finally:
        kill_all(third)
    log = (tmp_path / "third.log").read_text()
    assert f"loaded checkpoint {save}/iter_{stopped:07d} at iteration {stopped}" in log, log[-3000:]
    assert f"pretrain_neon.py: interrupted (SIGINT) before saving; the latest checkpoint, {save}/iter_" in log, \
        log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def test_a_fixed_master_port_in_use_is_named(corpus, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = launch(tiny_args(*corpus, train_iters=2, save=tmp_path / "run"), nproc=0, timeout=120,
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert result.returncode == 6, result.stdout + result.stderr
    assert (f"pretrain_neon.py: error: MASTER_PORT={port} on 127.0.0.1 is already in use (another run or program "
            f"listens there)") in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
