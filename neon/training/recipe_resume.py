"""Resuming a checkpoint: model settings that only a feature recipe chose follow the checkpoint.

A feature recipe (neon/features/, `Feature.recipe`) may change a model setting for new runs, as
nGPT's does with `ngpt_alpha_sz_scale: inv_d`. A checkpoint trained before that recipe holds
weights that mean something only under the value it was trained with. So, before the model is
built, every model setting whose value came from a recipe (origin "recipe:<feature>") takes the
value the checkpoint recorded (or, for a setting older than the checkpoint, its default: the value
that code had before the setting existed, as in neon/training/model_match.py). A value given in the
YAML file or as a flag is kept, and if it differs from the checkpoint's, loading stops with
model_match's mismatch error.
"""

from __future__ import annotations

from typing import Optional

from megatron.core import dist_checkpointing

from neon.training import checkpointing, model_match
from neon.training.config import Config

ORIGIN = "checkpoint"  # the origin config.yaml records for an adopted value


def recorded_model_settings(cfg: Config) -> Optional[dict]:
    """The `model` section the checkpoint that --load (and --ckpt-step) names recorded; None when
    there is no checkpoint to load (checkpointing.load reports a missing or damaged one)."""
    c = cfg.checkpointing
    if not c.load:
        return None
    iteration = c.ckpt_step if c.ckpt_step is not None else checkpointing.latest_iteration(c.load)
    if iteration is None:
        return None
    path = checkpointing.iteration_dir(c.load, iteration)
    if not (path / "metadata.json").is_file():
        return None
    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
    except Exception:  # noqa: BLE001 - checkpointing.load raises the clear error for this
        return None
    model = common.get("config", {}).get("model") if isinstance(common, dict) else None
    return model if isinstance(model, dict) else None


def adopt_checkpoint_settings(cfg: Config) -> list[str]:
    """Give every recipe-origin model setting the checkpoint's value; one log line per change."""
    saved = recorded_model_settings(cfg)
    if saved is None:
        return []
    defaults = model_match.defaults()
    lines = []
    for name in model_match.architecture_fields():
        key = f"model.{name}"
        origin = cfg.origin(key)
        if not origin.startswith("recipe:") or not hasattr(cfg.model, name):
            continue
        recorded, now = saved.get(name, defaults.get(name)), getattr(cfg.model, name)
        if not model_match.same(recorded, now):
            cfg.set(key, recorded, ORIGIN)
            lines.append(f" {name}: {recorded!r} as the checkpoint in {cfg.checkpointing.load} was trained "
                         f"with, not {now!r} from {origin} (new runs get {now!r}; a value set in the YAML "
                         f"file or as a flag must match the checkpoint)")
    return lines
