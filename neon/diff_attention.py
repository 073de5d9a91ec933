"""DiffAttention (Ye et al. 2024, arXiv 2410.05258) as megatron-core modules.

For each differential head h, with Q1, Q2, K1, K2 of width d and V of width d_v:

    A_i      = softmax(Q_i K_i^T / sqrt(d) + causal/window mask)          i = 1, 2
    lambda   = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init               (shared by the heads)
    head_h   = (1 - lambda_init) * RMSNorm((A_1 - lambda A_2) V)            (RMSNorm over d_v)
    output   = W_O [head_1; ...; head_n]

lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1)) for the 1-based global layer l, or a constant.

Layouts (H query heads, H_kv key/value heads, d = the Mistral head size):
- 'matched':    H/2 differential heads, H_kv/2 key/value heads; Q1, Q2, K1, K2 of width d, V of
                width 2d. The projections have exactly the Mistral shapes (same parameters, FLOPs).
- 'expressive': H differential heads, H_kv key/value heads; Q and K doubled (2d per head), V of
                width d.

Two modules plug into megatron's SelfAttention through the layer spec:
- `DiffSelfAttention` sizes linear_qkv for the layout and hands megatron's forward the split
  heads (Q1 and Q2 as separate heads of width d), so megatron's RoPE rotates each half with the
  true positions.
- `DiffCoreAttention` holds the four lambda vectors and the per-head norm and computes the
  differential map: one SDPA call on [Q1; Q2] x [K1; K2] (or TE's fused attention).

linear_qkv rows are grouped per differential key/value head g (so tensor parallelism hands each
rank whole groups): [Q1_h; Q2_h for the heads h of group g] [K1_g; K2_g] [V_g].

Tensor parallelism splits the heads; the lambda vectors and the norm scale are replicated, so
their gradient is each rank's partial sum: `copy_to_tensor_model_parallel_region` (identity
forward, all-reduce backward) sums it over the tensor-parallel group, with or without sequence
parallelism, so every rank applies the same update as a TP=1 run.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from neon.attention import attention, context_parallel_group, document_ids
from neon.config import NeonConfig

HEAD_NORM_EPS = 1e-5


def lambda_init_for_layer(layer_number: int, constant: Optional[float] = None) -> float:
    """lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1)) for 1-based layer l (0.2 for layer 1)."""
    if layer_number < 1:
        raise ValueError(f"layer_number={layer_number}: layers are numbered from 1")
    return constant if constant is not None else 0.8 - 0.6 * math.exp(-0.3 * (layer_number - 1))


@dataclass(frozen=True)
class DiffLayout:
    """Head counts and widths of one DiffAttention layer (global, before tensor parallelism)."""

    heads: int  # differential heads
    groups: int  # differential key/value heads
    qk_dim: int  # d: width of each of Q1, Q2, K1, K2
    v_dim: int  # width of V and of a head's output

    @property
    def group_rows(self) -> int:
        """linear_qkv rows of one key/value group: its heads' [Q1; Q2], then [K1; K2], then V."""
        return (self.heads // self.groups) * 2 * self.qk_dim + 2 * self.qk_dim + self.v_dim

    @property
    def qkv_rows(self) -> int:
        return self.groups * self.group_rows

    @property
    def out_width(self) -> int:
        return self.heads * self.v_dim


def diff_layout(config: NeonConfig) -> DiffLayout:
    d, heads = config.head_dim, config.num_attention_heads
    groups = config.num_query_groups or heads
    if config.diff_attention == "matched":
        return DiffLayout(heads=heads // 2, groups=groups // 2, qk_dim=d, v_dim=2 * d)
    if config.diff_attention == "expressive":
        return DiffLayout(heads=heads, groups=groups, qk_dim=d, v_dim=d)
    raise ValueError(f"diff_attention={config.diff_attention!r} has no DiffAttention layout")


def with_width(linear_cls, width: int, input_size: int, _output_size: int, **kwargs):
    """Build `linear_cls` with `width` outputs whatever output size SelfAttention asks for."""
    return linear_cls(input_size, width, **kwargs)


class DiffSelfAttention(SelfAttention):
    """megatron's SelfAttention with a differential linear_qkv; forward is megatron's own."""

    def __init__(self, config: NeonConfig, submodules: SelfAttentionSubmodules, layer_number: int,
                 attn_mask_type: AttnMaskType = AttnMaskType.causal, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        layout = diff_layout(config)
        submodules = dataclasses.replace(
            submodules, linear_qkv=partial(with_width, submodules.linear_qkv, layout.qkv_rows))
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, cp_comm_type=cp_comm_type,
                         pg_collection=pg_collection)
        assert layout.out_width == self.query_projection_size  # linear_proj keeps Mistral's shape
        self.layout = layout
        self.linear_qkv_out_dim = layout.qkv_rows
        self.groups_per_partition = layout.groups // self.world_size

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False,
                                    split_qkv=True):
        """[sq, b, h_model] -> Q [sq, b, 2 n, d] (heads in order Q1_0, Q2_0, Q1_1, ...),
        K [sq, b, 2 g, d] (K1_0, K2_0, ...), V [sq, b, g, d_v] for this rank's n heads, g groups."""
        assert split_qkv and not output_gate, "DiffAttention needs split q/k/v and no output gate"
        lay = self.layout
        mixed, _ = self.linear_qkv(hidden_states)  # [sq, b, g * group_rows]
        mixed = mixed.view(*mixed.shape[:2], self.groups_per_partition, lay.group_rows)
        q_rows = (lay.heads // lay.groups) * 2 * lay.qk_dim
        query, key, value = torch.split(mixed, [q_rows, 2 * lay.qk_dim, lay.v_dim], dim=-1)
        query = query.reshape(*query.shape[:2], -1, lay.qk_dim)
        key = key.reshape(*key.shape[:2], -1, lay.qk_dim)
        return query, key, value


class HeadRMSNorm(torch.nn.Module):
    """RMSNorm over a head's output width with one learned scale shared by the heads."""

    def __init__(self, width: int, eps: float = HEAD_NORM_EPS, dtype=torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(width, dtype=dtype))

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 or wider
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight if weight is None else weight) * x32.to(x.dtype)


class DiffCoreAttention(MegatronModule):
    """The differential map, the per-head norm and the (1 - lambda_init) scale.

    Inputs as DiffSelfAttention gives them (after RoPE): query [sq, b, 2 n, d], key [sq, b, 2 g, d],
    value [sq, b, g, d_v]. Output [sq, b, n * d_v] for linear_proj."""

    def __init__(self, config: NeonConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None, use_te: bool = False):
        super().__init__(config=config)
        assert attn_mask_type == AttnMaskType.causal, "Neon attention is causal"
        self.layout = lay = diff_layout(config)
        self.layer_number = layer_number  # global, 1-based (megatron adds the stage offset)
        self.lambda_init = lambda_init_for_layer(layer_number, config.diff_lambda_init)
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(lay.qk_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.window = config.sliding_window
        self.cp_group = context_parallel_group(pg_collection)
        self.tp_group = (pg_collection.tp if pg_collection is not None
                         else parallel_state.get_tensor_model_parallel_group(check_initialized=False))
        tp = self.tp_group.size() if self.tp_group is not None else 1
        self.query_width = 2 * lay.heads * lay.qk_dim // tp  # query channels per rank: Q1 and Q2 of n heads
        # Four vectors of size d, shared by every head of the layer, initialised N(0, 0.1) from
        # the default generator (identical on the ranks of a tensor-parallel group).
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            p = torch.nn.Parameter(torch.empty(lay.qk_dim, dtype=config.params_dtype))
            if config.perform_initialization:
                torch.nn.init.normal_(p, mean=0.0, std=0.1)
            else:
                torch.nn.init.zeros_(p)
            setattr(self, name, p)
        self.subln = HeadRMSNorm(lay.v_dim, dtype=config.params_dtype)
        self.kernel = None
        if use_te:
            from megatron.core.extensions.transformer_engine import TEDotProductAttention

            # TE sees [Q1; Q2] as 2n heads over [K1; K2] as 2g groups and V (duplicated); with
            # 'matched' (d_v = 2d) and no dropout it runs on the halves of V so that every TE
            # backend (flash-attention included) takes equal q/k/v widths.
            self.te_split_values = lay.v_dim == 2 * lay.qk_dim and not self.dropout_p
            te_config = copy.copy(config)
            te_config.num_attention_heads = 2 * lay.heads
            te_config.num_query_groups = 2 * lay.groups
            te_config.kv_channels = lay.qk_dim
            self.kernel = TEDotProductAttention(
                config=te_config, layer_number=layer_number, attn_mask_type=attn_mask_type,
                attention_type=attention_type, attention_dropout=attention_dropout,
                softmax_scale=self.softmax_scale, k_channels=lay.qk_dim,
                v_channels=lay.v_dim // 2 if self.te_split_values else lay.v_dim,
                cp_comm_type=cp_comm_type, pg_collection=pg_collection)

    def shared_parameters(self) -> tuple[torch.Tensor, ...]:
        """lq1, lk1, lq2, lk2, norm scale; under TP, their gradients are summed over the group."""
        params = [self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2, self.subln.weight]
        if self.tp_group is not None and self.tp_group.size() > 1:
            flat = tensor_parallel.copy_to_tensor_model_parallel_region(
                torch.cat(params), group=self.tp_group)
            return tuple(torch.split(flat, [p.numel() for p in params]))
        return tuple(params)

    def lambda_full(self, lq1, lk1, lq2, lk2) -> torch.Tensor:
        """lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init, in fp32 (or wider)."""
        dt = torch.promote_types(lq1.dtype, torch.float32)
        return (torch.exp(torch.dot(lq1.to(dt), lk1.to(dt)))
                - torch.exp(torch.dot(lq2.to(dt), lk2.to(dt))) + self.lambda_init)

    def local_maps(self, q, k, v, dropout_p: float = 0.0, split_values: Optional[bool] = None, documents=None):
        """[A_1 V; A_2 V] with torch SDPA: q [b, 2n, s, d], k [b, 2g, s, d], v [b, 2g, s, d_v].

        Flash kernels (CUDA and CPU) need d_v == d: the 'matched' layout (d_v = 2d) runs two
        calls on the halves of V rather than one call that falls back to a slower kernel (not
        under dropout, whose masks would then differ between the halves)."""
        if split_values is None:
            split_values = v.size(-1) == 2 * q.size(-1) and not dropout_p
        return attention(q, k, v, scale=self.softmax_scale, window=self.window, dropout_p=dropout_p,
                         documents=documents, cp_group=self.cp_group, value_halves=split_values)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        assert packed_seq_params is None, "packed sequences are not supported with DiffAttention"
        lq1, lk1, lq2, lk2, norm_weight = self.shared_parameters()
        lam = self.lambda_full(lq1, lk1, lq2, lk2)
        sq, b, n2, d = query.shape
        n, g = n2 // 2, key.size(2) // 2
        # (head, half) -> (half, head): [Q1 of every head; Q2 of every head], same for K
        query = query.view(sq, b, n, 2, d).transpose(2, 3).reshape(sq, b, n2, d)
        key = key.view(sq, b, g, 2, d).transpose(2, 3).reshape(sq, b, 2 * g, d)
        value = torch.cat([value, value], dim=2)  # both maps read the same V
        dropout_p = self.dropout_p if self.training else 0.0
        if self.kernel is not None:
            values = value.chunk(2, dim=-1) if self.te_split_values else (value,)
            maps = torch.cat([
                self.kernel(query, key, v.contiguous(), attention_mask, attn_mask_type=attn_mask_type,
                            attention_bias=attention_bias, packed_seq_params=packed_seq_params
                            ).view(sq, b, n2, -1)
                for v in values], dim=-1).permute(1, 2, 0, 3)  # [b, 2n, sq, d_v]
        else:
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, .]
            with (tensor_parallel.get_cuda_rng_tracker().fork() if dropout_p else contextlib.nullcontext()):
                maps = self.local_maps(q, k, v, dropout_p, documents=document_ids(attention_mask))
        a1_v, a2_v = maps[:, :n], maps[:, n:]  # A_1 V, A_2 V: [b, n, sq, d_v]
        diff = a1_v - lam.to(a1_v.dtype) * a2_v
        heads = self.subln(diff, norm_weight) * (1.0 - self.lambda_init)
        return heads.permute(2, 0, 1, 3).reshape(sq, b, n * heads.size(-1))  # [sq, b, n * d_v]
