"""Neon checkpoint <-> Hugging Face directory, through neon/state_dict_adapter.py.

Export converts and writes one safetensors shard at a time from the loaded TP1 model (the model
plus one shard in memory, never the model twice); import reads the HF tensors of one layer at a
time and copies them into the built model's parameters.

A model with every Neon feature off is written as transformers' MistralForCausalLM (model_type
"mistral", no remote code); otherwise as NeonForCausalLM (model_type "neon", the modeling code
copied next to the weights, trust_remote_code=True).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import yaml
from tqdm import tqdm

from neon.config import NeonConfig
from neon.conversion import hf_dir, neon_checkpoint
from neon.conversion.errors import ConversionError
from neon.errors import ConfigError
from neon.features import FEATURES, active
from neon.state_dict_adapter import hf_to_megatron, megatron_to_hf, mistral_hf_config, neon_hf_config

LAYER = re.compile(r"decoder\.layers\.(\d+)\.")


# --- which Hugging Face class -----------------------------------------------------------------


def is_plain_mistral(config: NeonConfig) -> bool:
    """No Neon feature on and no MoE: transformers' MistralForCausalLM computes this model."""
    return not config.num_moe_experts and not active(config)


def unsupported_settings(config: NeonConfig) -> list[str]:
    """Model settings that neither MistralForCausalLM nor NeonForCausalLM computes."""
    checks = [("normalization", "RMSNorm"), ("add_bias_linear", False), ("add_qkv_bias", False),
              ("gated_linear_unit", True), ("qk_layernorm", False)]
    return [f"{name}={getattr(config, name)!r} (supported: {want!r})" for name, want in checks
            if hasattr(config, name) and getattr(config, name) != want]


def feature_config_extra(model, config: NeonConfig) -> dict:
    """What each active feature adds to the exported config from the built model
    (`Feature.hf_config_extra`; FlamingMoE: its IO sources' identities, checked again at load)."""
    extra = {}
    for feature in active(config):
        extra.update(feature.hf_config_extra(model, config))
    return extra


def feature_code(config: NeonConfig) -> dict[str, str]:
    """The files each active feature ships with the exported modeling code (`Feature.hf_code`)."""
    code = {}
    for feature in active(config):
        code.update(feature.hf_code(config))
    return code


def hf_config_for(config: NeonConfig, dtype: torch.dtype, token_ids: dict, extra: Optional[dict] = None):
    """(transformers config, model class) of the exported model."""
    if is_plain_mistral(config):
        from transformers import MistralConfig, MistralForCausalLM

        hf_config = MistralConfig(**mistral_hf_config(config), **token_ids)
        hf_config.architectures = ["MistralForCausalLM"]
        cls = MistralForCausalLM
    else:
        from neon.hf import NeonForCausalLM

        hf_config = neon_hf_config(config, **token_ids, **(extra or {}))
        hf_config.architectures = ["NeonForCausalLM"]
        hf_config.auto_map = {"AutoConfig": "configuration_neon.NeonHFConfig",
                              "AutoModelForCausalLM": "modeling_neon.NeonForCausalLM"}
        cls = NeonForCausalLM
    hf_config.dtype = dtype
    return hf_config, cls


# --- export ---------------------------------------------------------------------------------


def megatron_units(model) -> dict[Optional[int], dict]:
    """The model's tensors grouped by decoder layer (None: the model-level ones: embedding, final
    norm, output layer, FlamingMoE's global function bank)."""
    units: dict[Optional[int], dict] = {}
    for name, t in model.state_dict().items():
        if not torch.is_tensor(t) or name.endswith("_extra_state"):
            continue
        m = LAYER.match(name)
        units.setdefault(int(m.group(1)) if m else None, {})[name] = t
    return units


def unit_to_hf(config: NeonConfig, layer: Optional[int], units: dict) -> dict:
    """HF tensors of one unit. A layer is renamed to local layer 0 and mapped with its offset,
    next to the model-level tensors (the mapping may read them, e.g. FlamingMoE's global bank);
    only the layer's own HF tensors are kept."""
    if layer is None:
        return megatron_to_hf([units[None]], config)
    prefix = f"decoder.layers.{layer}."
    local = {"decoder.layers.0." + k[len(prefix):]: v for k, v in units[layer].items()}
    out = megatron_to_hf([{**units.get(None, {}), **local}], config, layer_offset=layer)
    return {k: v for k, v in out.items() if k.startswith(f"model.layers.{layer}.")}


def _hf_order(name: str):
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if name.startswith("model.embed_tokens"):
        return (0, 0, name)
    return (1, int(m.group(1)), name) if m else (2, 0, name)


