"""Where a training run is: what the Trainer and its Checkpointer share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass
class TrainerState:
    """Where a run is. The checkpoint holds iteration and consumed_samples."""
    iteration: int = 0
    consumed_samples: int = 0
    last_checkpoint: Optional[Path] = None  # newest checkpoint of this state in --save (saved or resumed from)
    train_loss: Optional[float] = None  # of the last step
    valid_loss: Optional[float] = None  # of the last evaluation
