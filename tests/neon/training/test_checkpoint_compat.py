"""A checkpoint written by an earlier Neon (every feature on: DiffAttention 'matched', nGPT,
FlamingMoE global + layer banks, sliding window) still loads through `pretrain_neon.py --load`
and reproduces the next 5 training losses that the earlier code recorded. It has no
checksums.json (it predates them): it loads with a warning.

tests/data/make_golden_checkpoint.py made tests/data/golden_all_features/ (checkpoint at
iteration 40, its tokenizer and data, and the losses of iterations 41..45).

Bound. Bitwise equality is not expected across CPUs (the order of fp32 reductions in the GEMMs
differs between SIMD widths). The first resumed loss is a forward pass over the loaded weights:
fp32 rounding, about eps32 * sqrt(n) relative for a reduction of n terms (n <= hidden x seq = 1024
here: 1.2e-7 * 32 ~ 4e-6). Each later step adds Adam's response to those rounded gradients:
a coordinate whose gradient is at rounding level can move by up to lr instead of ~0, and its
first-order effect on the loss is lr * |g_i| with |g_i| itself at rounding level, so the drift
stays at the rounding scale. We allow 1e-4 relative (25x the first step's rounding, 5e-4 absolute)
for all five. What a wrong load changes is far larger: the recorded losses sit 0.5 below a fresh
model's ln(256) = 5.55 and move by ~0.1 from batch to batch, so a reset module, a dropped optimizer
state or another data position misses the bound.
"""

import json
import shutil
from pathlib import Path

import pytest

from tests.neon.training.runs import check, launch, metrics, tiny_args

pytestmark = pytest.mark.slow
GOLDEN = Path(__file__).resolve().parents[2] / "data" / "golden_all_features"
RELATIVE_BOUND = 1e-4


def test_checkpoint_from_earlier_code_resumes_with_the_recorded_losses(tmp_path):
    expected = json.loads((GOLDEN / "expected.json").read_text())
    save = tmp_path / "ckpt"
    shutil.copytree(GOLDEN / "checkpoint", save)
    corpus = GOLDEN / "corpus"
    args = tiny_args(str(corpus / "tok.model"), str(corpus / "corpus_text_document"), **expected["flags"],
                     train_iters=expected["train_iters"], save=save, load=save, eval_iters=0,
                     lr_warmup_iters=0, data_cache_path=tmp_path / "cache")
    out = check(launch(args, nproc=1, timeout=300))
    assert f"loaded checkpoint {save}/iter_{expected['first_iteration']:07d}" in out
    # written before checkpoints carried checksums: loaded, with a warning
    assert f"warning: {save}/iter_{expected['first_iteration']:07d} has no checksums.json" in out
    got = metrics(save)
    assert sorted(got) == sorted(int(i) for i in expected["next_losses"])
    for it, record in expected["next_losses"].items():
        loss = got[int(it)]["loss"]
        assert abs(loss - record["loss"]) <= RELATIVE_BOUND * abs(record["loss"]), (it, loss, record["loss"])
        assert got[int(it)]["lr"] == pytest.approx(record["lr"], rel=1e-12)

