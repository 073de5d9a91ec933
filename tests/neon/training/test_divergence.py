"""A run whose loss becomes non-finite, through pretrain_neon.py under torchrun, and the way back.

The stop exits with status 3 and a one-paragraph message (no traceback) naming the diverged
iteration, the last good checkpoint and the flags that resume past it; nothing of the diverged
step is saved. Each test then follows that advice and trains to the end:
- a real divergence: a learning-rate warmup to an absurd peak ruins the weights of the step
  before the stop, so the advice starts from the checkpoint before the last good one. The
  value of --lr is the user's choice (the suggested tenth of 1e30 is still absurd); without
  --override-opt-param-scheduler the new --lr is ignored and the resumed run diverges again;
- a bad batch (injected with tests/faults.py's NEON_TEST_NAN_AT, as a corrupt batch would): the printed flags,
  followed literally, skip it and finish.
"""

import re
import shlex

import pytest

from tests.neon.training.runs import FAULTS, check, latest, launch, metrics, tiny_args

pytestmark = pytest.mark.slow


def _stopped(result, save, iteration: int) -> str:
    """The run stopped at `iteration` with status 3, its message, and nothing of that step saved.
    Returns the advice flags it printed."""
    out = check(result, code=1)  # torchrun's own status for a failed worker
    assert re.search(r"exitcode\s*:\s*3\b", out), out[-3000:]  # the worker's status, in torchrun's report
    message = [line for line in out.splitlines() if "pretrain_neon.py: error:" in line]
    assert len(message) == 1 and f"error: iteration {iteration}: the training" in message[0], out[-3000:]
    # the worker printed no traceback (torchrun prints its own ChildFailedError one)
    assert 'pretrain_neon.py", line' not in out and "TrainingDiverged" not in out, out[-3000:]
    assert not (save / f"iter_{iteration:07d}").exists() and not list(save.glob(".tmp_iter_*"))
    assert iteration not in metrics(save)
    flags = re.search(r"these flags added: (.*?) \(this skips", message[0])
    assert flags, message[0]
    return message[0], shlex.split(flags.group(1))


def _with(flags: list[str], **values) -> list[str]:
    """`flags` with the values of some flags replaced (names with _)."""
    out = list(flags)
    for name, value in values.items():
        out[out.index("--" + name.replace("_", "-")) + 1] = str(value)
    return out


def test_absurd_learning_rate_stops_and_the_advice_with_a_sane_rate_finishes(corpus, tmp_path):
    save = tmp_path / "ckpt"
    # Step 1 runs at the warmup's start (3e-3), step 2 at 5e29: its update ruins the weights
    # (saved as iteration 2), and iteration 3's gradients overflow.
    args = tiny_args(*corpus, num_layers=2, global_batch_size=4, lr=1e30, min_lr=0, lr_warmup_init=3e-3,
                     lr_warmup_iters=2, lr_decay_style="constant", clip_grad=0, train_iters=6, eval_iters=0,
                     save=save, save_interval=1, ckpt_keep_last=0)
    message, advice = _stopped(launch(args), save, 3)
    assert f"Last good checkpoint: {save}/iter_0000002 (iteration 2); its next step is the one that diverged" \
        in message
    assert advice == ["--load", str(save), "--ckpt-step", "1", "--iterations-to-skip", "3",
                      "--override-opt-param-scheduler", "--lr", "1e+29", "--lr-warmup-init", "0.0003"]
    assert latest(save) == 2

    # The advice without the override: the checkpoint's schedule (peak 1e30) wins over --lr 3e-3,
    # so step 2 runs at 5e29 again, iteration 3 is skipped and iteration 4 diverges.
    plain = [f for f in advice if f != "--override-opt-param-scheduler"]
    _stopped(launch(args + _with(plain, lr=3e-3)), save, 4)
    assert metrics(save)[2]["lr"] == 1e30  # the rate after step 2: the checkpoint's peak, not 3e-3

    # The advice as given, with the user's sane rate: trains to the end at that rate.
    out = check(launch(args + _with(advice, lr=3e-3)))
    assert " skipped iteration 3 (--iterations-to-skip): its 4 samples consumed" in out
    train = metrics(save)
    assert sorted(train) == [1, 2, 4, 5, 6]  # 1 from the first run, 3 skipped
    assert [train[i]["lr"] for i in (4, 5, 6)] == [3e-3] * 3
    assert train[2]["lr"] == pytest.approx(3e-3, rel=1e-12)  # the end of the (new) warmup
    assert train[6]["consumed_samples"] == 6 * 4
    # finite and near the start's ln(256) = 5.5 (weights from the 1e30 step would give NaN or ~1e30)
    assert all(train[i]["loss"] < 10 for i in (2, 4, 5, 6)), train
    assert latest(save) == 6


def test_bad_batch_stops_and_the_printed_flags_skip_it_and_finish(corpus, tmp_path, monkeypatch):
    save = tmp_path / "ckpt"
    args = tiny_args(*corpus, num_layers=2, global_batch_size=4, train_iters=6, eval_iters=0, save=save,
                     save_interval=1)
    monkeypatch.setenv("NEON_TEST_NAN_AT", "4")  # stays armed for the resumed run
    message, advice = _stopped(launch(args, script=FAULTS), save, 4)
    assert f"Last good checkpoint: {save}/iter_0000003 (iteration 3)" in message
    assert advice == ["--load", str(save), "--ckpt-step", "2", "--iterations-to-skip", "4",
                      "--override-opt-param-scheduler", "--lr", "0.0003", "--min-lr", "3e-05"]

    # The flags exactly as printed: iteration 4's batch is skipped, so its fault never fires.
    out = check(launch(args + advice, script=FAULTS))
    assert " skipped iteration 4 (--iterations-to-skip): its 4 samples consumed" in out
    train = metrics(save)
    assert sorted(train) == [1, 2, 3, 5, 6]
    assert train[5]["consumed_samples"] == 5 * 4 and train[6]["consumed_samples"] == 6 * 4
    assert all(3e-5 <= train[i]["lr"] <= 3e-4 for i in (3, 5, 6)), train
    assert latest(save) == 6