def saved_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The model's parameters and persistent buffers (a learned store's key snapshot), each once."""
    tensors = {id(p): p for p in model.parameters()}
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                tensors[id(buffer)] = buffer
    return list(tensors.values())


def check_against_hf_model(plan: dict, hf_config, cls) -> None:
    """The planned tensors are exactly the HF model's (names and shapes), checked on the meta device."""
    with torch.device("meta"):
        skeleton = cls(hf_config)
    want = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if hf_config.tie_word_embeddings:
        want.pop("lm_head.weight", None)
    have = {k: tuple(v.shape) for k, v in plan.items()}
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or unexpected or wrong:
        raise ConversionError(f"unknown architecture: the converted tensors do not match {cls.__name__}: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}. The weight "
                              f"mapping (neon/state_dict_adapter.py) does not cover this model's features.")


def export_to_hf(load: str | os.PathLike, save: str | os.PathLike, iteration: Optional[int] = None,
                 tokenizer_model: Optional[str] = None, with_tokenizer: bool = True,
                 max_shard_size: int | str = "5GB", overwrite: bool = False, progress: bool = True) -> Path:
    ckpt = neon_checkpoint.locate(load, iteration)
    staging = hf_dir.Staging(save, overwrite=overwrite)
    run = ckpt.run_config
    token_ids, tok = {}, None
    if with_tokenizer:  # checked before the model is loaded
        data = run.get("data") or {}
        tok_path = tokenizer_model or data.get("tokenizer_model")
        tok = hf_dir.load_tokenizer(tok_path, None if tokenizer_model else data.get("tokenizer_type"))
        multiple = (data.get("make_vocab_size_divisible_by", 128)
                    * (run.get("parallelism") or {}).get("tensor_model_parallel_size", 1))
        hf_dir.check_vocab(tok, tok_path, run["model"]["vocab_size"], multiple)
        token_ids = hf_dir.special_ids(tok)
    _, config = neon_checkpoint.one_process_config(run)
    problems = unsupported_settings(config)
    if problems:
        raise ConversionError(f"unknown architecture: {', '.join(problems)} has no Hugging Face equivalent in "
                              f"MistralForCausalLM / NeonForCausalLM. Fix: export only models trained with "
                              f"Mistral's settings for these.")

    model, _, config = neon_checkpoint.load_model(ckpt)
    units = megatron_units(model)
    params = sum(t.numel() for t in saved_tensors(model))
    plan, unit_of = {}, {}
    meta_units = {layer: {k: torch.empty_like(v, device="meta") for k, v in tensors.items()}
                  for layer, tensors in units.items()}
    for layer in units:
        meta = unit_to_hf(config, layer, meta_units)
        for name, t in meta.items():
            unit_of[name] = layer
            plan[name] = t
    plan = {k: plan[k] for k in sorted(plan, key=_hf_order)}
    dtype = next(model.parameters()).dtype
    hf_config, cls = hf_config_for(config, dtype, token_ids, feature_config_extra(model, config))
    check_against_hf_model(plan, hf_config, cls)
    if sum(t.numel() for t in plan.values()) != params:
        raise ConversionError(f"unknown architecture: the model has {params} parameters and persistent buffers, "
                              f"the converted tensors {sum(t.numel() for t in plan.values())}. The weight mapping "
                              f"does not cover every tensor of this model's features.")

    cache: dict = {}

    def produce(names):
        out = {}
        for name in names:
            layer = unit_of[name]
            if layer not in cache:
                cache.clear()  # one unit converted at a time (a unit can span two shards)
                with torch.no_grad():
                    cache[layer] = unit_to_hf(config, layer, units)
            out[name] = cache[layer][name]
        return out

    with staging as tmp:
        hf_dir.write_safetensors(tmp, plan, produce, max_shard_size=max_shard_size, progress=progress)
        cache.clear()
        hf_config.save_pretrained(str(tmp))
        if not is_plain_mistral(config):
            hf_dir.copy_modeling_code(tmp, feature_code(config))
        from transformers import GenerationConfig

        GenerationConfig(**{k: v for k, v in token_ids.items() if v is not None}).save_pretrained(str(tmp))
        if with_tokenizer:
            hf_dir.write_tokenizer(tok, tmp)
    return Path(save)


