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
- FlamingMoE: HF `<block>.global_router` / `<block>.layer_router` are megatron's
  `<block>.global_bank.router` / `<block>.layer_bank.router` (<block>: `flaming` / `flaming_moe`
  between attention and MLP, `mlp` in its place); function g of a bank of n is local function
  g - ep_rank * n / EP of expert-parallel rank g // (n / EP) (`layer_bank.experts.local_experts.j`,
  the model-level `flaming_global_functions.local_experts.j` on every pipeline stage); a SwiGLU
  function's linear_fc1 is [gate; up]. Functions and routers are replicated over TP.
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
# nGPT (neon/ngpt.py): no RMSNorm weights; the scaling vectors, stored values as they are.
NGPT_NORMS = {"input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight"}
NGPT_LAYER = [
    ("attn_alpha", "self_attn_bda.alpha", None),             # alpha_A [d_model]
    ("mlp_alpha", "mlp_bda.alpha", None),                    # alpha_M [d_model]
    ("self_attn.s_qk", "self_attention.core_attention.s_qk", 0),  # [heads * head_dim]
    ("mlp.s_u", "mlp.s_u", 0),                               # [ffn]
    ("mlp.s_v", "mlp.s_v", 0),                               # [ffn]
]
NGPT_GLOBAL = [("lm_head.s_z", "logit_scale.s_z", 0, "post")]  # [vocab]
NGPT_FLAMING_ALPHA = ("flaming_alpha", "flaming_bda.alpha", None)  # alpha_F [d_model] (FlamingMoE 'between')


def _layer_direct(config: NeonConfig) -> list:
    direct = LAYER_DIRECT + (DIFF_LAYER_DIRECT if config.diff_attention != "off" else [])
    if config.flaming_moe == "between":
        direct = direct + [("pre_flaming_layernorm.weight", "pre_flaming_layernorm.weight", None)]
    if config.ngpt:
        direct = [e for e in direct if e[0] not in NGPT_NORMS] + NGPT_LAYER
        if config.flaming_moe == "between":  # no pre-norm; alpha_F of the normalized update
            direct = [e for e in direct if not e[0].startswith("pre_flaming")] + [NGPT_FLAMING_ALPHA]
    if config.flaming_moe == "mlp":  # no MLP: the FlamingMoE block takes its place (alpha_M stays)
        direct = [e for e in direct if not e[0].startswith("mlp.")]
    return direct


def _global_direct(config: NeonConfig) -> list:
    if not config.ngpt:
        return GLOBAL_DIRECT
    return [e for e in GLOBAL_DIRECT if e[0] not in NGPT_NORMS] + NGPT_GLOBAL


def _chunk(t: torch.Tensor, dim, rank: int, size: int) -> torch.Tensor:
    return t if dim is None else torch.chunk(t, size, dim=dim)[rank].clone()


# FlamingMoE function parameters per kind: (HF names, joined along dim 0) -> megatron name
FUNCTION_PARAMS = {
    "linear": [(("proj.weight",), "linear.weight")],
    "swiglu": [(("gate_proj.weight", "up_proj.weight"), "linear_fc1.weight"),
               (("down_proj.weight",), "linear_fc2.weight")],
    "lowrank": [(("in_proj.weight",), "linear_fc1.weight"), (("out_proj.weight",), "linear_fc2.weight")],
}


def _flaming_block(config: NeonConfig) -> tuple[str, str]:
    """(megatron, HF) prefix of the FlamingMoE block within a layer."""
    return ("flaming_moe.", "flaming.") if config.flaming_moe == "between" else ("mlp.", "mlp.")


def _functions_to_megatron(hf: dict, hf_prefix: str, mg_prefix: str, kind: str, n: int,
                           ep_rank: int, ep_size: int, out: dict) -> None:
    local = n // ep_size
    for j in range(local):
        g = ep_rank * local + j
        for hf_names, mg_name in FUNCTION_PARAMS[kind]:
            out[f"{mg_prefix}local_experts.{j}.{mg_name}"] = torch.cat(
                [hf[f"{hf_prefix}{g}.{h}"] for h in hf_names]).clone()


def _functions_to_hf(expert_shards: list[dict], mg_prefix: str, hf_prefix: str, kind: str, n: int,
                     out: dict) -> None:
    local = n // len(expert_shards)
    for r, sd in enumerate(expert_shards):
        for j in range(local):
            for hf_names, mg_name in FUNCTION_PARAMS[kind]:
                parts = torch.chunk(sd[f"{mg_prefix}local_experts.{j}.{mg_name}"], len(hf_names))
                for h, t in zip(hf_names, parts):
                    out[f"{hf_prefix}{r * local + j}.{h}"] = t.clone()


