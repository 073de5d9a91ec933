"""The entry every rank runs: `pretrain(cfg) -> RunSummary`, that is `Trainer(cfg).run()`
(neon/training/trainer.py). Kept as the name pretrain_neon.py and the tools import."""

from neon.training.trainer import RunSummary, Trainer, TrainingDiverged, pretrain, run_dir_of

__all__ = ["RunSummary", "Trainer", "TrainingDiverged", "pretrain", "run_dir_of"]
