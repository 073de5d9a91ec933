"""Core attention for the local (non-TE) path: causal, grouped-query, optional sliding window.

Plugs into megatron-core's SelfAttention as its `core_attention` submodule and computes
softmax(q k^T * scale + causal/window mask) v. `attention()` picks the kernel:

- CUDA, sliding window narrower than the keys, or fewer queries than keys (a context-parallel
  chunk: its queries are the last of the keys' positions): FlexAttention (torch.compile'd) with a
  block mask, so fully masked key blocks are skipped and no s x s mask exists; the block mask
  depends only on (sq, sk, window, device) and is built once per shape. Grouped-query attention
  reads the shared key/value heads in place (enable_gqa), no copies.
- CUDA, as many queries as keys and no window (or one at least as wide as the keys): torch SDPA
  with is_causal, which takes the flash or cuDNN kernel; grouped-query through enable_gqa.
- CPU, fewer queries than keys and no window narrower than the keys (a context-parallel chunk):
  two mask-free flash calls merged by their log-sum-exps (neon/chunk_attention.py), so no
  [sq, sk] mask is built or saved.
- CPU otherwise, and CUDA with attention dropout under a window (FlexAttention has no dropout):
  SDPA with enable_gqa and, for a window or fewer queries than keys, an explicit additive
  [sq, sk] mask built once per shape.

Any number of query heads per key/value head works (the base, every DiffAttention layout);
`scale` is the softmax scale (1/sqrt(d), or nGPT's sqrt(d) on normalised q/k).

Document masks (Megatron-LM's --reset-attention-mask): the `attention_mask` megatron hands a core
attention is, in Neon, None or `documents` [b, s], each token's document number in its sample
(neon/data/datasets.py); a query attends only to keys of its own document. That adds a boolean
[b, 1, sq, sk] mask and takes SDPA on every device. RoPE needs no position reset for this: its
scores depend only on the distance between tokens of the same document.

Context parallelism: every core attention module (this one, DiffAttention's, nGPT's scaled q/k
around either) calls `attention` with its context-parallel group; with more than one rank it
takes the keys and values it needs from the other ranks (neon/context_parallel.py) and runs the
kernels above on each local chunk. The document ids then cover the whole sequence (the batch split
leaves them whole).
"""

from __future__ import annotations

import functools
import math
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from neon import chunk_attention
from neon.config import NeonConfig
from neon.context_parallel import context_parallel_attention


def causal_window_mask(sq: int, sk: int, window: Optional[int], device,
                       documents: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Boolean mask, True where attention is allowed (query i is token sk - sq + i): [sq, sk], or
    [b, 1, sq, sk] with documents [b, sk] (a query sees keys of its own document only).

    None when SDPA's is_causal gives it (as many queries as keys, no window narrower than the
    keys, no documents): is_causal aligns query 0 with key 0, so fewer queries than keys (a
    context-parallel chunk) need the mask."""
    if sq == sk and not needs_window(sk, window) and documents is None:
        return None
    mask = _position_mask(sq, sk, window, torch.device(device))
    if documents is not None:
        same = documents[:, sk - sq:, None] == documents[:, None, :]  # [b, sq, sk]
        mask = (mask & same)[:, None]
    return mask


@functools.lru_cache(maxsize=32)
def _additive_mask(sq: int, sk: int, window: Optional[int], device: torch.device, dtype) -> torch.Tensor:
    allowed = _position_mask(sq, sk, window, device)
    return torch.zeros(sq, sk, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))


@functools.lru_cache(maxsize=32)
def _position_mask(sq: int, sk: int, window: Optional[int], device: torch.device) -> torch.Tensor:
    """The causal (window) part of `causal_window_mask`, built once per shape: every layer's
    attention shares one tensor (it is saved for the backward once, not once per layer)."""
    q_pos = torch.arange(sk - sq, sk, device=device)[:, None]
    k_pos = torch.arange(sk, device=device)[None, :]
    mask = k_pos <= q_pos
    if needs_window(sk, window):
        mask = mask & (k_pos > q_pos - window)
    return mask


def document_ids(attention_mask) -> Optional[torch.Tensor]:
    """The document ids [b, s] megatron's `attention_mask` argument carries in Neon (or None)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.is_floating_point() or attention_mask.dtype == torch.bool:
        raise ValueError(f"Neon's core attention takes document ids [b, s] (integers) as attention_mask, not a "
                         f"{attention_mask.dtype} tensor of shape {tuple(attention_mask.shape)}")
    return attention_mask


def context_parallel_group(pg_collection=None):
    """The context-parallel group a core attention module works in (None before megatron's
    parallel state exists, e.g. a model built outside a distributed run)."""
    if pg_collection is not None and getattr(pg_collection, "cp", None) is not None:
        return pg_collection.cp
    return parallel_state.get_context_parallel_group(check_initialized=False)


def needs_window(sk: int, window: Optional[int]) -> bool:
    """A window masks something only when it is narrower than the keys."""
    return window is not None and window < sk


def _check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.size(1) % k.size(1) or k.size(1) != v.size(1):
        raise ValueError(f"attention: {q.size(1)} query heads over {k.size(1)} key and {v.size(1)} value "
                         "heads; the query heads must be a whole multiple of the key/value heads")


