"""nGPT, the normalized transformer (Loshchilov et al. 2024, arXiv 2410.01131), as megatron-core parts.

Every hidden state and every weight vector that lives in d_model space sits on the unit sphere:

    Norm(x) = x / ||x||_2                                  (no learned scale, no RMSNorm anywhere)
    h_A = Norm(ATTN(h));  h <- Norm(h + |alpha_A| (h_A - h))
    h_M = Norm(MLP(h));   h <- Norm(h + |alpha_M| (h_M - h))
    attention:  q <- Norm(q) s_qk,  k <- Norm(k) s_qk  per head, after RoPE; softmax scale sqrt(d)
    MLP:        u <- u s_u,  v <- v s_v sqrt(d_model);  SwiGLU = u * SiLU(v)
    logits:     z = E_out h,  z <- z s_z                  (one s_z entry per vocabulary item)

Each scaling vector s is stored at the value `scale` and used as s * (init / scale), which sets its
effective Adam learning rate (the paper's trick): alpha_A, alpha_M init 0.05 and s_z init 1, both at
scale 1/sqrt(d_model) (ngpt_alpha_sz_scale 'inv_sqrt_d', the paper's) or 1/d_model ('inv_d', the
recipe); s_qk init 1 scale 1/sqrt(d_model); s_u, s_v init 1 scale 1.

The pieces plug into the Neon layer spec (`ngpt_layer_spec`), never a fork of megatron code:
- the residual update is the layer's bias-dropout-add slot (`NormalizedResidual`), the norms
  before attention and MLP are IdentityOp and the block has no final norm;
- q/k normalisation wraps whatever core attention the spec holds (Neon's SDPA attention, TE's,
  another feature's; s_qk has `query_width` entries where the module declares it): RoPE is
  applied before core attention in megatron's SelfAttention;
- `NGPTMLP` is megatron's MLP with the scaled SwiGLU;
- `attach_logit_scale` gives the GPTModel `logit_scale.s_z`, applied to the output layer's logits.
Weight normalisation after each optimizer step lives in `neon/ngpt_optimizer.py`;
`mark_and_normalize_weights` tags the matrices it acts on and normalises them at build time.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from functools import cache, partial

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

from neon.config import NeonConfig

# (init, scale) of every scaling vector, from the paper / NVIDIA's reference code.
ALPHA_INIT = 0.05


def scaling_constants(config: NeonConfig) -> dict:
    """name -> (init, scale): the vector is stored at `scale`, used as stored * init / scale."""
    base = config.hidden_size ** -0.5
    moved = 1.0 / config.hidden_size if config.ngpt_alpha_sz_scale == "inv_d" else base  # alpha, s_z
    return {"alpha": (ALPHA_INIT, moved), "s_qk": (1.0, base), "s_u": (1.0, 1.0),
            "s_v": (1.0, 1.0), "s_z": (1.0, moved)}


def unit_norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Norm(x) = x / ||x||_2 along `dim`, computed in fp32, returned in x's dtype."""
    x32 = x.float()
    return (x32 / torch.linalg.vector_norm(x32, dim=dim, keepdim=True)).to(x.dtype)


def _scaling_vector(config: NeonConfig, name: str, size: int, tp_sharded: bool) -> torch.nn.Parameter:
    _, scale = scaling_constants(config)[name]
    p = torch.nn.Parameter(torch.full((size,), scale, dtype=config.params_dtype))
    if tp_sharded:  # one slice per tensor-parallel rank (heads, MLP width or vocabulary)
        tensor_parallel.set_tensor_model_parallel_attributes(p, True, 0, 1)
    return p


def _tp_sharded_vectors(module, names, prefix, sharded_offsets, metadata) -> dict:
    """Distributed-checkpoint entries of `module`'s own vectors `names`, split along dim 0 over
    tensor-parallel ranks (megatron's default treats a module's direct parameters as replicated)."""
    metadata = ensure_metadata_has_dp_cp_group(metadata)
    return make_sharded_tensors_for_checkpoint(
        {name: getattr(module, name) for name in names}, prefix, {name: 0 for name in names},
        sharded_offsets, tp_group=parallel_state.get_tensor_model_parallel_group(),
        dp_cp_group=metadata["dp_cp_group"])


def _effective(config: NeonConfig, name: str, stored: torch.Tensor) -> torch.Tensor:
    init, scale = scaling_constants(config)[name]
    return stored * (init / scale)


