"""Damaged and mismatched checkpoints through `pretrain_neon.py --load` (torchrun, default
settings): a really truncated shard, a really zeroed block and another architecture each stop
the run before it trains, with one paragraph (no traceback) naming the file or the setting and
the fix, and exit status 4; following the fix (--ckpt-step N of the previous checkpoint) works.
"""

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml

from neon.training import checksums, model_match
from tests.neon.training.runs import check, latest, launch, tiny_args

pytestmark = pytest.mark.slow
GOLDEN = Path(__file__).resolve().parents[2] / "data" / "golden_all_features" / "checkpoint" / "iter_0000040"
MODEL = dict(num_layers=2, diff_attention="matched", eval_iters=0)


@pytest.fixture(scope="module")
def saved(corpus, tmp_path_factory):
    """Checkpoints of iterations 2 and 4 of a DiffAttention ('matched') run, with checksums."""
    save = tmp_path_factory.mktemp("integrity") / "ckpt"
    check(launch(tiny_args(*corpus, **MODEL, train_iters=4, save=save, save_interval=2), nproc=1))
    assert latest(save) == 4 and (save / "iter_0000004" / checksums.MANIFEST).is_file()
    return save


def _copy(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "ckpt"))


def _stopped_with(result, *phrases: str) -> str:
    """torchrun reports 1; the worker's own status (4) and its one-paragraph message are in the log."""
    out = check(result, code=1)
    for phrase in phrases:
        assert phrase in out, (phrase, out[-4000:])
    assert "exitcode  : 4" in out, out[-2000:]
    assert "[rank0]: Traceback" not in out and "iteration        1/" not in out, out[-4000:]
    return out


def test_truncated_shard_is_named_and_the_previous_checkpoint_resumes(corpus, saved, tmp_path):
    save = _copy(saved, tmp_path)
    shard = save / "iter_0000004" / "__0_1.distcp"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    args = tiny_args(*corpus, **MODEL, train_iters=6, save=save, load=save)
    _stopped_with(launch(args, nproc=1),
                  f"pretrain_neon.py: error: {save}/iter_0000004: the checkpoint is damaged: __0_1.distcp has "
                  f"{size // 2} bytes, {size} were written (truncated: reading it ends in EOF). Fix: resume from the "
                  f"previous checkpoint with --ckpt-step 2")
    # The advice works; settings that do not change the model (dropout, recompute) may differ.
    out = check(launch(tiny_args(*corpus, **MODEL, train_iters=6, save=save, load=save, ckpt_step=2, hidden_dropout=0.1,
                                 recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
                       nproc=1))
    assert f"loaded checkpoint {save}/iter_0000002 at iteration 2" in out
    assert latest(save) == 6 and " iteration        3/       6" in out


def test_zeroed_block_is_caught_by_its_checksum(corpus, saved, tmp_path):
    save = _copy(saved, tmp_path)
    shard = save / "iter_0000004" / "__0_0.distcp"
    with open(shard, "r+b") as f:
        f.seek(shard.stat().st_size // 2)
        block = f.read(4096)
        assert block.count(0) < len(block) // 2  # tensor data, not padding
        f.seek(shard.stat().st_size // 2)
        f.write(bytes(4096))
    _stopped_with(launch(tiny_args(*corpus, **MODEL, train_iters=6, save=save, load=save), nproc=1),
                  f"{save}/iter_0000004: the checkpoint is damaged: __0_0.distcp does not match its recorded sha256 "
                  f"checksum (its content is damaged). Fix: resume from the previous checkpoint with --ckpt-step 2")


def test_another_architecture_is_refused_before_loading(corpus, saved, tmp_path):
    save = _copy(saved, tmp_path)
    before = (save / "config.yaml").read_text()
    args = tiny_args(*corpus, num_layers=2, eval_iters=0, train_iters=6, save=save, load=save)  # DiffAttention off
    _stopped_with(launch(args, nproc=1),
                  f"{save}/iter_0000004: the checkpoint holds another model architecture than this run builds "
                  f"(diff_attention: checkpoint 'matched', this run 'off'). Fix: run with the checkpoint's settings "
                  f"(--diff-attention matched,")
    assert (save / "config.yaml").read_text() == before and latest(save) == 4
    assert yaml.safe_load(before)["model"]["diff_attention"] == "matched"


def test_truncated_shard_of_a_checkpoint_without_checksums_is_named(tmp_path):
    """Older checkpoints have no checksums.json; DCP's own index still shows a short file."""
    copy = Path(shutil.copytree(GOLDEN, tmp_path / "iter_0000040"))
    assert not (copy / checksums.MANIFEST).exists() and checksums.check_sizes(copy) is None
    shard = copy / "__0_0.distcp"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 1000)
    problem = checksums.check_sizes(copy)
    assert problem is not None and problem.startswith(f"__0_0.distcp has {size - 1000} bytes, the checkpoint's index "
                                                      f"needs "), problem


def test_settings_that_must_match_are_real_model_fields():
    """A misspelt name in the list would silently never be compared."""
    from neon.config import NeonConfig

    fields = {f.name for f in dataclasses.fields(NeonConfig)}
    listed = set(model_match.MEGATRON_ARCHITECTURE) | set(model_match.PRECISION) | model_match.MAY_DIFFER
    assert listed <= fields, sorted(listed - fields)
    must = set(model_match.architecture_fields())
    assert {"diff_attention", "ngpt", "flaming_moe", "vocab_size", "hidden_size", "bf16"} <= must
    assert not must & model_match.MAY_DIFFER
