"""Callables named by FlamingMoE IO tests (`tests.neon.io_callables:<name>`)."""

import torch

VOCAB = 32
RECORDED: list = []  # context batches seen by `recording_sum` in this process


def sum_last_two(context: torch.Tensor) -> torch.Tensor:
    """[T, 2 + W] -> [T, 2]: ((id_{t-1} + id_t) mod VOCAB, id_t); -1 when id_{t-1} is missing."""
    last, prev = context[:, -1], context[:, -2]
    total = torch.where(prev >= 0, (last + prev) % VOCAB, torch.full_like(last, -1))
    return torch.stack([total, last], dim=1)


def recording_sum(context: torch.Tensor) -> torch.Tensor:
    RECORDED.append(context.clone())
    return sum_last_two(context)


def wrong_shape(context: torch.Tensor) -> torch.Tensor:
    return torch.zeros(context.shape[0] + 1, 2, dtype=torch.long)


def sleeps(context: torch.Tensor) -> torch.Tensor:
    """A service that never answers."""
    import time

    time.sleep(600)
    return sum_last_two(context)


def raises(context: torch.Tensor) -> torch.Tensor:
    raise KeyError("service unavailable")


not_a_function = 3


def window_sum(context: torch.Tensor) -> torch.Tensor:
    """[T, 2 + W] -> [T, 1]: the sum of the window's ids (missing ones, -1, count 0) mod VOCAB."""
    return (context[:, 2:].clamp(min=0).sum(dim=1, keepdim=True) % VOCAB).long()
