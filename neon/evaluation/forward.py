"""Full-vocabulary logits of a Neon model at its parallel layout, on every rank.

`ModelLogits(chunks)` is called with the same tokens [b, s] on every rank of the run (a
collective): megatron's forward-only schedule runs the model chunks (any TP/PP/EP layout, the
interleaved schedule included), the last pipeline stage gathers the tensor-parallel vocabulary
shards, and the logits are broadcast to the other stages, so every rank returns the same float32
[b, s, vocab] tensor. The chunks are put in eval mode for the call and back in train mode after.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_plugins import cpu_runtime


class ModelLogits:
    def __init__(self, chunks: list, vocab_size: int):
        self.chunks, self.vocab_size = chunks, vocab_size

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        device = cpu_runtime.device()
        tokens = tokens.to(device)
        positions = torch.arange(tokens.size(1), device=device).expand_as(tokens)

        def step(_iterator, model):
            return model(tokens, positions, None), None  # no loss function: the schedule keeps the output

        training = [chunk.training for chunk in self.chunks]
        for chunk in self.chunks:
            chunk.eval()
        try:
            one = len(self.chunks) == 1  # megatron's schedules take a list only when interleaved
            out = get_forward_backward_func()(
                forward_step_func=step, data_iterator=iter([None]) if one else [iter([None]) for _ in self.chunks],
                model=self.chunks[0] if one else self.chunks, num_microbatches=1, seq_length=tokens.size(1),
                micro_batch_size=tokens.size(0), forward_only=True)
        finally:
            for chunk, was in zip(self.chunks, training):
                chunk.train(was)
        shape = (tokens.size(0), tokens.size(1), self.vocab_size)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            logits = gather_from_tensor_model_parallel_region(out[0]).float().contiguous()
        else:
            logits = torch.empty(shape, dtype=torch.float32, device=device)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.broadcast(logits, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                        group=parallel_state.get_pipeline_model_parallel_group())
        return logits.cpu()
