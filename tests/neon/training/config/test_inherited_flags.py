"""Every megatron-core TransformerConfig field Neon does not build (neon/training/config/inherited.py)
is hidden from --help and refused at start: set to a value other than its default, pretrain_neon.py
exits 2 before building anything, naming the flag, the reason and the fix, with no traceback. The
walk calls pretrain_neon.py's main() for each field; the flags the issue found crashing or ignored
go through the real process too. Every field still in --help is one Neon builds or declares."""

import typing

import pytest

from neon.training.config.inherited import BUILT, INHERITED, refusal
from neon.training.config.model_section import MODEL_FIELDS
from neon.training.config.parsing import annotation, build_parser
from tests.neon.training.runs import check, launch

REFUSED = sorted(name for name in MODEL_FIELDS if refusal(name) is not None)
BASE = ["--mock-data", "--vocab-size", "128", "--eval-iters", "0"]


def other_value(name: str) -> list[str]:
    """Command-line words that give `name` a value other than its default."""
    tp, default = annotation("model", name), MODEL_FIELDS[name][1]
    flag = "--" + name.replace("_", "-")
    args = [tp] if typing.get_origin(tp) is typing.Literal else [a for a in typing.get_args(tp) if a is not type(None)]
    args = args or [tp]
    base = args[0] if len(args) == 1 else next((a for a in args if a is not bool), args[0])
    if base is bool or tp is bool:
        return [f"--no-{flag[2:]}" if default else flag]
    if typing.get_origin(base) is typing.Literal:
        return [flag, str(next(c for c in typing.get_args(base) if c != default))]
    if typing.get_origin(base) in (list, tuple):
        item = (typing.get_args(base) or (str,))[0]
        return [flag, "2" if item in (int, float) else "x"]
    if base is int:
        return [flag, str((default or 0) + 2)]
    if base is float:
        return [flag, str((default or 0.0) + 0.25)]
    return [flag, "x" if default != "x" else "y"]


def test_the_walk_covers_every_inherited_field_neon_does_not_build():
    assert len(REFUSED) > 150 and not set(REFUSED) & BUILT
    assert {"mtp_num_layers", "enable_cuda_graph", "is_hybrid_model", "multi_latent_attention", "use_kitchen",
            "fp4", "num_moe_experts", "qk_layernorm"} <= set(REFUSED)
    assert set(REFUSED) == {n for n in MODEL_FIELDS if n in INHERITED} - BUILT


def test_help_shows_only_settings_neon_builds():
    text = build_parser().format_help()
    for name in MODEL_FIELDS:
        shown = f"[model.{name}," in text
        assert shown == (refusal(name) is None), name


@pytest.mark.parametrize("name", REFUSED)
def test_each_refused_field_exits_2_with_its_reason(name, capsys):
    import pretrain_neon

    words = other_value(name)
    status = pretrain_neon.main([*BASE, *words])
    err = capsys.readouterr().err
    reason, fix = refusal(name)
    assert status == 2, (words, err)
    assert f"pretrain_neon.py: error: --{name.replace('_', '-')}=" in err and reason in err and fix in err, err
    assert "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("flags,named", [
    (["--mtp-num-layers", "1"], "--mtp-num-layers"), (["--enable-cuda-graph"], "--enable-cuda-graph"),
    (["--is-hybrid-model"], "--is-hybrid-model"), (["--multi-latent-attention", "--ngpt"], "--multi-latent-attention"),
    (["--num-experts", "4"], "--num-moe-experts"),  # Megatron-LM's alias, named by the field
], ids=lambda v: v[0] if isinstance(v, list) else "")
def test_flags_that_crashed_or_were_ignored_end_the_process_with_status_2(flags, named, tmp_path):
    text = check(launch([*BASE, *flags, "--save", str(tmp_path / "run")], nproc=0, timeout=60), 2)
    assert f"error: {named}=" in text and "Fix:" in text and "Traceback" not in text
    assert not (tmp_path / "run").exists()
