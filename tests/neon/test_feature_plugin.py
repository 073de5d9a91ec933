"""A fourth feature, defined here and registered at run time, goes through the whole run with no
other file of the project changed: the feature contract (neon/features/) is all it needs.

    mlp_gate:  MLP(x) <- MLP(x) * sigmoid(W_g x + b)     (W_g [d, d], bias-free; b: mlp_gate_bias)

This module is also a launcher (`python -m tests.neon.test_feature_plugin <pretrain_neon.py flags>`):
it registers the feature, then runs pretrain_neon.main, as a user's own launcher script would.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.mlp import MLP
from megatron.core.utils import init_method_normal

from neon.features import FEATURES, Feature, register, unregister
from tests.neon.training.corpus import make_corpus

HERE = Path(__file__).resolve()
LAUNCHER = "tests.neon.test_feature_plugin"


@dataclass
class MLPGateSettings:
    mlp_gate: bool = False
    """Gate the MLP's output with sigmoid(W_g x + mlp_gate_bias)."""
    mlp_gate_bias: float = 0.0
    """b, added inside the sigmoid (part of the function the model computes)."""
    mlp_gate_init_std: float = 0.02
    """Initial std of W_g (how the model starts, not what it computes)."""


class GatedMLP(MLP):
    def __init__(self, config, submodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        self.gate = ColumnParallelLinear(config.hidden_size, config.hidden_size, config=config, bias=False,
                                         init_method=init_method_normal(config.mlp_gate_init_std), gather_output=True)

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        out, bias = super().forward(hidden_states, per_token_scale, **kwargs)
        gate, _ = self.gate(hidden_states)
        return out * torch.sigmoid(gate + self.config.mlp_gate_bias), bias


class MLPGateFeature(Feature):
    name = "mlp_gate"
    settings = MLPGateSettings
    hf_fields = ("mlp_gate", "mlp_gate_bias")
    run_fields = ("mlp_gate_init_std",)
    ablation_name = "gate"
    ablation_settings = {"mlp_gate": True}

    def layer_spec(self, spec, config, use_te):
        return replace(spec, submodules=replace(spec.submodules, mlp=replace(spec.submodules.mlp, module=GatedMLP)))

    def hf_layer_tensors(self, config):
        return [("mlp.output_gate.weight", "mlp.gate.weight", 0)]  # W_g, rows split over TP

    def flops_terms(self, config, keys, terms):
        return {**terms, "mlp_gate": config.hidden_size * config.hidden_size}  # W_g x per token and layer


FEATURE = MLPGateFeature()


@contextlib.contextmanager
def registered():
    register(FEATURE, before="ngpt")  # before nGPT, as the contract asks of a layer-building feature
    try:
        yield FEATURE
    finally:
        unregister(FEATURE.name)


@pytest.fixture
def gate():
    with registered() as feature:
        yield feature


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def test_registered_before_ngpt_and_unregistered_without_a_trace():
    from neon.training.config import MODEL_FIELDS

    with registered():
        assert list(FEATURES) == ["diff_attention", "flaming_moe", "mlp_gate", "ngpt"]
        assert {"mlp_gate", "mlp_gate_bias", "mlp_gate_init_std"} <= set(MODEL_FIELDS)
    assert list(FEATURES) == ["diff_attention", "flaming_moe", "ngpt"]
    assert not {"mlp_gate", "mlp_gate_bias"} & set(MODEL_FIELDS)


# --- training, checkpoints and resume through pretrain_neon.main ------------------------------------


def test_trains_saves_and_refuses_a_changed_architecture_field_at_resume(corpus, tmp_path):
    from tests.neon.training.runs import check, launch, metrics, tiny_args

    save = tmp_path / "ckpt"
    args = tiny_args(*corpus, num_layers=2, train_iters=4, eval_interval=4, save=save, save_interval=2)
    gated = check(launch([*args, "--mlp-gate"], nproc=0, script=LAUNCHER))
    printed = check(launch([*args, "--mlp-gate", "--print-config"], nproc=0, script=LAUNCHER))
    assert "mlp_gate: true  # command line" in printed
    losses = metrics(save)
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in losses.values()), gated
    plain = check(launch(tiny_args(*corpus, num_layers=2, train_iters=4, eval_interval=4, run_dir=tmp_path / "plain"),
                         nproc=0, script=LAUNCHER))
    assert metrics(tmp_path / "plain")[4]["loss"] != losses[4]["loss"], plain  # the gate is in the model

    # a field of the feature that changes what the model computes: refused before loading
    refused = launch([*args, "--mlp-gate", "--mlp-gate-bias", "0.5", "--load", str(save), "--train-iters", "6"],
                     nproc=0, script=LAUNCHER)
    assert refused.returncode == 4, refused.stderr[-3000:]
    assert "mlp_gate_bias: checkpoint 0.0, this run 0.5" in refused.stderr and "Traceback" not in refused.stderr
    # a run field of the feature: the resume goes on
    check(launch([*args, "--mlp-gate", "--mlp-gate-init-std", "0.5", "--load", str(save), "--train-iters", "6"],
                 nproc=0, script=LAUNCHER))
    assert sorted(metrics(save)) == [1, 2, 3, 4, 5, 6]


