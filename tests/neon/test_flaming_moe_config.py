"""Bad FlamingMoE settings fail before any model is built, naming the setting and the fix."""

import pytest

from neon.config import NeonConfig
from neon.hf.configuration_neon import NeonHFConfig
from tests.neon.test_config import assert_names_setting_and_fix

GOOD = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
            vocab_size=128, flaming_moe="between", flaming_global_functions=8, flaming_layer_functions=4)


@pytest.mark.parametrize("overrides,setting,fix", [
    (dict(flaming_moe="middle"), "flaming_moe='middle'", "one of"),
    (dict(flaming_global_functions=0, flaming_layer_functions=0), "flaming_layer_functions=0", "> 0"),
    (dict(flaming_layer_functions=-1), "flaming_layer_functions=-1", "bank size"),
    (dict(flaming_topk=5), "flaming_topk=5", "smallest bank"),
    (dict(flaming_topk=0), "flaming_topk=0", "k >= 1"),
    (dict(flaming_layer_functions=6, expert_model_parallel_size=4), "flaming_layer_functions=6",
     "multiple of the expert-parallel size"),
    (dict(flaming_layer_kind="cubic"), "flaming_layer_kind='cubic'", "one of"),
    (dict(flaming_router="sinkhorn"), "flaming_router='sinkhorn'", "one of"),
    (dict(flaming_gumbel_temperature=0.0), "flaming_gumbel_temperature=0.0", "positive temperature"),
    (dict(flaming_token_dispatcher="flex"), "flaming_token_dispatcher='flex'", "one of"),
    (dict(flaming_aux_loss_coeff=-0.1), "flaming_aux_loss_coeff=-0.1", "0 (off)"),
    (dict(add_bias_linear=True), "add_bias_linear=True", "add_bias_linear=False"),
    (dict(tensor_model_parallel_size=2), "expert_tensor_parallel_size=2", "expert_tensor_parallel_size=1"),
    (dict(tensor_model_parallel_size=2, expert_tensor_parallel_size=1), "sequence_parallel=False",
     "sequence_parallel=True"),
    (dict(tensor_model_parallel_size=2, expert_tensor_parallel_size=1, sequence_parallel=True), None, None),
    (dict(expert_model_parallel_size=4), None, None),  # EP without MoE MLPs: fine for FlamingMoE
    (dict(flaming_moe="mlp", flaming_global_functions=0, flaming_router="topk", flaming_topk=4), None, None),
], ids=lambda v: str(v)[:40] if isinstance(v, dict) else None)
def test_bad_flaming_config_names_setting_and_fix(overrides, setting, fix):
    if setting is None:  # a valid neighbour of the bad cases: must build
        cfg = NeonConfig(**{**GOOD, **overrides})
        assert cfg.expert_model_parallel_size == overrides.get("expert_model_parallel_size", 1)
        return
    assert_names_setting_and_fix({**GOOD, **overrides}, setting, fix)


def test_global_bank_marks_config_for_pipeline_grad_sum():
    assert NeonConfig(**GOOD).has_cond_embedder  # megatron's finalize_model_grads sums it over stages
    assert not NeonConfig(**{**GOOD, "flaming_global_functions": 0}).has_cond_embedder
    assert not NeonConfig(**{**GOOD, "flaming_moe": "off"}).has_cond_embedder


def test_hf_config_rejects_unknown_flaming_values():
    with pytest.raises(ValueError, match="flaming_moe"):
        NeonHFConfig(flaming_moe="middle")
    with pytest.raises(ValueError, match="flaming_layer_kind"):
        NeonHFConfig(flaming_moe="mlp", flaming_layer_functions=4, flaming_layer_kind="cubic")


CALL = "name=add,kind=callable,source=tests.neon.io_callables:sum_last_two"


@pytest.mark.parametrize("overrides,setting,fix", [
    (dict(flaming_io_functions=[CALL + ",bank=middle"]), "flaming_io_functions", "bank='middle'"),
    (dict(flaming_global_functions=2, expert_model_parallel_size=2, flaming_io_functions=[CALL + ",bank=global"]),
     "flaming_global_functions=2", "multiple of the expert-parallel size"),
    (dict(flaming_global_functions=1, flaming_topk=3, flaming_io_functions=[CALL + ",bank=global"]),
     "flaming_topk=3", "smallest bank"),
], ids=["bad bank", "global bank + IO over EP", "topk over global bank + IO"])
def test_bad_io_bank_names_setting_and_fix(overrides, setting, fix):
    assert_names_setting_and_fix({**GOOD, "flaming_topk": 1, **overrides}, setting, fix)


def test_global_io_functions_join_the_global_bank():
    """An IO-only global bank is a global bank: its replicas' gradients are summed over stages,
    its functions counted in the FLOPs as the global bank's."""
    from neon.flaming.block import bank_size
    from neon.flaming.flops import flaming_macs
    from neon.flaming.io import io_settings, io_specs
    from neon.io.base import kind_of

    cfg = NeonConfig(**{**GOOD, "flaming_global_functions": 0, "flaming_topk": 1,
                        "flaming_io_functions": [CALL + ",width=2,bank=global", CALL.replace("add", "sub")]})
    assert cfg.has_cond_embedder
    assert bank_size(cfg, "global") == 1 and bank_size(cfg, "layer") == 5
    assert [s.name for s in io_specs(cfg, "global")] == ["add"] and io_specs(cfg, "layer")[0].name == "sub"
    d = cfg.hidden_size
    glob, sub = (kind_of(s.kind).macs(s, io_settings(cfg)) for s in io_specs(cfg))  # the global bank: router + one
    assert flaming_macs(cfg) == d * 1 + glob + d * 5 + (4 * d * d + sub) / 5


def test_architecture_check_compares_io_banks_not_sources():
    from neon.training.model_match import differences

    saved = {"flaming_io_functions": [CALL]}
    same = {"flaming_io_functions": [CALL.replace("sum_last_two", "other") + ",bank=layer"]}
    moved = {"flaming_io_functions": [CALL + ",bank=global"]}
    assert differences(saved, same) == []  # another source (checked at load) and the default bank
    assert [d[0] for d in differences(saved, moved)] == ["flaming_io_functions"]
