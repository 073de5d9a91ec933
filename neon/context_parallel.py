"""Context parallelism (CP) for Neon's core attention: all-gather of keys and values.

megatron-core's batch split (`get_batch_on_this_cp_rank`) cuts every sequence of S tokens into
2 CP chunks of c = S / (2 CP) tokens and gives CP rank r chunks r and 2 CP - 1 - r (head and
tail, so that every rank has the same causal work). Everything but attention is per token; its
RoPE slices the positions the same way. Attention needs the keys before each query:

- no window: chunk j attends to chunks 0 .. j, so each rank all-gathers every rank's K/V
  (Llama 3's all-gather CP, TE's cp_comm_type="all_gather");
- sliding window W with W - 1 <= c: chunk j needs only the last W - 1 keys of chunk j - 1, so
  each rank all-gathers just the last W - 1 positions of each of its chunks (window-aware
  exchange: 2 CP (W - 1) positions instead of S); a wider window gathers whole chunks and the
  window mask does the rest.

Each local query chunk then runs the ordinary causal (window) kernel on its own keys: chunk j's
keys are the contiguous positions [j c - m h, (j + 1) c) (m gathered pieces of h positions before
the chunk), and with the kernel's convention "query i is key sk - sq + i" the causal and window
masks come out right without any position tensor.

The backward of the gather sums the K/V gradients of every rank and keeps this rank's pieces:
a reduce-scatter on NCCL, an all-reduce (gloo has no reduce-scatter) on gloo.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.distributed as dist


def chunk_ids(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two chunks (of 2 CP) of every sequence that CP rank `cp_rank` holds: head and tail."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def local_chunks(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's two chunks of the whole-sequence tensor x along `dim` (megatron's batch split)."""
    size, rank = group.size(), group.rank()
    chunks = x.chunk(2 * size, dim=dim)
    return torch.cat([chunks[i] for i in chunk_ids(rank, size)], dim=dim)


def _holder(chunk: int, cp_size: int) -> tuple[int, int]:
    """(CP rank, local half 0 or 1) holding chunk `chunk`."""
    return (chunk, 0) if chunk < cp_size else (2 * cp_size - 1 - chunk, 1)


# torch 2.13 renames the flat collectives (the old names warn); torch 2.11 has only the old ones
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """[CP, *x.shape]: every rank's x."""
    out = torch.empty((group.size() * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _ALL_GATHER(out, x.contiguous(), group=group)
    return out.view(group.size(), *x.shape)


class _GatherPieces(torch.autograd.Function):
    """x [2, ...] (this rank's two pieces) -> [CP, 2, ...] (every rank's); the backward sums the
    gradients over the group and returns this rank's."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        group = ctx.group
        grad = grad.contiguous()
        if dist.get_backend(group) == "nccl":
            out = torch.empty(grad.shape[1:], dtype=grad.dtype, device=grad.device)
            _REDUCE_SCATTER(out, grad.flatten(0, 1), group=group)
            return out, None
        dist.all_reduce(grad, group=group)
        return grad[group.rank()], None


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Whole-sequence ids (no gradient) from this rank's two chunks along dim 1: [b, S/CP] -> [b, S]."""
    size = group.size()
    pieces = _all_gather(torch.stack(x.chunk(2, dim=1)), group)  # [CP, 2, b, c]
    return torch.cat([pieces[_holder(j, size)] for j in range(2 * size)], dim=1)


def _halo(window: Optional[int], c: int, chunk: int) -> tuple[int, int]:
    """(h, m): the query chunk `chunk` needs the last h positions of each of the m chunks before it."""
    if window is not None and window - 1 <= c:
        return window - 1, min(1, chunk)
    if window is not None:
        return c, min(-(-(window - 1) // c), chunk)
    return c, chunk


def context_parallel_attention(q, k, v, *, group, window: Optional[int], kernel: Callable,
                               documents: Optional[torch.Tensor] = None, **kernel_kwargs):
    """Causal (window) attention of this rank's two chunks over the whole sequence.

    q [b, h, 2c, d], k [b, h_kv, 2c, d], v [b, h_kv, 2c, d_v] (this rank's chunks, as the batch
    split orders them); documents [b, S] for the whole sequence, or None. `kernel(q, k, v, window=,
    documents=, **kernel_kwargs)` is the local attention (neon/attention.py). -> [b, h, 2c, d_v]."""
    size, rank = group.size(), group.rank()
    c = q.size(2) // 2
    h = _halo(window, c, 2 * size)[0]  # the same piece length for every chunk
    # [2, b, h_kv, h, d]: the last h positions of each local chunk, then every rank's
    k_tails = _GatherPieces.apply(torch.stack([k[:, :, c - h:c], k[:, :, 2 * c - h:]]), group)
    v_tails = _GatherPieces.apply(torch.stack([v[:, :, c - h:c], v[:, :, 2 * c - h:]]), group)
    outs = []
    for half, j in enumerate(chunk_ids(rank, size)):
        _, m = _halo(window, c, j)
        before = [_holder(i, size) for i in range(j - m, j)]
        own = slice(half * c, (half + 1) * c)
        keys = torch.cat([k_tails[r, p] for r, p in before] + [k[:, :, own]], dim=2)
        values = torch.cat([v_tails[r, p] for r, p in before] + [v[:, :, own]], dim=2)
        docs = None if documents is None else documents[:, (j + 1) * c - keys.size(2):(j + 1) * c]
        outs.append(kernel(q[:, :, own], keys, values, window=window, documents=docs, **kernel_kwargs))
    return torch.cat(outs, dim=2)
