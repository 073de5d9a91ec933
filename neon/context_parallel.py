"""Context parallelism (CP) for Neon's core attention: keys and values from the other ranks.

megatron-core's batch split (`get_batch_on_this_cp_rank`) cuts every sequence of S tokens into
2 CP chunks of c = S / (2 CP) tokens and gives CP rank r chunks r and 2 CP - 1 - r (head and
tail, so that every rank has the same causal work). Everything but attention is per token; its
RoPE slices the positions the same way. Attention needs the keys before each query:

- no window, or a window W with W - 1 >= c: chunk j attends to (the last W - 1 keys of) the
  chunks before it, so each rank all-gathers every rank's K/V (Llama 3's all-gather CP, TE's
  cp_comm_type="all_gather"), lays chunks 0 .. its tail chunk out once in order, and gives each
  of its chunks a view of them: it keeps (tail + 1) c keys for the backward, at most one
  sequence's;
- a window with W - 1 < c: chunk j needs only the last W - 1 keys of chunk j - 1, which a
  neighbour holds (head chunk r: rank r - 1's head; tail chunk 2 CP - 1 - r: rank r + 1's tail,
  or this rank's own head on the last rank). Each rank sends those W - 1 positions point to point,
  2 (W - 1) positions instead of S.

Each local query chunk then runs the ordinary causal (window) kernel on its keys, the contiguous
positions that end with the chunk; with the kernel's convention "query i is key sk - sq + i" the
causal and window masks come out right without any position tensor.

The backward returns each K/V gradient to the rank that sent the keys: for the all-gather a
reduce-scatter on NCCL (an all-reduce on gloo, which has no reduce-scatter), for the neighbour
exchange the same point-to-point sends reversed.
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


def _in_order(pieces: torch.Tensor, chunks: int, dim: int) -> torch.Tensor:
    """Chunks 0 .. chunks - 1 of the sequence, in order along `dim`, from every rank's pieces
    [CP, 2, ...] (as gathered)."""
    size = pieces.size(0)
    return torch.cat([pieces[_holder(j, size)] for j in range(chunks)], dim=dim)


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Whole-sequence ids (no gradient) from this rank's two chunks along dim 1: [b, S/CP] -> [b, S]."""
    pieces = _all_gather(torch.stack(x.chunk(2, dim=1)), group)  # [CP, 2, b, c]
    return _in_order(pieces, 2 * group.size(), dim=1)


class _NeighbourHalos(torch.autograd.Function):
    """x [2, ...]: the last positions of this rank's head and tail chunks -> [2, ...]: those of the
    chunks just before them (zeros before chunk 0). Head chunk r follows rank r - 1's head; tail
    chunk 2 CP - 1 - r follows rank r + 1's tail, or on the last rank this rank's own head."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _exchange(x.contiguous(), group, forward=True)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad.contiguous(), ctx.group, forward=False), None


def _exchange(x: torch.Tensor, group, forward: bool) -> torch.Tensor:
    """The sends of `_NeighbourHalos`: forward, head pieces go up a rank and tail pieces down;
    backward, each received piece's gradient goes back to its sender."""
    size, rank = group.size(), group.rank()
    out = torch.zeros_like(x)
    head_to, tail_to = (rank + 1, rank - 1) if forward else (rank - 1, rank + 1)
    ops = []
    for send, receive, to, source in ((x[0], out[0], head_to, tail_to), (x[1], out[1], tail_to, head_to)):
        if 0 <= to < size:
            ops.append(dist.P2POp(dist.isend, send, dist.get_global_rank(group, to), group))
        if 0 <= source < size:
            ops.append(dist.P2POp(dist.irecv, receive, dist.get_global_rank(group, source), group))
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    if rank == size - 1:  # the last rank's tail chunk follows its own head chunk
        if forward:
            out[1] = x[0]
        else:
            out[0] += x[1]
    return out


def _neighbour_keys(x: torch.Tensor, group, c: int, halo: int) -> list[torch.Tensor]:
    """Window W with halo = W - 1 < c: for each local chunk, the last `halo` positions of the
    chunk before it (from a neighbour) and the chunk's own; chunk 0 has only its own."""
    before = _NeighbourHalos.apply(torch.stack([x[:, :, c - halo:c], x[:, :, 2 * c - halo:]]), group)
    own = x.chunk(2, dim=2)
    chunks = chunk_ids(group.rank(), group.size())
    return [own[half] if j == 0 else torch.cat([before[half], own[half]], dim=2) for half, j in enumerate(chunks)]


def _gathered_keys(x: torch.Tensor, group, c: int, window: Optional[int]) -> list[torch.Tensor]:
    """No window or one of W - 1 >= c: every rank's chunks, laid out 0 .. this rank's tail chunk
    once; each local chunk's keys are a view of them, from the first chunk its window reaches."""
    chunks = chunk_ids(group.rank(), group.size())
    gathered = _GatherPieces.apply(torch.stack(x.chunk(2, dim=2)), group)  # [CP, 2, b, h_kv, c, d]
    sequence = _in_order(gathered, chunks[1] + 1, dim=2)
    reach = [j if window is None else min(j, -(-(window - 1) // c)) for j in chunks]  # chunks before
    return [sequence[:, :, (j - m) * c:(j + 1) * c] for j, m in zip(chunks, reach)]


def context_parallel_attention(q, k, v, *, group, window: Optional[int], kernel: Callable,
                               documents: Optional[torch.Tensor] = None, **kernel_kwargs):
    """Causal (window) attention of this rank's two chunks over the whole sequence.

    q [b, h, 2c, d], k [b, h_kv, 2c, d], v [b, h_kv, 2c, d_v] (this rank's chunks, as the batch
    split orders them); documents [b, S] for the whole sequence, or None. `kernel(q, k, v, window=,
    documents=, **kernel_kwargs)` is the local attention (neon/attention.py). -> [b, h, 2c, d_v]."""
    c = q.size(2) // 2
    if window is not None and window - 1 < c:
        keys, values = (_neighbour_keys(x, group, c, window - 1) for x in (k, v))
    else:
        keys, values = (_gathered_keys(x, group, c, window) for x in (k, v))
    outs = []
    for half, j in enumerate(chunk_ids(group.rank(), group.size())):
        sk = keys[half].size(2)
        docs = None if documents is None else documents[:, (j + 1) * c - sk:(j + 1) * c]
        outs.append(kernel(q[:, :, half * c:(half + 1) * c], keys[half], values[half], window=window,
                           documents=docs, **kernel_kwargs))
    return torch.cat(outs, dim=2)
