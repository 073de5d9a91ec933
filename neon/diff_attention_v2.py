"""DiffAttention V2 (Ye, Dong, Sun, Wei; Microsoft 2026) as megatron-core modules.

With H output heads over H_kv key/value heads of width d, and r = H / H_kv:

    2H query heads Q_j (width d); head j reads key/value head j // (2 r)      (plain GQA)
    O_j      = softmax(Q_j K^T / sqrt(d) + causal/window mask) V
    lambda_h = sigmoid(W_lambda x)_h                                           (per token, per head)
    head_h   = O_{2h} - lambda_h O_{2h+1}                                      (a pair from one GQA group)
    output   = W_O [head_1; ...; head_H]

No per-head RMSNorm and no (1 - lambda_init) factor. K, V and W_O keep Mistral's shapes; Q has
twice Mistral's rows and W_lambda [H, hidden] is new.

Two modules plug into megatron's SelfAttention through the layer spec:
- `DiffV2SelfAttention` sizes linear_qkv for 2H query heads and holds `linear_lambda`
  (W_lambda, column-parallel: each tensor-parallel rank computes the lambdas of its own heads).
  Its forward is megatron's own. The lambda logits reach the core attention appended to V as r
  extra channels per key/value head (V [sq, b, g, d + r]): V is the one tensor megatron hands
  from the projection to the core attention untouched (no RoPE), so the logits follow every
  path that V follows, activation checkpointing of the core attention included.
- `DiffV2CoreAttention` runs one attention call on the 2H query heads (`neon.attention.attention`:
  SDPA's flash kernel, FlexAttention for a sliding window on CUDA; or TE's fused attention) and
  subtracts each pair.

linear_qkv rows are grouped per key/value head g (Mistral's grouping, with 2 r query heads per
group): [Q_j for the 2 r heads j of g] [K_g] [V_g], so tensor parallelism hands each rank whole
groups, and each rank's W_lambda rows are the heads of those groups.
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
from megatron.core import tensor_parallel
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from neon.attention import attention, context_parallel_group, document_ids
from neon.config import NeonConfig
from neon.diff_attention import with_width


@dataclass(frozen=True)
class DiffV2Layout:
    """Head counts of one DiffAttention V2 layer (global, before tensor parallelism)."""

    heads: int  # H output heads (2 H query heads)
    groups: int  # H_kv key/value heads
    head_dim: int  # d: width of every query, key, value and output head

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.groups  # r

    @property
    def group_rows(self) -> int:
        """linear_qkv rows of one key/value group: its 2 r query heads, then K, then V."""
        return (2 * self.heads_per_group + 2) * self.head_dim

    @property
    def qkv_rows(self) -> int:
        return self.groups * self.group_rows


def diff_v2_layout(config: NeonConfig) -> DiffV2Layout:
    if config.diff_attention != "v2":
        raise ValueError(f"diff_attention={config.diff_attention!r} is not the 'v2' layout")
    heads = config.num_attention_heads
    return DiffV2Layout(heads=heads, groups=config.num_query_groups or heads, head_dim=config.head_dim)


class DiffV2SelfAttention(SelfAttention):
    """megatron's SelfAttention with 2H query heads and W_lambda; forward is megatron's own."""

    def __init__(self, config: NeonConfig, submodules: SelfAttentionSubmodules, layer_number: int,
                 attn_mask_type: AttnMaskType = AttnMaskType.causal, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        layout = diff_v2_layout(config)
        column_linear = submodules.linear_qkv
        submodules = dataclasses.replace(
            submodules, linear_qkv=partial(with_width, column_linear, layout.qkv_rows))
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, cp_comm_type=cp_comm_type,
                         pg_collection=pg_collection)
        assert layout.heads * layout.head_dim == self.query_projection_size  # W_O keeps Mistral's shape
        self.layout = layout
        self.linear_qkv_out_dim = layout.qkv_rows
        self.groups_per_partition = layout.groups // self.world_size
        # W_lambda [H, hidden], rows split over the tensor-parallel ranks with the heads
        self.linear_lambda = column_linear(
            config.hidden_size, layout.heads, config=config, init_method=config.init_method,
            gather_output=False, bias=False, skip_bias_add=False, is_expert=False,
            tp_comm_buffer_name=None, tp_group=self.pg_collection.tp)

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False,
                                    split_qkv=True):
        """[sq, b, hidden] -> Q [sq, b, 2 n, d] (pairs 2h, 2h+1 of one group), K [sq, b, g, d],
        V with the lambda logits appended [sq, b, g, d + r], for this rank's n heads, g groups."""
        assert split_qkv and not output_gate, "DiffAttention V2 needs split q/k/v and no output gate"
        lay = self.layout
        mixed, _ = self.linear_qkv(hidden_states)  # [sq, b, g * group_rows]
        mixed = mixed.view(*mixed.shape[:2], self.groups_per_partition, lay.group_rows)
        q_rows = 2 * lay.heads_per_group * lay.head_dim
        query, key, value = torch.split(mixed, [q_rows, lay.head_dim, lay.head_dim], dim=-1)
        query = query.reshape(*query.shape[:2], -1, lay.head_dim)
        logits, _ = self.linear_lambda(hidden_states)  # [sq, b, n]
        logits = logits.view(*logits.shape[:2], self.groups_per_partition, lay.heads_per_group)
        return query, key, torch.cat([value, logits.to(value.dtype)], dim=-1)


