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
- linear_fc1 is [gate; up] on every rank, each half sharded.
- Row-parallel weights (linear_proj, linear_fc2) are split along the input dimension.
- Embedding and output layer are split along the vocabulary.
"""

from __future__ import annotations

import re

import torch

from neon.config import NeonConfig
from neon.diff_attention import diff_layout
from neon.hf.configuration_neon import NeonHFConfig

# HF name (within a layer) -> megatron name (within a layer), for tensors mapped one-to-one.
# Each entry: (hf suffix, megatron suffix, split dim under TP or None for replicated)
LAYER_DIRECT = [
    ("input_layernorm.weight", "input_layernorm.weight", None),
    ("post_attention_layernorm.weight", "pre_mlp_layernorm.weight", None),
    ("self_attn.o_proj.weight", "self_attention.linear_proj.weight", 1),
    ("mlp.down_proj.weight", "mlp.linear_fc2.weight", 1),
]
DIFF_LAYER_DIRECT = [
    (f"self_attn.{name}", f"self_attention.core_attention.{name}", None)
    for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2", "subln.weight")
]
GLOBAL_DIRECT = [
    ("model.embed_tokens.weight", "embedding.word_embeddings.weight", 0, "pre"),
    ("model.norm.weight", "decoder.final_layernorm.weight", None, "post"),
    ("lm_head.weight", "output_layer.weight", 0, "post"),
]


def _chunk(t: torch.Tensor, dim, rank: int, size: int) -> torch.Tensor:
    return t if dim is None else torch.chunk(t, size, dim=dim)[rank].clone()


def _layer_direct(config: NeonConfig) -> list:
    return LAYER_DIRECT + (DIFF_LAYER_DIRECT if config.diff_attention != "off" else [])


def _qkv_split(config: NeonConfig) -> tuple[int, list[int]]:
    """(key/value groups, [q rows, k rows, v rows] of one group) of linear_qkv."""
    if config.diff_attention != "off":
        lay = diff_layout(config)
        r = lay.heads // lay.groups
        return lay.groups, [r * 2 * lay.qk_dim, 2 * lay.qk_dim, lay.v_dim]
    groups, d = config.num_query_groups or config.num_attention_heads, config.head_dim
    return groups, [config.num_attention_heads // groups * d, d, d]


def _qkv_groups(config: NeonConfig, q, k, v) -> torch.Tensor:
    """HF q/k/v -> [groups, q rows + k rows + v rows of a group, hidden]."""
    groups, _ = _qkv_split(config)
    return torch.cat([t.view(groups, -1, t.size(-1)) for t in (q, k, v)], dim=1)


def hf_to_megatron(hf: dict, config: NeonConfig, tp_rank: int = 0, tp_size: int = 1,
                   layer_offset: int = 0, num_layers: int | None = None,
                   pre_process: bool = True, post_process: bool = True) -> dict:
    """State dict of one megatron (TP rank, PP stage) from a full HF state dict."""
    num_layers = config.num_layers if num_layers is None else num_layers
    out = {}
    for hf_name, mg_name, dim, where in GLOBAL_DIRECT:
        wanted = pre_process if where == "pre" else post_process
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            wanted = False  # the tied output layer reuses the embedding
        if wanted:
            out[mg_name] = _chunk(hf[hf_name], dim, tp_rank, tp_size)
    for local in range(num_layers):
        src, dst = f"model.layers.{local + layer_offset}.", f"decoder.layers.{local}."
        for hf_suffix, mg_suffix, dim in _layer_direct(config):
            out[dst + mg_suffix] = _chunk(hf[src + hf_suffix], dim, tp_rank, tp_size)
        qkv = _qkv_groups(config, *(hf[src + f"self_attn.{p}_proj.weight"] for p in "qkv"))
        out[dst + "self_attention.linear_qkv.weight"] = (
            _chunk(qkv, 0, tp_rank, tp_size).flatten(0, 1))
        gate, up = hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [_chunk(gate, 0, tp_rank, tp_size), _chunk(up, 0, tp_rank, tp_size)])
    return out


def megatron_to_hf(shards: list[dict], config: NeonConfig, layer_offset: int = 0) -> dict:
    """Full HF state dict entries of one pipeline stage from its TP shards (rank order)."""
    first = shards[0]
    out = {}

    def join(name, dim):
        return first[name] if dim is None else torch.cat([s[name] for s in shards], dim=dim)

    for hf_name, mg_name, dim, _ in GLOBAL_DIRECT:
        if mg_name in first:
            out[hf_name] = join(mg_name, dim)
    layers = sorted({int(m.group(1)) for k in first
                     if (m := re.match(r"decoder\.layers\.(\d+)\.", k))})
    groups, rows = _qkv_split(config)
    for local in layers:
        src, dst = f"decoder.layers.{local}.", f"model.layers.{local + layer_offset}."
        for hf_suffix, mg_suffix, dim in _layer_direct(config):
            out[dst + hf_suffix] = join(src + mg_suffix, dim)
        qkv = join(src + "self_attention.linear_qkv.weight", 0).view(groups, sum(rows), -1)
        q, k, v = torch.split(qkv, rows, dim=1)
        for p, t in zip("qkv", (q, k, v)):
            out[dst + f"self_attn.{p}_proj.weight"] = t.reshape(-1, t.size(-1)).clone()
        halves = [torch.chunk(s[src + "mlp.linear_fc1.weight"], 2) for s in shards]
        out[dst + "mlp.gate_proj.weight"] = torch.cat([h[0] for h in halves])
        out[dst + "mlp.up_proj.weight"] = torch.cat([h[1] for h in halves])
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
    """The Hugging Face NeonHFConfig of a Neon model (Mistral fields plus the Neon switches)."""
    return NeonHFConfig(**mistral_hf_config(config), diff_attention=config.diff_attention,
                        diff_lambda_init=config.diff_lambda_init, ngpt=config.ngpt, **overrides)
