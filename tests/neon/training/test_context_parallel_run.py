"""pretrain_neon.py with --context-parallel-size 2 in real torchrun processes (gloo, default
settings otherwise: a DataLoader worker, asynchronous checkpoint writes off as by default).

A CP=2 run of DiffAttention + nGPT with a sliding window narrower than a chunk trains, saves,
stops at --exit-interval and resumes to the same losses bit for bit as the run that never
stopped; its checkpoint at the exit resumes training at CP=1 (one process) to the CP=2 losses,
and its last checkpoint evaluates at CP=1 to the same validation loss.

Bound for CP=1 against CP=2: the two differ only in the order of fp32 sums (attention over
gathered keys, the loss summed per rank then over the group; two Adam steps carry those
differences on, each update bounded by the learning rate); as in test_pretrain_run's reshard
bound (R = 26 reductions of at most n = 256 terms: R sqrt(n) 2^-24 = 2.5e-5), 1e-4 relative.
A wrong chunk order or mask moves the loss by more than 1e-2.
"""

import math

import pytest

from tests.neon.training.runs import check, launch, metrics, tiny_args

pytestmark = pytest.mark.slow
N, EXIT_AT = 6, 4
REL_TOL = 1e-4  # see the module docstring
CP2 = dict(context_parallel_size=2, diff_attention="matched", ngpt=True, sliding_window=6, train_iters=N,
           lr_decay_iters=N, eval_interval=N, num_workers=None)


def test_cp2_run_resumes_bit_for_bit_and_its_checkpoint_evaluates_at_cp1(corpus, tmp_path):
    reference = tmp_path / "reference"
    out = check(launch(tiny_args(*corpus, **CP2, save=reference), nproc=2))
    assert "context-parallel size: 2" in out, out[-3000:]
    ref = metrics(reference)
    assert ref[N]["loss"] < ref[1]["loss"], ref

    stopped = tmp_path / "stopped"
    args = tiny_args(*corpus, **CP2, save=stopped, load=stopped)
    out = check(launch(args + ["--exit-interval", str(EXIT_AT)], nproc=2))
    assert f" done: exit interval at iteration {EXIT_AT}" in out, out[-3000:]
    check(launch(args, nproc=2))
    resumed = metrics(stopped)
    assert [resumed[i]["loss"] for i in range(1, N + 1)] == [ref[i]["loss"] for i in range(1, N + 1)]

    # the CP=2 checkpoint at EXIT_AT (model, optimizer, scheduler) resumes at CP=1 in one process
    at_cp1 = tmp_path / "resumed_cp1"
    out = check(launch(tiny_args(*corpus, **{**CP2, "context_parallel_size": 1}, load=stopped, ckpt_step=EXIT_AT,
                                 save=at_cp1), nproc=1))
    assert f"at iteration {EXIT_AT}" in out, out[-3000:]
    cp1 = metrics(at_cp1)
    assert sorted(cp1) == list(range(EXIT_AT + 1, N + 1)), cp1
    for i in cp1:
        assert math.isclose(cp1[i]["loss"], ref[i]["loss"], rel_tol=REL_TOL), (i, cp1[i]["loss"], ref[i]["loss"])

    run_dir = tmp_path / "eval_cp1"
    check(launch(tiny_args(*corpus, **{**CP2, "context_parallel_size": 1}, load=reference, skip_train=True,
                           run_dir=run_dir), nproc=1))
    expected = metrics(reference, "valid")[N]["loss"]
    assert math.isclose(metrics(run_dir, "valid")[N]["loss"], expected, rel_tol=REL_TOL)
