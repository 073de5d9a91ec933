"""The feature contract (neon/features/): the registry covers DiffAttention, FlamingMoE and nGPT,
every field and hook a feature declares is real, and each hook is exercised through the generic
code that calls it (config, layer spec, attach, HF mapping, FLOPs, run-config recipe)."""

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
from megatron.core.transformer.transformer_config import TransformerConfig

import neon.hf.modeling_neon as modeling_neon
from neon.config import NeonConfig
from neon.errors import ConfigError
from neon.features import FEATURES, Feature, active, recipes
from neon.flops import training_flops_per_token
from neon.hf.configuration_neon import NeonHFConfig
from neon.training.config import Config
from tests.dist import run_distributed

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=96,
            vocab_size=128, max_position_embeddings=64)
MISTRAL_FIELDS = {"vocab_size", "max_position_embeddings", "rope_theta", "sliding_window", "tie_word_embeddings"}
FLAMING = dict(flaming_global_functions=2, flaming_layer_functions=2)
# one config per feature, and the combinations where features meet (nGPT over the others)
COMBOS = {
    "diff-matched": dict(diff_attention="matched"),
    "diff-expressive": dict(diff_attention="expressive"),
    "diff-v2": dict(diff_attention="v2"),
    "diff-v2+flaming-mlp": dict(diff_attention="v2", flaming_moe="mlp", **FLAMING),
    "flaming-between": dict(flaming_moe="between", **FLAMING, flaming_layer_kind="swiglu"),
    "flaming-mlp": dict(flaming_moe="mlp", **FLAMING, flaming_global_kind="lowrank"),
    "ngpt": dict(ngpt=True),
    "ngpt+flaming-between": dict(ngpt=True, flaming_moe="between", **FLAMING),
    "all, flaming-mlp": dict(ngpt=True, diff_attention="matched", flaming_moe="mlp", **FLAMING),
}
HOOKS = [name for name, v in vars(Feature).items() if inspect.isfunction(v) and name not in ("enabled", "off")]


def test_registry_holds_the_three_features_in_hook_order():
    assert list(FEATURES) == ["diff_attention", "flaming_moe", "ngpt"]  # nGPT rewrites the others' layer
    assert all(isinstance(f, Feature) and f.name == name for name, f in FEATURES.items())
    assert active(NeonConfig(**TINY)) == []
    assert [f.name for f in active(NeonConfig(**TINY, **COMBOS["all, flaming-mlp"]))] == list(FEATURES)


def test_every_hook_is_provided_by_some_feature():
    """A hook no feature overrides is dead contract; one every feature leaves alone is a default."""
    used = {h for f in FEATURES.values() for h in HOOKS if getattr(type(f), h) is not getattr(Feature, h)}
    assert used == set(HOOKS)


def test_feature_fields_are_the_neon_config_fields():
    """Each NeonConfig field past TransformerConfig is Mistral's or owned by exactly one feature."""
    own = [name for f in FEATURES.values() for name in f.fields]
    assert len(own) == len(set(own))
    megatron = {f.name for f in dataclasses.fields(TransformerConfig)}
    neon_fields = {f.name for f in dataclasses.fields(NeonConfig)} - megatron
    assert neon_fields == MISTRAL_FIELDS | set(own)
    assert all(f.name in f.fields and set(f.hf_fields) <= set(f.fields) for f in FEATURES.values())


def test_hf_config_carries_the_hf_fields_with_the_same_defaults():
    """The HF files cannot import the registry (they travel with exported models): this ties them."""
    hf_fields = [name for f in FEATURES.values() for name in f.hf_fields]
    written_by_export = {"flaming_io_sources"}  # the IO sources' identities (neon/conversion/convert.py)
    mistral = set(inspect.get_annotations(NeonHFConfig)) - set(hf_fields) - written_by_export
    assert not {n for n in mistral if n.startswith(("diff_", "ngpt", "flaming_"))}
    defaults = {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
                for f in dataclasses.fields(NeonConfig)}
    assert {n: getattr(NeonHFConfig(), n) for n in hf_fields} == {n: defaults[n] for n in hf_fields}