class NormalizedResidual(MegatronModule):
    """h <- Norm(h + |alpha| (Norm(x) - h)): nGPT's residual update in the bias-dropout-add slot.

    megatron's TransformerLayer calls `bda(training, fused)(x_with_bias, residual, dropout_p)`;
    alpha [d_model] is replicated over tensor-parallel ranks and, with sequence parallelism, sees
    only this rank's tokens: `sequence_parallel` makes megatron all-reduce its gradient."""

    def __init__(self, config: NeonConfig):
        super().__init__(config=config)
        self.alpha = _scaling_vector(config, "alpha", config.hidden_size, tp_sharded=False)
        self.alpha.sequence_parallel = config.sequence_parallel

    def forward(self, training: bool, fused: bool = False):
        return partial(self._update, training)

    def _update(self, training, x_with_bias, residual, dropout_p):
        x, bias = x_with_bias
        assert bias is None, "nGPT layers have no biases"
        if training and dropout_p:
            x = F.dropout(x, p=dropout_p)
        alpha = _effective(self.config, "alpha", self.alpha).abs()
        h = residual + alpha * (unit_norm(x) - residual)  # [s, b, d_model]
        return unit_norm(h)


@cache
def ngpt_core_attention(base: type) -> type:
    """`base` core attention with nGPT's q/k: Norm(.) * s_qk per head after RoPE, scale sqrt(d).

    q.k with both sides scaled by s_qk equals Norm(q) * s_qk^2 . Norm(k): the square goes on the
    query, so grouped-query attention (one key head serving several query heads, each with its
    own s_qk) needs no key expansion. s_qk has one entry per query channel, split with the heads
    under tensor parallelism."""

    class NGPTCoreAttention(base):
        def __init__(self, config: NeonConfig, *args, softmax_scale=None, **kwargs):
            if softmax_scale is None:
                softmax_scale = math.sqrt(config.head_dim)
            super().__init__(config, *args, softmax_scale=softmax_scale, **kwargs)
            tp = parallel_state.get_tensor_model_parallel_world_size()
            # the query channels this core attention receives per TP rank (`query_width` where it
            # declares them, e.g. DiffAttention's two query maps per head; else Mistral's)
            width = getattr(self, "query_width", config.num_attention_heads * config.head_dim // tp)
            self.s_qk = _scaling_vector(config, "s_qk", width, tp_sharded=True)

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
            sd.update(_tp_sharded_vectors(self, ["s_qk"], prefix, sharded_offsets, metadata))
            return sd

        def forward(self, query, key, value, *args, **kwargs):
            # query [sq, b, heads, d], key [sk, b, kv_heads, d]
            s_qk = _effective(self.config, "s_qk", self.s_qk).view(query.shape[-2:])
            query = unit_norm(query) * (s_qk * s_qk).to(query.dtype)
            key = unit_norm(key)
            return super().forward(query, key, value, *args, **kwargs)

    NGPTCoreAttention.__name__ = NGPTCoreAttention.__qualname__ = f"NGPT{base.__name__}"
    return NGPTCoreAttention


class NGPTMLP(MLP):
    """megatron's MLP with nGPT's SwiGLU: u * s_u, v * s_v * sqrt(d_model), out = W_down (u SiLU(v)).

    linear_fc1 holds [W_gate; W_up] (v = gate, u = up), each half split under tensor parallelism;
    s_u and s_v [ffn / tp] follow that split."""

    def __init__(self, config: NeonConfig, submodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        local_ffn = self.linear_fc1.weight.shape[0] // 2
        self.s_u = _scaling_vector(config, "s_u", local_ffn, tp_sharded=True)
        self.s_v = _scaling_vector(config, "s_v", local_ffn, tp_sharded=True)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)  # megatron's: submodules only
        sd.update(_tp_sharded_vectors(self, ["s_u", "s_v"], prefix, sharded_offsets, metadata))
        return sd

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        assert per_token_scale is None, "per-token scales are for MoE experts"
        uv, bias = self.linear_fc1(hidden_states)  # [s, b, 2 * ffn / tp]
        assert bias is None, "nGPT layers have no biases"
        v, u = torch.chunk(uv, 2, dim=-1)
        u = u * _effective(self.config, "s_u", self.s_u).to(u.dtype)
        v = v * (_effective(self.config, "s_v", self.s_v) * math.sqrt(self.config.hidden_size)).to(v.dtype)
        return self.linear_fc2(u * F.silu(v))  # ([s, b, d_model], None)


def _normalized_qk(core):
    """The core-attention entry of a spec (class, partial of a class, or ModuleSpec), nGPT's q/k."""
    if isinstance(core, ModuleSpec):
        return replace(core, module=_normalized_qk(core.module))
    if isinstance(core, partial):  # e.g. partial(DiffCoreAttention, use_te=...)
        return partial(ngpt_core_attention(core.func), *core.args, **core.keywords)
    return ngpt_core_attention(core)


def ngpt_layer_spec(spec: ModuleSpec, config: NeonConfig, norm_slots, residual_slots) -> ModuleSpec:
    """The Neon layer spec turned into nGPT's: every norm slot of the layer (`norm_slots`: the
    Mistral layer's and the other features') an IdentityOp, every residual slot
    (`residual_slots`) a normalized update with its own alpha, scaled q/k, and megatron's MLP
    with the scaled SwiGLU (another module in the MLP's place is kept: its output goes through
    the normalized mlp_bda update, h_M = Norm(MLP(h)))."""
    sub = spec.submodules
    attn = sub.self_attention
    attn = replace(attn, submodules=replace(
        attn.submodules, core_attention=_normalized_qk(attn.submodules.core_attention)))
    mlp = sub.mlp
    if isinstance(mlp, ModuleSpec) and mlp.module is MLP:
        mlp = replace(mlp, module=NGPTMLP)
    slots = {name: IdentityOp for name in norm_slots if hasattr(sub, name)}
    slots |= {name: ModuleSpec(module=NormalizedResidual, params={"config": config})  # alpha per slot
              for name in residual_slots if hasattr(sub, name)}
    return replace(spec, submodules=replace(sub, self_attention=attn, mlp=mlp, **slots))


# --- weights on the sphere --------------------------------------------------------------------
# Each weight vector in d_model space gets unit norm: rows of [out, d_model] input projections
# (and of the embedding tables), columns of [d_model, in] output projections. Under tensor
# parallelism every such vector is whole on one rank (rows are split for column-parallel layers,
# columns for row-parallel ones). The dim stored on the parameter is the one summed over.
# megatron-core's modules, by name:
UNIT_NORM_DIM = [
    (re.compile(r"(^|\.)embedding\.word_embeddings\.weight$"), 1),  # E_in   [vocab, d]
    (re.compile(r"(^|\.)output_layer\.weight$"), 1),                # E_out  [vocab, d]
    (re.compile(r"\.linear_qkv\.weight$"), 1),                      # W_q, W_k, W_v [out, d]
    (re.compile(r"\.linear_fc1\.weight$"), 1),                      # W_gate; W_up  [2 ffn, d]
    (re.compile(r"\.linear_proj\.weight$"), 0),                     # W_o    [d, heads * d_h]
    (re.compile(r"\.linear_fc2\.weight$"), 0),                      # W_down [d, ffn]
]
# Any other module declares its own: `unit_sphere_dims = {parameter name: dim}` (a class or
# instance attribute; e.g. FlamingMoE's linear functions and IO functions).
NORM_DIM_ATTR = "ngpt_unit_norm_dim"


def unit_norm_dims(model: torch.nn.Module) -> dict[str, int]:
    """{parameter name: the dim nGPT normalises it over} for every matrix kept on the sphere."""
    names = [name for name, _ in model.named_parameters()]
    dims = {name: dim for name in names for pattern, dim in UNIT_NORM_DIM if pattern.search(name)}
    for prefix, module in model.named_modules():
        for param, dim in (getattr(module, "unit_sphere_dims", None) or {}).items():
            dims[f"{prefix}.{param}" if prefix else param] = dim
    return {name: dims[name] for name in names if name in dims}  # declared parameters that exist


def mark_and_normalize_weights(model: torch.nn.Module) -> list[str]:
    """Tag every matrix nGPT keeps on the sphere with the dim to normalise over, and normalise it.

    Returns the tagged parameter names. Called once when the model is built; the optimizer hook
    (`neon.ngpt_optimizer`) keeps them normalised after every step."""
    params = dict(model.named_parameters())
    dims = unit_norm_dims(model)
    for name, dim in dims.items():
        param = params[name]
        if param.dim() != 2:
            raise ValueError(f"nGPT expects a matrix for {name}, got shape {tuple(param.shape)}")
        setattr(param, NORM_DIM_ATTR, dim)
        with torch.no_grad():
            param.copy_(unit_norm(param, dim=dim))
    return list(dims)


class LogitScale(MegatronModule):
    """s_z [vocab / tp], split with the vocabulary: z <- z * s_z on the output layer's logits."""

    def __init__(self, config: NeonConfig):
        super().__init__(config=config)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.s_z = _scaling_vector(config, "s_z", config.vocab_size // tp, tp_sharded=True)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        s_z = _effective(self.config, "s_z", self.s_z)  # logits [s, b, vocab / tp] (or gathered)
        if logits.size(-1) != s_z.numel():
            s_z = tensor_parallel.gather_from_tensor_model_parallel_region(s_z)
        return logits * s_z.to(logits.dtype)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return _tp_sharded_vectors(self, ["s_z"], prefix, sharded_offsets, metadata)


def attach_logit_scale(model, config: NeonConfig) -> None:
    """Give the last pipeline stage's GPTModel `logit_scale` (s_z), applied to the output layer's
    logits by a forward hook (megatron's GPTModel calls output_layer itself)."""
    model.logit_scale = LogitScale(config)

    def scale_logits(_module, _args, output):
        logits, bias = output
        return model.logit_scale(logits), bias

    model.output_layer.register_forward_hook(scale_logits)
