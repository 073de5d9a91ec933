"""Causal attention of a query chunk at the end of longer keys, on the CPU, without a mask.

A context-parallel chunk's queries are the last sq of sk keys (query i is key p + i, p = sk - sq).
SDPA's is_causal aligns query 0 with key 0, so the plain path hands the kernel an additive
[sq, sk] mask; it is saved for the backward and grows with S^2. The keys split instead:

    prefix keys [0, p):  every query sees all of them -> flash kernel, no mask
    own keys    [p, sk): query i sees own keys 0 .. i -> flash kernel, is_causal

and the two partial results merge by their log-sum-exps (flash/ring attention's merge):

    lse = logaddexp(lse_prefix, lse_own)
    out = out_prefix * exp(lse_prefix - lse) + out_own * exp(lse_own - lse)

The backward calls the kernel's own backward on each part with the merged out and lse: the
softmax gradient of a key block needs only its scores, the final lse and rowsum(dout * out).

The flash kernel and its backward are torch's `aten._scaled_dot_product_flash_attention_for_cpu`
ops (what SDPA itself calls on the CPU; torch's experimental context parallelism calls its CUDA
twins the same way). They read grouped-query K/V heads in place and take strided views.
`available` says when this path applies; otherwise `neon.attention.sdpa` runs with its mask.
"""

from __future__ import annotations

import torch

# None on a torch without them (looked up once: `available` runs in every attention call)
_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_flash_backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def available(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """A CPU query block shorter than its keys, values as wide as keys (the flash kernel's
    condition), on a torch that has the CPU flash ops."""
    return (q.device.type == "cpu" and q.size(2) < k.size(2) and v.size(-1) == k.size(-1)
            and _flash is not None and _flash_backward is not None)


class _ChunkCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        p = k.size(2) - q.size(2)
        out_prefix, lse_prefix = _flash(q, k[:, :, :p], v[:, :, :p], 0.0, False, scale=scale)
        out_own, lse_own = _flash(q, k[:, :, p:], v[:, :, p:], 0.0, True, scale=scale)
        lse = torch.logaddexp(lse_prefix, lse_own)  # [b, h, sq], float32 or float64
        out = (out_prefix.to(lse.dtype) * (lse_prefix - lse).exp().unsqueeze(-1)
               + out_own.to(lse.dtype) * (lse_own - lse).exp().unsqueeze(-1)).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        p = k.size(2) - q.size(2)
        grad_out = grad_out.contiguous()
        dq_prefix, dk_prefix, dv_prefix = _flash_backward(
            grad_out, q, k[:, :, :p], v[:, :, :p], out, lse, 0.0, False, scale=ctx.scale)
        dq_own, dk_own, dv_own = _flash_backward(
            grad_out, q, k[:, :, p:], v[:, :, p:], out, lse, 0.0, True, scale=ctx.scale)
        return dq_prefix + dq_own, torch.cat([dk_prefix, dk_own], 2), torch.cat([dv_prefix, dv_own], 2), None


def chunk_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float) -> torch.Tensor:
    """q [b, h, sq, d], k [b, h_kv, sk, d], v [b, h_kv, sk, d_v] with sq < sk -> [b, h, sq, d_v]:
    causal attention, query i being key sk - sq + i."""
    return _ChunkCausalAttention.apply(q, k, v, scale)