# --- import ---------------------------------------------------------------------------------


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise ConversionError(f"config.json: rope_type={rope_type!r} is not supported (Neon uses plain RoPE). Fix: "
                              f"import a model with default rotary embeddings.")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def neon_settings(hf: dict, where: Path) -> dict:
    """Neon model settings (the `model` section of pretrain_neon.py's config) of an HF config.json."""
    model_type = hf.get("model_type")
    if model_type not in ("mistral", "neon"):
        raise ConversionError(f"{where}: unknown architecture model_type={model_type!r}. Fix: import a Mistral "
                              f"(model_type 'mistral') or Neon (model_type 'neon') model.")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported (Neon's MLP is SwiGLU). "
                              f"Fix: import a model with hidden_act 'silu'.")
    heads = hf["num_attention_heads"]
    settings = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], ffn_hidden_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_position_embeddings=hf["max_position_embeddings"], layernorm_epsilon=hf.get("rms_norm_eps", 1e-5),
        rope_theta=_rope_theta(hf), sliding_window=hf.get("sliding_window"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
    if model_type == "neon":  # the Neon switches keep their names in NeonHFConfig
        settings.update({k: hf[k] for f in FEATURES.values() for k in f.hf_fields if k in hf})
    dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32").replace("torch.", "")
    settings.update(bf16=dtype == "bfloat16", fp16=dtype == "float16")
    return settings


class _Recording:
    """A mapping over HFWeights that remembers which tensors were read."""

    def __init__(self, weights: hf_dir.HFWeights):
        self.weights, self.read = weights, set()

    def __getitem__(self, name):
        self.read.add(name)
        return self.weights[name]

    def keys(self):
        return self.weights.keys()


def import_from_hf(hf_path: str | os.PathLike, save: str | os.PathLike, tensor_parallel: int = 1,
                   pipeline_parallel: int = 1, expert_parallel: int = 1, overwrite: bool = False,
                   progress: bool = True) -> Path:
    from neon.conversion.neon_checkpoint import one_process_config, save_weights, single_process
    from neon.model import build_model
    from neon.training import checkpointing
    from neon.training.config import from_dict

    hf_path, save = Path(hf_path), Path(save)
    config_file = hf_path / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"--hf {hf_path}: no config.json. Fix: give a Hugging Face model directory.")
    settings = neon_settings(json.loads(config_file.read_text()), config_file)
    weights = hf_dir.HFWeights(hf_path)
    run = {"model": settings, "parallelism": dict(tensor_model_parallel_size=tensor_parallel,
                                                  pipeline_model_parallel_size=pipeline_parallel,
                                                  expert_model_parallel_size=expert_parallel)}
    cfg = from_dict(run)
    try:
        cfg.neon_config()  # the requested layout can split this model
    except (ConfigError, ValueError, AssertionError) as e:
        raise ConversionError(f"--tensor-model-parallel-size {tensor_parallel} / --pipeline-model-parallel-size "
                              f"{pipeline_parallel}: cannot split this model ({e}).") from e
    sp_file = hf_path / "tokenizer.model"
    if sp_file.is_file():
        sp = hf_dir.load_sentencepiece(sp_file)
        if sp.GetPieceSize() > settings["vocab_size"]:
            raise ConversionError(f"{sp_file} has {sp.GetPieceSize()} pieces, more than the model's vocab_size "
                                  f"{settings['vocab_size']}: it is not this model's tokenizer. Fix: remove it or "
                                  f"put the model's tokenizer.model there.")
    if (save / checkpointing.TRACKER).exists() and not overwrite:
        raise ConversionError(f"--save {save}: already holds a Neon checkpoint. Fix: choose a new directory, or pass "
                              f"--overwrite.")
    if overwrite and save.is_dir():
        shutil.rmtree(save)

    single_process()
    _, config = one_process_config(cfg.to_dict())
    model = build_model(config)
    params = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v) and not k.endswith("_extra_state")}
    filled, source = set(), _Recording(weights)

    def copy(converted: dict, rename=lambda k: k):
        for name, t in converted.items():
            name = rename(name)
            if name not in params:
                raise ConversionError(f"unknown architecture: tensor {name} has no place in the Neon model")
            if params[name].shape != t.shape:
                raise ConversionError(f"{hf_path}: {name} has shape {tuple(t.shape)}, the model built from "
                                      f"config.json expects {tuple(params[name].shape)}. Fix: check config.json.")
            params[name].copy_(t)
            filled.add(name)

    with torch.no_grad():
        copy(hf_to_megatron(source, config, num_layers=0))
        for layer in tqdm(range(config.num_layers), desc="importing layers", disable=not progress):
            converted = hf_to_megatron(source, config, layer_offset=layer, num_layers=1,
                                       pre_process=False, post_process=False)
            copy(converted, lambda k, i=layer: k.replace("decoder.layers.0.", f"decoder.layers.{i}.", 1))
    missing = sorted(set(params) - filled)
    unused = sorted(k for k in set(weights.keys()) - source.read
                    if not (k == "lm_head.weight" and config.tie_word_embeddings))
    if missing or unused:
        raise ConversionError(f"unknown architecture: Neon parameters without HF tensor {missing[:5]}, HF tensors "
                              f"not imported {unused[:5]}. Fix: import a Mistral or Neon model whose config.json "
                              f"matches its weights.")
    weights.close()
    if sp_file.is_file():  # exporting the checkpoint (or one trained from it) finds its tokenizer
        cfg.data.tokenizer_model = str((save / "tokenizer.model").resolve())
    path = save_weights(save, model, cfg)
    if sp_file.is_file():
        shutil.copy(sp_file, save / "tokenizer.model")
    section = {"model": {**settings}, "parallelism": run["parallelism"]}
    (save / "model.yaml").write_text(
        "# Model settings of the imported Hugging Face model: pretrain_neon.py --config model.yaml --load <this dir>\n"
        + yaml.safe_dump(section, sort_keys=False))
    return path
