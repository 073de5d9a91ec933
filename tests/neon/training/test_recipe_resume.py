"""Resuming through `pretrain_neon.py --load` (torchrun) after a feature recipe changed a model
setting: nGPT's recipe stores alpha and s_z at 1/d_model (`ngpt_alpha_sz_scale: inv_d`), and a
checkpoint trained with 1/sqrt(d_model) must still load and mean what it meant. A recipe's value
gives way to the checkpoint's (said in the log, recorded in config.yaml as origin "checkpoint");
the same value given as a flag is the user's choice, and a checkpoint of the other value is refused
with the mismatch error. tests/neon/training/test_checkpoint_compat.py covers a checkpoint written
before the setting existed (compared as its default, 'inv_sqrt_d')."""

import shutil

import pytest
import yaml

from tests.neon.training.runs import check, latest, launch, tiny_args

pytestmark = pytest.mark.slow
NGPT = dict(num_layers=2, ngpt=True, eval_iters=0)


@pytest.fixture(scope="module")
def legacy(corpus, tmp_path_factory):
    """A checkpoint of iteration 2 of an nGPT run with the paper's scales (1/sqrt(d_model))."""
    save = tmp_path_factory.mktemp("recipe_resume") / "ckpt"
    check(launch(tiny_args(*corpus, **NGPT, ngpt_alpha_sz_scale="inv_sqrt_d", train_iters=2, save=save,
                           save_interval=2), nproc=1))
    assert latest(save) == 2
    assert yaml.safe_load((save / "config.yaml").read_text())["model"]["ngpt_alpha_sz_scale"] == "inv_sqrt_d"
    return save


def test_a_recipe_value_follows_the_checkpoint(corpus, legacy, tmp_path):
    save = shutil.copytree(legacy, tmp_path / "ckpt")
    out = check(launch(tiny_args(*corpus, **NGPT, train_iters=4, save=save, load=save), nproc=1))
    assert f"loaded checkpoint {save}/iter_0000002 at iteration 2" in out
    assert (f" ngpt_alpha_sz_scale: 'inv_sqrt_d' as the checkpoint in {save} was trained with, not 'inv_d' "
            f"from recipe:ngpt") in out, out[-3000:]
    assert "  ngpt_alpha_sz_scale: inv_sqrt_d  # checkpoint" in (save / "config.yaml").read_text().splitlines()
    assert latest(save) == 4


def test_a_fresh_run_gets_the_recipe(corpus, tmp_path):
    run = tmp_path / "run"
    check(launch(tiny_args(*corpus, **NGPT, train_iters=2, save=run), nproc=1))
    assert "  ngpt_alpha_sz_scale: inv_d  # recipe:ngpt" in (run / "config.yaml").read_text().splitlines()


def test_an_explicit_value_must_match_the_checkpoint(corpus, legacy, tmp_path):
    save = shutil.copytree(legacy, tmp_path / "ckpt")
    out = check(launch(tiny_args(*corpus, **NGPT, ngpt_alpha_sz_scale="inv_d", train_iters=4, save=save, load=save),
                       nproc=1), code=1)
    assert (f"{save}/iter_0000002: the checkpoint holds another model architecture than this run builds "
            f"(ngpt_alpha_sz_scale: checkpoint 'inv_sqrt_d', this run 'inv_d'). Fix: run with the checkpoint's "
            f"settings (--ngpt-alpha-sz-scale inv_sqrt_d,") in out, out[-3000:]
    assert "exitcode  : 4" in out and latest(save) == 2