class DiffV2CoreAttention(MegatronModule):
    """Attention over the 2n query heads, then head_h = O_2h - sigmoid(logit_h) O_2h+1.

    Inputs as DiffV2SelfAttention gives them (after RoPE): query [sq, b, 2 n, d], key
    [sq, b, g, d], value [sq, b, g, d + n / g] (V, then the lambda logits of the group's heads).
    Output [sq, b, n * d] for linear_proj."""

    def __init__(self, config: NeonConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None, use_te: bool = False):
        super().__init__(config=config)
        assert attn_mask_type == AttnMaskType.causal, "Neon attention is causal"
        self.layout = lay = diff_v2_layout(config)
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(lay.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.window = config.sliding_window
        self.cp_group = context_parallel_group(pg_collection)
        self.kernel = None
        if use_te:  # written to TE's interface; not run on the CPU development machine
            from megatron.core.extensions.transformer_engine import TEDotProductAttention

            te_config = copy.copy(config)
            te_config.num_attention_heads = 2 * lay.heads  # plain GQA: 2H query heads over H_kv
            self.kernel = TEDotProductAttention(
                config=te_config, layer_number=layer_number, attn_mask_type=attn_mask_type,
                attention_type=attention_type, attention_dropout=attention_dropout,
                softmax_scale=self.softmax_scale, cp_comm_type=cp_comm_type, pg_collection=pg_collection)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        assert packed_seq_params is None, "packed sequences are not supported with DiffAttention"
        sq, b, n2, d = query.shape
        n, g = n2 // 2, key.size(2)
        value, logits = value.split([d, n // g], dim=-1)  # [sq, b, g, d], [sq, b, g, r]
        dropout_p = self.dropout_p if self.training else 0.0
        if self.kernel is not None:
            maps = self.kernel(query, key, value.contiguous(), attention_mask, attn_mask_type=attn_mask_type,
                               attention_bias=attention_bias).view(sq, b, n2, d)
        else:
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
            with (tensor_parallel.get_cuda_rng_tracker().fork() if dropout_p else contextlib.nullcontext()):
                maps = attention(q, k, v, scale=self.softmax_scale, window=self.window, dropout_p=dropout_p,
                                 documents=document_ids(attention_mask), cp_group=self.cp_group)
                maps = maps.permute(2, 0, 1, 3)  # [sq, b, 2n, d]
        lam = torch.sigmoid(logits.reshape(sq, b, n, 1))  # head h of group h // r
        heads = maps[:, :, 0::2] - lam.to(maps.dtype) * maps[:, :, 1::2]  # [sq, b, n, d]
        return heads.reshape(sq, b, n * d)