def test_hf_reference_names_resolve_in_modeling_neon():
    for f in FEATURES.values():
        assert f.hf_reference, f.name
        for ref in f.hf_reference:
            obj = modeling_neon
            for part in ref.split("."):
                obj = getattr(obj, part)  # AttributeError names the stale reference


@pytest.mark.parametrize("bad,setting", [
    (dict(diff_attention="twice"), "diff_attention='twice'"),
    (dict(flaming_moe="between", flaming_topk=0, flaming_layer_functions=2), "flaming_topk=0"),
    (dict(ngpt=True, qk_layernorm=True), "qk_layernorm=True"),
])
def test_each_feature_validates_through_neon_config(bad, setting):
    with pytest.raises(ConfigError, match=setting):
        NeonConfig(**TINY, **bad)


def test_configure_runs_around_megatron_checks():
    assert NeonConfig(**TINY, ngpt=True).init_method_std == pytest.approx(64 ** -0.5)
    assert NeonConfig(**TINY).init_method_std == TransformerConfig.init_method_std
    # FlamingMoE: megatron-core refuses EP without MoE MLPs, the config keeps the EP size after them
    cfg = NeonConfig(**TINY, flaming_moe="mlp", flaming_layer_functions=4, expert_model_parallel_size=2)
    assert cfg.expert_model_parallel_size == 2 and cfg.has_cond_embedder is False
    assert NeonConfig(**TINY, flaming_moe="mlp", **FLAMING).has_cond_embedder is True


def test_recipes_name_real_run_config_fields():
    sections = {f.name: f.default_factory for f in dataclasses.fields(Config)
                if f.default_factory is not dataclasses.MISSING}  # section name -> its dataclass
    cfg = NeonConfig(**TINY, **COMBOS["all, flaming-mlp"])
    got = recipes(cfg)
    assert got and [name for name, _ in got] == ["ngpt"]
    for name, recipe in got:
        for section, values in recipe.items():
            assert section in sections, (name, section)
            real = {f.name for f in dataclasses.fields(sections[section]())}
            assert set(values) <= real, (name, section, set(values) - real)
    assert recipes(NeonConfig(**TINY)) == []
    section = Config().model  # the run config's model section works as well as a NeonConfig
    assert recipes(section) == []
    section.ngpt = True
    assert recipes(section) == got
    assert dict(got)["ngpt"] == {"model": {"ngpt_alpha_sz_scale": "inv_d"},
                                 "optimizer": {"weight_decay": 0.0, "lr": 1e-2, "min_lr": 1e-3},
                                 "schedule": {"lr_warmup_iters": 0}}


def test_flops_count_every_combination():
    """The count runs for every combination (hand counts per variant: tests/neon/training/test_flops.py),
    and the full-attention convention never counts less than the half one."""
    for name, combo in COMBOS.items():
        cfg = NeonConfig(**TINY, **combo)
        half, full = training_flops_per_token(cfg, 32), training_flops_per_token(cfg, 32, causal="full")
        assert 0 < half < full, name


def _build_and_map(combos: dict) -> dict:
    """Per combination: the built model's tensor names, the names hf_to_megatron gives for the HF
    reference's state dict, and whether megatron_to_hf gives the HF state dict back exactly."""
    from neon.hf.modeling_neon import NeonForCausalLM
    from neon.model import build_model
    from neon.state_dict_adapter import hf_to_megatron, megatron_to_hf, neon_hf_config

    out = {}
    for name, combo in combos.items():
        cfg = NeonConfig(**TINY, **combo, pipeline_dtype=torch.float32)
        model = build_model(cfg)
        built = {k for k, v in model.state_dict().items() if torch.is_tensor(v) and "_extra_state" not in k}
        hf = NeonForCausalLM(neon_hf_config(cfg)).state_dict()
        mg = hf_to_megatron(hf, cfg)
        shapes_match = all(mg[k].shape == model.state_dict()[k].shape for k in mg if k in built)
        back = megatron_to_hf([mg], cfg)
        out[name] = dict(built=built, mapped=set(mg), shapes=shapes_match, hf=set(hf), back=set(back),
                         exact=all(torch.equal(back[k], hf[k]) for k in back),
                         logit_scale=hasattr(model, "logit_scale"),
                         bank=hasattr(model, "flaming_global_functions"),
                         final_norm=model.decoder.final_layernorm is not None,
                         layer=type(model.decoder.layers[0]).__name__,
                         attention=type(model.decoder.layers[0].self_attention).__name__)
    return out


