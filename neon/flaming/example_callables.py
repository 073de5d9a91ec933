"""Small `callable` IO functions that need no external service (examples/ablations/flaming_io.yaml).

Each takes the routed tokens' context rows [T, 2 + W] (position, sequence, id_{t-W+1} .. id_t;
-1 before the sequence start) and returns token ids [T, width] (-1: none)."""

from __future__ import annotations

import torch


def previous_tokens(context: torch.Tensor) -> torch.Tensor:
    """[T, 2 + W] -> [T, 2]: (id_{t-2}, id_{t-1}), the two ids before the routed token (-1 when
    the sequence starts later): a lookback the model reads through its own embedding."""
    return context[:, -3:-1].clone()
