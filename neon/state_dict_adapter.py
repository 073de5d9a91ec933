"""Weight mapping between Hugging Face Mistral/Neon checkpoints and the megatron Neon model.

`hf_to_megatron` gives the state dict of one (tensor-parallel rank, pipeline stage) of the
megatron model; `megatron_to_hf` joins the tensor-parallel shards of one pipeline stage back.
Layer indices: HF uses global layer numbers, megatron the local index within a stage
(`layer_offset` is the stage's first global layer).

Megatron layouts that differ from HF's:
- linear_qkv rows are grouped per key/value group: [q heads of the group; k; v] for each group,
  and tensor parallelism hands each rank a contiguous run of groups. Under DiffAttention the
  groups are the differential key/value heads and each holds [Q1;Q2 of each of its heads]
  [K1; K2] [V] (HF q_proj/k_proj rows are already ordered (head, half), so the same regrouping
  serves every layout).
- DiffAttention's lambda vectors and per-head norm scale are replicated on every TP rank.
- DiffAttention V2's groups hold Mistral's [q heads; k; v] with twice the query heads, and its
  W_lambda (`lambda_proj`) is split by rows (heads) like the query heads.
- linear_fc1 is [gate; up] on every rank, each half sharded.
- Row-parallel weights (linear_proj, linear_fc2) are split along the input dimension.
- Embedding and output layer are split along the vocabulary.
- Each feature's tensors: its `hf_*` hooks in neon/features/ (FlamingMoE's functions and routers:
  neon/features/flaming.py).
"""

from __future__ import annotations

import re

import torch

from neon.config import NeonConfig
from neon.features import FEATURES, active
from neon.hf.configuration_neon import NeonHFConfig

# HF name (within a layer) -> megatron name (within a layer), for tensors mapped one-to-one.
# Each entry: (hf suffix, megatron suffix, split dim under TP or None for replicated); a tuple of
# HF names is their concatenation along dim 0 on each TP rank (neon/features/base.py: LayerEntry).
LAYER_DIRECT = [
    ("input_layernorm.weight", "input_layernorm.weight", None),
    ("post_attention_layernorm.weight", "pre_mlp_layernorm.weight", None),
    ("self_attn.o_proj.weight", "self_attention.linear_proj.weight", 1),
    (("mlp.gate_proj.weight", "mlp.up_proj.weight"), "mlp.linear_fc1.weight", 0),  # [gate; up]
    ("mlp.down_proj.weight", "mlp.linear_fc2.weight", 1),
]
GLOBAL_DIRECT = [
    ("model.embed_tokens.weight", "embedding.word_embeddings.weight", 0, "pre"),
    ("model.norm.weight", "decoder.final_layernorm.weight", None, "post"),
    ("lm_head.weight", "output_layer.weight", 0, "post"),
]


def _hf_names(entry) -> tuple[str, ...]:
    return entry[0] if isinstance(entry[0], tuple) else (entry[0],)


def _kept(entries: list, config: NeonConfig) -> list:
    """`entries` without those an active feature drops (nGPT's norms, the MLP FlamingMoE replaces)."""
    dropped = tuple(p for f in active(config) for p in f.hf_dropped(config))
    return [e for e in entries if not any(n.startswith(dropped) for n in _hf_names(e))]


def _layer_direct(config: NeonConfig) -> list:
    """Mistral's one-to-one layer tensors plus every active feature's, less the dropped ones."""
    return _kept(LAYER_DIRECT + [e for f in active(config) for e in f.hf_layer_tensors(config)], config)


def _global_direct(config: NeonConfig) -> list:
    return _kept(GLOBAL_DIRECT + [e for f in active(config) for e in f.hf_global_tensors(config)], config)


def _chunk(t: torch.Tensor, dim, rank: int, size: int) -> torch.Tensor:
    return t if dim is None else torch.chunk(t, size, dim=dim)[rank].clone()