@pytest.mark.slow
def test_layer_spec_attach_and_hf_mapping_cover_every_combination():
    """Whatever features meet, the mapping names exactly the built model's tensors, both ways."""
    results = run_distributed(_build_and_map, 1, kwargs={"combos": COMBOS}, timeout=300)[0]
    for name, r in results.items():
        assert r["mapped"] == r["built"] and r["shapes"], (name, r["mapped"] ^ r["built"])
        assert r["back"] == r["hf"] and r["exact"], (name, r["back"] ^ r["hf"])
        combo = COMBOS[name]
        assert r["logit_scale"] == (not r["final_norm"]) == combo.get("ngpt", False), name
        assert r["bank"] == ("flaming_moe" in combo), name
        assert (r["layer"] == "FlamingTransformerLayer") == (combo.get("flaming_moe") == "between"), name
        mode = combo.get("diff_attention")
        want = {None: "SelfAttention", "v2": "DiffV2SelfAttention"}.get(mode, "DiffSelfAttention")
        assert r["attention"] == want, name


# --- generic code imports no feature ---------------------------------------------------------------
GENERIC = ["neon/training", "neon/ablation", "neon/conversion", "neon/model.py"]
FEATURE_MODULES = ("neon.flaming", "neon.ngpt", "neon.ngpt_optimizer", "neon.diff_attention", "neon.diff_attention_v2")


def feature_imports(source: str, package: str) -> list[str]:
    """The imports of a feature's own module (not through neon.features) in `source`."""
    from tests.megatron_plugins.test_import_boundary import imported_names

    return sorted({f"line {line}: {name}" for line, name in imported_names(source, package)
                   if any(name == m or name.startswith(m + ".") for m in FEATURE_MODULES)})


def test_generic_code_imports_no_feature():
    """neon/training/, neon/ablation/, neon/conversion/ and neon/model.py reach features only
    through the registry (neon.features): they call hooks, they never import a feature's code."""
    root = Path(__file__).resolve().parents[2]
    files = [p for g in GENERIC for p in ([root / g] if g.endswith(".py") else sorted((root / g).rglob("*.py")))]
    assert len(files) > 30, files
    bad = {}
    for path in files:
        rel = path.relative_to(root)
        found = feature_imports(path.read_text(), ".".join(rel.parent.parts))
        if found:
            bad[str(rel)] = found
    assert not bad, f"generic code imports a feature's module (ask neon.features instead): {bad}"


@pytest.mark.parametrize("source", [
    "from neon.flaming.losses import set_aux_loss_scale",
    "import neon.ngpt_optimizer",
    "def f():\n    from neon.diff_attention import diff_layout",
    "from neon import flaming",
    "from ..flaming.io import token_context",  # relative, from neon.training
    "import importlib\nimportlib.import_module('neon.ngpt')",
])
def test_the_generic_import_check_flags_a_feature_module(source):
    assert feature_imports(source, "neon.training"), source


@pytest.mark.parametrize("source", ["from neon.features import active", "from neon.flops import attention_keys",
                                    "import neon.flamingo", "from neon.config import NeonConfig"])
def test_the_generic_import_check_passes_the_registry(source):
    assert not feature_imports(source, "neon.training"), source


@pytest.mark.parametrize("first", ["neon.attention", "neon.diff_attention_v2", "neon.ngpt_optimizer", "neon.flaming",
                                   "neon.features.flaming", "neon.config"])
def test_any_module_can_be_imported_first(first):
    """Importing neon.config registers the built-in features (their settings are NeonConfig's
    fields), and the features' modules import neon.config: whichever comes first, both complete."""
    import subprocess
    import sys

    code = (f"import {first}\nfrom neon.config import NeonConfig\n"
            "c = NeonConfig(num_layers=2, hidden_size=64, num_attention_heads=8, diff_attention='matched', ngpt=True)\n"
            "assert c.diff_attention == 'matched' and c.flaming_moe == 'off'")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