# --- the ablation's variants, MFU's FLOPs, the HF mapping ---------------------------------------------


def test_ablation_base_turns_it_off_and_its_variant_on(gate):
    from neon.ablation.variants import parse_variants, variant_config

    base_yaml = {"model": {"mlp_gate": True, "mlp_gate_bias": 0.25, "num_layers": 2}}
    variants = {v.name: v for v in parse_variants(["gate", "all"], base_yaml)}
    assert variant_config(base_yaml, variants["base"])["model"]["mlp_gate"] is False
    assert variant_config(base_yaml, variants["gate"])["model"]["mlp_gate"] is True
    assert variant_config(base_yaml, variants["all"])["model"]["mlp_gate"] is True
    assert variant_config(base_yaml, variants["gate"])["model"]["mlp_gate_bias"] == 0.25  # the config's own


def test_mfu_counts_its_flops(gate):
    from neon.config import NeonConfig
    from neon.flops import training_flops_per_token

    tiny = dict(num_layers=3, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, vocab_size=256)
    with_gate = training_flops_per_token(NeonConfig(**tiny, mlp_gate=True), 32)
    without = training_flops_per_token(NeonConfig(**tiny), 32)
    assert with_gate - without == 2 * 3 * 3 * 64 * 64  # 2 FLOPs x 3 passes x 3 layers x d^2


def _hf_round_trip():
    with registered():
        from neon.config import NeonConfig
        from neon.model import build_model
        from neon.state_dict_adapter import hf_to_megatron, megatron_to_hf

        config = NeonConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=64,
                            mlp_gate=True)
        model = build_model(config)
        megatron = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        hf = megatron_to_hf([megatron], config)
        back = hf_to_megatron(hf, config)
        return {"hf": sorted(hf), "gate": hf["model.layers.1.mlp.output_gate.weight"],
                "megatron_gate": megatron["decoder.layers.1.mlp.gate.weight"],
                "same": sorted(back) == sorted(megatron) and all(torch.equal(back[k], megatron[k]) for k in megatron)}


def test_hf_mapping_carries_its_tensors():
    from tests.dist import run_distributed

    (result,) = run_distributed(_hf_round_trip, world_size=1)
    assert "model.layers.0.mlp.output_gate.weight" in result["hf"]
    assert torch.equal(result["gate"], result["megatron_gate"]) and result["same"]


if __name__ == "__main__":  # the launcher: this feature registered, then pretrain_neon.py
    import pretrain_neon

    register(FEATURE, before="ngpt")
    sys.exit(pretrain_neon.main(sys.argv[1:]))
