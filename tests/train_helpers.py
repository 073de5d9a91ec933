"""Tiny training runs on megatron's schedules inside test ranks: random token micro-batches and
an SGD loop (tests of FlamingMoE in whole models)."""

from __future__ import annotations

import torch


def random_batches(n: int, *, vocab: int, micro_batch: int, seq: int, seed: int = 0):
    """n micro-batches of uniform random tokens [micro_batch, seq] (labels: the next tokens)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        tokens = torch.randint(0, vocab, (micro_batch, seq + 1), generator=gen)
        yield dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], position_ids=torch.arange(seq).expand(micro_batch, seq),
                   loss_mask=torch.ones(micro_batch, seq))


def sgd_losses(chunks, cfg, data, *, steps: int, num_microbatches: int, seq_length: int, micro_batch_size: int,
               lr: float = 0.5) -> tuple[list, list]:
    """(losses, grad norms) of `steps` plain-SGD steps on `data`. SGD's update is linear in the
    gradient, so rounding differences between two layouts stay rounding-sized (Adam's would not)."""
    from megatron.core.optimizer import OptimizerConfig

    from neon.training.optim import build_optimizer
    from neon.training.step import train_step

    opt = build_optimizer(chunks, OptimizerConfig(optimizer="sgd", lr=lr, weight_decay=0.0, bf16=False))
    losses, norms = [], []
    for _ in range(steps):
        r = train_step(chunks, opt, data, cfg, num_microbatches=num_microbatches, seq_length=seq_length,
                       micro_batch_size=micro_batch_size)
        losses.append(r.loss)
        norms.append(r.grad_norm)
    return losses, norms