def sdpa(q, k, v, *, scale: float, window: Optional[int], dropout_p: float = 0.0,
         documents: Optional[torch.Tensor] = None):
    """torch SDPA: q [b, h, sq, d], k [b, h_kv, sk, d], v [b, h_kv, sk, d_v] -> [b, h, sq, d_v].

    Causal through is_causal (flash/cuDNN-eligible) without a window or documents, else a mask:
    without documents the additive (0 / -inf) one of the query's dtype, built once per shape, which
    the kernels take as it is (a boolean mask becomes a new float copy in each layer's call, and
    each copy is saved for the backward)."""
    _check_heads(q, k, v)
    mask = causal_window_mask(q.size(2), k.size(2), window, q.device, documents)
    if mask is not None and documents is None:
        mask = _additive_mask(q.size(2), k.size(2), window, q.device, q.dtype)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None, scale=scale,
        enable_gqa=q.size(1) != k.size(1))


@functools.lru_cache(maxsize=32)
def window_block_mask(sq: int, sk: int, window: Optional[int], device: torch.device):
    """FlexAttention block mask of causal attention within `window` keys (None: all earlier keys;
    query i is token sk - sq + i), shared by every batch entry and head. Built once per
    (sq, sk, window, device)."""
    from torch.nn.attention.flex_attention import create_block_mask

    offset = sk - sq

    def causal_window(b, h, q_idx, kv_idx):
        q_pos = q_idx + offset
        if window is None:
            return kv_idx <= q_pos
        return (kv_idx <= q_pos) & (kv_idx > q_pos - window)

    return create_block_mask(causal_window, None, None, sq, sk, device=device)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_window_attention(q, k, v, *, scale: float, window: Optional[int], compiled: bool = True):
    """FlexAttention, causal within `window` (None: causal): same shapes and result as `sdpa`.

    compiled=False runs FlexAttention's eager reference (tests); training always compiles."""
    from torch.nn.attention.flex_attention import flex_attention

    _check_heads(q, k, v)
    block_mask = window_block_mask(q.size(2), k.size(2), window, q.device)
    kernel = _compiled_flex() if compiled else flex_attention
    return kernel(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.size(1) != k.size(1))


def attention(q, k, v, *, scale: float, window: Optional[int], dropout_p: float = 0.0,
              documents: Optional[torch.Tensor] = None, cp_group=None, value_halves: bool = False):
    """Causal (optionally windowed, optionally within documents) grouped-query attention on the
    kernel the module doc names.

    q [b, h, sq, d], k [b, h_kv, sk, d], v [b, h_kv, sk, d_v] -> [b, h, sq, d_v], h a multiple of
    h_kv; documents [b, sk] or None. With a context-parallel group of more than one rank, q/k/v
    are this rank's two chunks of the sequence and documents cover the whole sequence
    (neon/context_parallel.py). value_halves: attend to each half of V's width in a kernel call
    of its own and concatenate (flash kernels need d_v == d; DiffAttention's 'matched' V is 2d
    wide); under context parallelism the keys are gathered once for both."""
    kwargs = dict(scale=scale, window=window, dropout_p=dropout_p, documents=documents, value_halves=value_halves)
    if cp_group is not None and cp_group.size() > 1:
        return context_parallel_attention(q, k, v, group=cp_group, kernel=local_attention, **kwargs)
    return local_attention(q, k, v, **kwargs)


def local_attention(q, k, v, *, scale: float, window: Optional[int], dropout_p: float = 0.0,
                    documents: Optional[torch.Tensor] = None, value_halves: bool = False):
    """`attention` on one process's q/k/v (query i is key sk - sq + i)."""
    if value_halves:
        return torch.cat([local_attention(q, k, half, scale=scale, window=window, dropout_p=dropout_p,
                                          documents=documents) for half in v.chunk(2, dim=-1)], dim=-1)
    if not dropout_p and documents is None:  # FlexAttention and the CPU chunk kernel take neither
        offset_or_window = q.size(2) != k.size(2) or needs_window(k.size(2), window)
        if q.is_cuda and offset_or_window:
            return flex_window_attention(q, k, v, scale=scale, window=window)
        if chunk_attention.available(q, k, v) and not needs_window(k.size(2), window):
            _check_heads(q, k, v)
            return chunk_attention.chunk_causal_attention(q, k, v, scale=scale)
    return sdpa(q, k, v, scale=scale, window=window, dropout_p=dropout_p, documents=documents)


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
        self.cp_group = context_parallel_group(pg_collection)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        assert packed_seq_params is None, "packed sequences need the Transformer Engine path"
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout_p = self.dropout_p if self.training else 0.0
        attend = partial(attention, q, k, v, scale=self.softmax_scale, window=self.window,
                         documents=document_ids(attention_mask), cp_group=self.cp_group)
        if dropout_p:
            with tensor_parallel.get_cuda_rng_tracker().fork():  # per-TP-rank dropout
                out = attend(dropout_p=dropout_p)
        else:
            out = attend()
        # [b, h, sq, d] -> [sq, b, h * d]
        return out.permute(2, 0, 1, 3).flatten(2)
