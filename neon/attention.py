"""Core attention for the local (non-TE) path: causal, grouped-query, optional sliding window.

Plugs into megatron-core's SelfAttention as its `core_attention` submodule and computes
softmax(q k^T * scale + mask) v with torch's scaled_dot_product_attention (flash or
memory-efficient kernels on a GPU). megatron's own DotProductAttention materialises the
full score matrix; this one does not.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from neon.config import NeonConfig


def causal_window_mask(sq: int, sk: int, window: Optional[int], device) -> Optional[torch.Tensor]:
    """Boolean [sq, sk] mask, True where attention is allowed (query i is token sk - sq + i).

    None when plain causal attention suffices (no window wider than the sequence)."""
    if window is None or window >= sk:
        return None
    q_pos = torch.arange(sk - sq, sk, device=device)[:, None]
    k_pos = torch.arange(sk, device=device)[None, :]
    return (k_pos <= q_pos) & (k_pos > q_pos - window)


def sdpa(q, k, v, *, scale: float, window: Optional[int], dropout_p: float = 0.0):
    """q [b, h, sq, d], k [b, h_kv, sk, d], v [b, h_kv, sk, d_v] -> [b, h, sq, d_v]."""
    groups = q.size(1) // k.size(1)
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    mask = causal_window_mask(q.size(2), k.size(2), window, q.device)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None, scale=scale
    )


class NeonCoreAttention(MegatronModule):
    """Drop-in for megatron's DotProductAttention: [sq, b, np, hn] inputs -> [sq, b, np * hn]."""

    def __init__(
        self,
        config: NeonConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        assert attn_mask_type == AttnMaskType.causal, "Neon attention is causal"
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.window = config.sliding_window

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        assert packed_seq_params is None, "packed sequences need the Transformer Engine path"
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p:
            with tensor_parallel.get_cuda_rng_tracker().fork():  # per-TP-rank dropout
                out = sdpa(q, k, v, scale=self.softmax_scale, window=self.window,
                           dropout_p=dropout_p)
        else:
            out = sdpa(q, k, v, scale=self.softmax_scale, window=self.window)
        # [b, h, sq, d] -> [sq, b, h * d]
        return out.permute(2, 0, 1, 3).flatten(2)