def _qkv_split(config: NeonConfig) -> tuple[int, list[int]]:
    """(key/value groups, [q rows, k rows, v rows] of one group) of linear_qkv."""
    for feature in active(config):
        if (split := feature.qkv_split(config)) is not None:
            return split
    groups, d = config.num_query_groups or config.num_attention_heads, config.head_dim
    return groups, [config.num_attention_heads // groups * d, d, d]


def _qkv_groups(config: NeonConfig, q, k, v) -> torch.Tensor:
    """HF q/k/v -> [groups, q rows + k rows + v rows of a group, hidden]."""
    groups, _ = _qkv_split(config)
    return torch.cat([t.view(groups, -1, t.size(-1)) for t in (q, k, v)], dim=1)


def hf_to_megatron(hf: dict, config: NeonConfig, tp_rank: int = 0, tp_size: int = 1,
                   layer_offset: int = 0, num_layers: int | None = None,
                   pre_process: bool = True, post_process: bool = True,
                   ep_rank: int = 0, ep_size: int = 1) -> dict:
    """State dict of one megatron (TP rank, PP stage, EP rank) from a full HF state dict."""
    num_layers = config.num_layers if num_layers is None else num_layers
    features = active(config)
    out = {}
    for feature in features:
        feature.model_to_megatron(hf, config, ep_rank, ep_size, out)
    for hf_name, mg_name, dim, where in _global_direct(config):
        wanted = pre_process if where == "pre" else post_process
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            wanted = False  # the tied output layer reuses the embedding
        if wanted:
            out[mg_name] = _chunk(hf[hf_name], dim, tp_rank, tp_size)
    for local in range(num_layers):
        src, dst = f"model.layers.{local + layer_offset}.", f"decoder.layers.{local}."
        for entry in _layer_direct(config):
            out[dst + entry[1]] = torch.cat(
                [_chunk(hf[src + name], entry[2], tp_rank, tp_size) for name in _hf_names(entry)])
        qkv = _qkv_groups(config, *(hf[src + f"self_attn.{p}_proj.weight"] for p in "qkv"))
        out[dst + "self_attention.linear_qkv.weight"] = (
            _chunk(qkv, 0, tp_rank, tp_size).flatten(0, 1))
        for feature in features:
            feature.layer_to_megatron(hf, config, src, dst, ep_rank, ep_size, out)
    return out


def megatron_to_hf(shards: list[dict], config: NeonConfig, layer_offset: int = 0,
                   expert_shards: list[dict] | None = None) -> dict:
    """Full HF state dict entries of one pipeline stage from its TP shards (rank order).

    `expert_shards`: the stage's state dicts of every expert-parallel rank (EP order), for the
    FlamingMoE functions; None when EP = 1."""
    first = shards[0]
    expert_shards = expert_shards or [first]
    features = active(config)
    out = {}
    for feature in features:
        feature.model_to_hf(expert_shards, config, out)

    def join(name, dim):
        return first[name] if dim is None else torch.cat([s[name] for s in shards], dim=dim)

    for hf_name, mg_name, dim, _ in _global_direct(config):
        if mg_name in first:
            out[hf_name] = join(mg_name, dim)
    layers = sorted({int(m.group(1)) for k in first
                     if (m := re.match(r"decoder\.layers\.(\d+)\.", k))})
    groups, rows = _qkv_split(config)
    for local in layers:
        src, dst = f"decoder.layers.{local}.", f"model.layers.{local + layer_offset}."
        for entry in _layer_direct(config):
            names, mg_name, dim = _hf_names(entry), src + entry[1], entry[2]
            # each shard holds [part 1; part 2; ...] of its slice: join each part over the shards
            parts = [torch.chunk(s[mg_name], len(names)) for s in shards]
            for i, name in enumerate(names):
                out[dst + name] = parts[0][i] if dim is None else torch.cat([p[i] for p in parts], dim=dim)
        qkv = join(src + "self_attention.linear_qkv.weight", 0).view(groups, sum(rows), -1)
        q, k, v = torch.split(qkv, rows, dim=1)
        for p, t in zip("qkv", (q, k, v)):
            out[dst + f"self_attn.{p}_proj.weight"] = t.reshape(-1, t.size(-1)).clone()
        for feature in features:
            feature.layer_to_hf(first, expert_shards, config, src, dst, out)
    return out


def mistral_hf_config(config: NeonConfig) -> dict:
    """transformers.MistralConfig keyword arguments equal to a Neon config with features off."""
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups or config.num_attention_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.layernorm_epsilon,
        rope_theta=config.rope_theta,
        sliding_window=config.sliding_window,
        tie_word_embeddings=config.tie_word_embeddings,
        hidden_act="silu",
    )


def neon_hf_config(config: NeonConfig, **overrides) -> NeonHFConfig:
    """The Hugging Face NeonHFConfig of a Neon model (Mistral fields plus every feature's hf_fields)."""
    neon = {name: getattr(config, name) for f in FEATURES.values() for name in f.hf_fields}
    return NeonHFConfig(**mistral_hf_config(config), **neon, **overrides)
