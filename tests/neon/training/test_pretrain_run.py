"""pretrain_neon.py end to end in real torchrun processes (gloo, tiny model, test corpus).

One reference run at TP2 (with sequence parallelism and dropout, so RNG state matters) is
compared bit for bit with a run that is killed with SIGKILL in the middle of a checkpoint
write, resumed from the previous checkpoint, stopped with SIGTERM sent to the launcher's process
group (as Slurm sends it; torchrun forwards it to each worker's group, so the DataLoader worker
of the default --num-workers 1 gets it too), and resumed again.
Its checkpoints, and those of a PP2 interleaved run, are then evaluated at TP1/PP1.
"""

import math
import os
import signal

import pytest

from tests.neon.training.runs import FAULTS, check, kill_all, latest, launch, metrics, start, tiny_args, wait_for

pytestmark = pytest.mark.slow
N = 10
# TP2 and TP1 evaluations of one checkpoint differ only in the order of fp32 additions (TP splits
# the row-parallel and the vocab-parallel cross-entropy reductions; GEMM blocking follows the shard
# shapes). Over the R = 26 reductions on the way to the loss (4 layers x 6, the head, the
# logsumexp), each of at most n = 256 terms, a random-walk estimate of that error is
# R * sqrt(n) * 2^-24 = 2.5e-5 of the values' magnitude, before the average over the 512 evaluated
# tokens shrinks it further. We allow 1e-4 relative; a wrong reshard (a swapped or missing shard)
# moves the loss by more than 1e-2 (the validation losses of iterations 4 and 8 differ by > 0.05).
RESHARD_REL_TOL = 1e-4
TP2 = dict(tensor_model_parallel_size=2, sequence_parallel=True, hidden_dropout=0.1, train_iters=N)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """N steps in one go at TP2, checkpoints every 2 steps, evaluation every 4."""
    save = tmp_path_factory.mktemp("reference")
    out = check(launch(tiny_args(*corpus, **TP2, save=save, save_interval=2, ckpt_keep_last=0), nproc=2))
    return save, out


def test_training_lowers_the_loss_and_logs(reference):
    save, out = reference
    train, valid = metrics(save), metrics(save, "valid")
    assert sorted(train) == list(range(1, N + 1))
    assert sorted(valid) == [4, 8, 10]
    assert valid[10]["loss"] < valid[8]["loss"] < valid[4]["loss"] - 0.05, valid
    assert train[N]["loss"] < train[1]["loss"] - 0.2
    first = train[1]
    assert first["consumed_tokens"] == 8 * 32 and first["tokens_per_s"] > 0 and first["grad_norm"] > 0
    assert " iteration        1/      10 | consumed samples:            8 |" in out
    assert "validation loss at iteration 10 | lm loss value:" in out
    assert (save / "config.yaml").is_file() and latest(save) == N
    assert sorted(p.name for p in save.glob("iter_*")) == [f"iter_{i:07d}" for i in range(2, N + 1, 2)]


def test_killed_save_then_sigterm_then_resume_is_exact(corpus, reference, tmp_path):
    ref = metrics(reference[0])
    save = tmp_path / "ckpt"
    args = tiny_args(*corpus, **TP2, save=save, load=save, save_interval=2, ckpt_keep_last=2, num_workers=None)

    # 1. SIGKILL every process while iteration 4 is being written (the save pauses after writing,
    #    before committing): iteration 2 stays the latest.
    proc = start(args, nproc=2, log=tmp_path / "killed.log", script=FAULTS, NEON_TEST_PAUSE_SAVE_AT="4")
    tmp4 = save / ".tmp_iter_0000004"
    wait_for(lambda: tmp4.exists() and any(tmp4.iterdir()), proc, 120, "the write of iteration 4", poll=0.05)
    kill_all(proc)
    assert latest(save) == 2 and (save / "iter_0000002" / "metadata.json").is_file()
    assert not (save / "iter_0000004").exists() or latest(save) == 2

    # 2. Resume from 2; SIGTERM to the process group mid-run: the ranks finish the step, save and
    #    exit with status 0 (the DataLoader workers, default --num-workers, survive the signal).
    proc = start(args, nproc=2, log=tmp_path / "sigterm.log")
    wait_for(lambda: max(metrics(save), default=0) >= 5, proc, 120, "iteration 5")
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    log = (tmp_path / "sigterm.log").read_text()
    stopped = latest(save)
    assert "received signal SIGTERM at iteration" in log, log[-3000:]
    assert f" done: signal SIGTERM at iteration {stopped}; checkpoint: {save}/iter_{stopped:07d}" in log, log[-3000:]
    assert "DataLoader worker" not in log and "[rank0]: Traceback" not in log, log[-3000:]
    assert 5 <= stopped < N, (stopped, log[-3000:])
    assert f" saved checkpoint {save}/iter_{stopped:07d}" in log
    assert not list(save.glob(".tmp_iter_*")), "the stale temporary directory was not removed"

    # 3. Resume to the end: every loss equals the uninterrupted run's, bit for bit.
    check(launch(args, nproc=2))
    resumed = metrics(save)
    assert sorted(resumed) == list(range(1, N + 1))
    for it in range(1, N + 1):  # the record of the last run that reached each iteration
        assert resumed[it]["loss"] == ref[it]["loss"], (it, resumed[it]["loss"], ref[it]["loss"])
        assert resumed[it]["lr"] == ref[it]["lr"]
    assert metrics(save, "valid")[N]["loss"] == metrics(reference[0], "valid")[N]["loss"]
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000008", "iter_0000010"]  # keep the last 2