def _flaming_to_megatron(hf: dict, config: NeonConfig, src: str, dst: str, ep_rank: int, ep_size: int,
                         out: dict) -> None:
    mg_blk, hf_blk = _flaming_block(config)
    for bank, n in (("global", config.flaming_global_functions), ("layer", config.flaming_layer_functions)):
        if n:
            out[f"{dst}{mg_blk}{bank}_bank.router.weight"] = hf[f"{src}{hf_blk}{bank}_router.weight"].clone()
    if config.flaming_layer_functions:
        _functions_to_megatron(hf, f"{src}{hf_blk}layer_functions.", f"{dst}{mg_blk}layer_bank.experts.",
                               config.flaming_layer_kind, config.flaming_layer_functions, ep_rank, ep_size, out)


def _flaming_to_hf(first: dict, expert_shards: list[dict], config: NeonConfig, src: str, dst: str,
                   out: dict) -> None:
    mg_blk, hf_blk = _flaming_block(config)
    for bank, n in (("global", config.flaming_global_functions), ("layer", config.flaming_layer_functions)):
        if n:
            out[f"{dst}{hf_blk}{bank}_router.weight"] = first[f"{src}{mg_blk}{bank}_bank.router.weight"]
    if config.flaming_layer_functions:
        _functions_to_hf(expert_shards, f"{src}{mg_blk}layer_bank.experts.", f"{dst}{hf_blk}layer_functions.",
                         config.flaming_layer_kind, config.flaming_layer_functions, out)


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
                   pre_process: bool = True, post_process: bool = True,
                   ep_rank: int = 0, ep_size: int = 1) -> dict:
    """State dict of one megatron (TP rank, PP stage, EP rank) from a full HF state dict."""
    num_layers = config.num_layers if num_layers is None else num_layers
    flaming = config.flaming_moe != "off"
    out = {}
    if flaming and config.flaming_global_functions:  # a replica on every pipeline stage
        _functions_to_megatron(hf, "model.flaming_global_functions.", "flaming_global_functions.",
                               config.flaming_global_kind, config.flaming_global_functions, ep_rank, ep_size, out)
    for hf_name, mg_name, dim, where in _global_direct(config):
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
        if flaming:
            _flaming_to_megatron(hf, config, src, dst, ep_rank, ep_size, out)
        if config.flaming_moe == "mlp":
            continue
        gate, up = hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [_chunk(gate, 0, tp_rank, tp_size), _chunk(up, 0, tp_rank, tp_size)])
    return out


def megatron_to_hf(shards: list[dict], config: NeonConfig, layer_offset: int = 0,
                   expert_shards: list[dict] | None = None) -> dict:
    """Full HF state dict entries of one pipeline stage from its TP shards (rank order).

    `expert_shards`: the stage's state dicts of every expert-parallel rank (EP order), for the
    FlamingMoE functions; None when EP = 1."""
    first = shards[0]
    expert_shards = expert_shards or [first]
    flaming = config.flaming_moe != "off"
    out = {}
    if flaming and config.flaming_global_functions:
        _functions_to_hf(expert_shards, "flaming_global_functions.", "model.flaming_global_functions.",
                         config.flaming_global_kind, config.flaming_global_functions, out)

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
        for hf_suffix, mg_suffix, dim in _layer_direct(config):
            out[dst + hf_suffix] = join(src + mg_suffix, dim)
        qkv = join(src + "self_attention.linear_qkv.weight", 0).view(groups, sum(rows), -1)
        q, k, v = torch.split(qkv, rows, dim=1)
        for p, t in zip("qkv", (q, k, v)):
            out[dst + f"self_attn.{p}_proj.weight"] = t.reshape(-1, t.size(-1)).clone()
        if flaming:
            _flaming_to_hf(first, expert_shards, config, src, dst, out)
        if config.flaming_moe == "mlp":
            continue
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
    flaming = {name: getattr(config, name) for name in FLAMING_HF_FIELDS}
    return NeonHFConfig(**mistral_hf_config(config), diff_attention=config.diff_attention,
                        diff_lambda_init=config.diff_lambda_init, ngpt=config.ngpt, **flaming, **overrides)


FLAMING_HF_FIELDS = ("flaming_moe", "flaming_global_functions", "flaming_layer_functions", "flaming_global_kind",
                     "flaming_layer_kind", "flaming_ffn_hidden_size", "flaming_lowrank_rank", "flaming_router",
                     "flaming_topk", "flaming_gumbel_temperature", "flaming_identity")
