"""RMSNorm for megatron-core layers without Transformer Engine or apex.

megatron-core's WrappedTorchNorm refuses sequence parallelism ("not supported by torch
LayerNorm"). This norm takes the same constructor arguments and marks its weight with
`sequence_parallel`, so megatron DDP's `finalize_model_grads` all-reduces its gradient over the
tensor-parallel group as it does for TE's norms.
"""

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        x_fp32 = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_fp32.to(x.dtype)