def _eval_at_tp1(corpus, load, step, tmp_path, **kwargs):
    out = check(launch(tiny_args(*corpus, load=load, ckpt_step=step, skip_train=True,
                                 run_dir=tmp_path / f"eval_{step}", **kwargs), nproc=1))
    assert "resharded to this layout" in out
    return metrics(tmp_path / f"eval_{step}", "valid")[step]["loss"]


def test_tp2_checkpoint_loads_at_tp1_with_the_same_validation_loss(corpus, reference, tmp_path):
    save = reference[0]
    expected = metrics(save, "valid")[8]["loss"]
    assert math.isclose(_eval_at_tp1(corpus, save, 8, tmp_path), expected, rel_tol=RESHARD_REL_TOL)


def test_pp2_interleaved_distopt_recompute_checkpoint_loads_at_pp1_with_the_same_validation_loss(corpus, tmp_path):
    save = tmp_path / "pp2"
    check(launch(tiny_args(*corpus, pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1,
                           use_distributed_optimizer=True, recompute_granularity="full", recompute_method="uniform",
                           recompute_num_layers=1, train_iters=4, save=save,
                           tensorboard_dir=tmp_path / "tb", wandb_project="neon-test"), nproc=2))
    expected = metrics(save, "valid")[4]["loss"]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert list((save / "wandb").glob("wandb/offline-run-*"))
    evaluated = _eval_at_tp1(corpus, save, 4, tmp_path, use_distributed_optimizer=True)
    assert math.isclose(evaluated, expected, rel_tol=RESHARD_REL_TOL)


def test_flaming_moe_at_tp2_trains_and_its_checkpoint_loads_at_tp1(corpus, tmp_path):
    """FlamingMoE under tensor (+ sequence) parallelism through the CLI: the functions are whole on
    each TP rank (expert TP 1) and their gradients summed over TP; the TP2 checkpoint's banks
    reshard to TP1 with the same validation loss (the bound above; the banks add reductions of at
    most 64 terms). Megatron keeps expert parameters (the functions, marked so at TP > 1 to sum
    their gradients over TP) in an optimizer of their own, so the TP2 optimizer state does not load
    at TP1: --no-load-optim, as for any layout whose optimizer grouping differs."""
    save = tmp_path / "flaming_tp2"
    flaming = dict(flaming_moe="between", flaming_global_functions=2, flaming_layer_functions=2,
                   flaming_layer_kind="swiglu", flaming_ffn_hidden_size=32, flaming_router="topk")
    check(launch(tiny_args(*corpus, tensor_model_parallel_size=2, sequence_parallel=True, num_layers=2,
                           train_iters=4, save=save, **flaming), nproc=2))
    train = metrics(save)
    assert train[4]["loss"] < train[1]["loss"], train
    expected = metrics(save, "valid")[4]["loss"]
    assert math.isclose(_eval_at_tp1(corpus, save, 4, tmp_path, num_layers=2, no_load_optim=True, **flaming), expected,
                        rel_tol=RESHARD_REL_TOL)


def test_non_finite_loss_stops_at_that_step_without_saving_it(corpus, tmp_path):
    save = tmp_path / "nan"
    out = check(launch(tiny_args(*corpus, num_layers=2, global_batch_size=4, lr=1e30, min_lr=0, clip_grad=0,
                                 lr_warmup_iters=0, train_iters=6, save=save, save_interval=1), nproc=1), code=1)
    assert "pretrain_neon.py: error: iteration 2: the training gradient norm is not finite" in out, out[-3000:]
    assert f"Last good checkpoint: {save}/iter_0000001" in out
    assert latest(save) == 1 and not (save / "iter_0000002").exists() and not list(save.glob(".tmp_iter_*"))
    assert sorted(metrics(save)) == [1]
