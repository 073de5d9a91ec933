"""Neon distributed checkpoints for the converters, in ONE process on CPU.

Reading: the checkpoint is checked first (iteration, every shard file its metadata names, format
version, a Neon model configuration this version knows), then the model is built at TP1/PP1/EP1
in a world-1 gloo group and megatron-core's dist_checkpointing reshards the saved layout (any
TP/PP/EP) into it, through pretrain's own `checkpointing.load`.

Writing: `checkpointing.save` with no optimizer, a weights-only checkpoint that
`pretrain_neon.py --load` starts from (iteration 0, fresh optimizer and schedule).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron.core import dist_checkpointing

from neon.config import NeonConfig
from neon.conversion.errors import ConversionError
from neon.errors import ConfigError
from neon.training import checkpointing
from neon.training.config import MODEL_FIELDS, Config, from_dict

SUPPORTED_FORMAT_VERSIONS = (1,)


@dataclass
class NeonCheckpoint:
    root: Path
    iteration: int
    path: Path
    common: dict

    @property
    def run_config(self) -> dict:
        return self.common["config"]


def locate(root: str | os.PathLike, iteration: Optional[int] = None) -> NeonCheckpoint:
    """Find and check a checkpoint before anything expensive happens."""
    root = Path(root)
    if not root.is_dir():
        raise ConversionError(f"--load {root}: no such directory. Fix: give the --save directory of a "
                              f"pretrain_neon.py run.")
    available = sorted(int(p.name[5:]) for p in root.glob("iter_*") if p.name[5:].isdigit())
    if iteration is None:
        try:
            iteration = checkpointing.latest_iteration(root)
        except checkpointing.CheckpointError as e:
            raise ConversionError(str(e)) from None
        if iteration is None:
            raise ConversionError(f"--load {root}: no {checkpointing.TRACKER} there (not a pretrain_neon.py "
                                  f"checkpoint directory). Fix: give the --save directory of a run"
                                  f"{f', or --iteration N (found {available})' if available else ''}.")
    path = checkpointing.iteration_dir(root, iteration)
    if not path.is_dir():
        raise ConversionError(f"--load {root}: no checkpoint of iteration {iteration} ({path.name} is missing). "
                              f"Fix: choose --iteration from {available}.")
    check_files(path)
    return NeonCheckpoint(root=root, iteration=iteration, path=path, common=read_common(path))


def check_files(path: Path) -> None:
    """Every file of the checkpoint is there: a missing shard is named before loading starts."""
    from torch.distributed.checkpoint import FileSystemReader

    for name in ("metadata.json", "common.pt", ".metadata"):
        if not (path / name).is_file():
            raise ConversionError(f"{path}: {name} is missing, the checkpoint is incomplete (an interrupted save "
                                  f"or a partial copy). Fix: copy the whole directory, or convert another "
                                  f"--iteration.")
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unreadable metadata becomes one clear error
        raise ConversionError(f"{path}/.metadata: unreadable ({type(e).__name__}: {e}). Fix: convert another "
                              f"--iteration.") from e
    files = sorted({info.relative_path for info in metadata.storage_data.values()})
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise ConversionError(f"{path}: missing shard file(s) {missing} of the {len(files)} the checkpoint's "
                              f"metadata lists (a partial copy?). Fix: copy the whole {path.name} directory from "
                              f"where it was saved, or convert another --iteration.")


def read_common(path: Path) -> dict:
    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"{path}/common.pt: unreadable ({type(e).__name__}: {e}). Fix: convert another "
                              f"--iteration.") from e
    version = common.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ConversionError(f"{path}: checkpoint format_version={version!r} is not one this converter reads "
                              f"({list(SUPPORTED_FORMAT_VERSIONS)}). Fix: convert with the Neon version that wrote "
                              f"the checkpoint.")
    config = common.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ConversionError(f"{path}: no Neon model configuration in the checkpoint (not written by "
                              f"pretrain_neon.py?). Fix: give a checkpoint saved by pretrain_neon.py --save.")
    unknown = sorted(set(config["model"]) - set(MODEL_FIELDS))
    if unknown:
        raise ConversionError(f"{path}: unknown architecture: model settings {unknown} are unknown to this Neon "
                              f"version. Fix: convert with the Neon version that trained the model.")
    return common


def single_process() -> None:
    """A world-1 gloo group (its store on a port the kernel picks) and megatron's parallel state at
    TP1/PP1/EP1."""
    from megatron_plugins import distributed

    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ConversionError("the converters run in one process: start them with python, not torchrun")
    distributed.initialize(1, 1, 1)


def one_process_config(run_config: dict) -> tuple[Config, NeonConfig]:
    """The run's Config and the NeonConfig of its model at TP1/PP1/EP1, without weight init."""
    cfg = from_dict(run_config)
    p = cfg.parallelism
    p.tensor_model_parallel_size = p.pipeline_model_parallel_size = p.expert_model_parallel_size = 1
    p.sequence_parallel, p.num_layers_per_virtual_pipeline_stage = False, None
    cfg.model.perform_initialization = False
    try:
        return cfg, cfg.neon_config()
    except (ConfigError, ValueError, AssertionError, TypeError) as e:
        raise ConversionError(f"unknown architecture: the model settings saved in the checkpoint do not build a "
                              f"Neon model here ({e}). Fix: convert with the Neon version that trained it.") from e


def load_model(ckpt: NeonCheckpoint):
    """(model, Config, NeonConfig): the checkpoint's weights in a TP1/PP1/EP1 GPTModel."""
    from neon.model import build_model

    single_process()
    cfg, neon_config = one_process_config(ckpt.run_config)
    model = build_model(neon_config)
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        checkpointing.load(ckpt.root, [model], None, None, load_optimizer=False, load_rng=False,
                           iteration=ckpt.iteration)
    except checkpointing.CheckpointError as e:
        raise ConversionError(str(e)) from e
    except CheckpointException as e:
        raise ConversionError(f"{ckpt.path}: the saved tensors do not match the model built from the checkpoint's "
                              f"own configuration ({str(e)[:2000]}). Fix: convert with the Neon version that "
                              f"wrote the checkpoint.") from None
    return model.eval(), cfg, neon_config


def save_weights(root: str | os.PathLike, model, cfg: Config, iteration: int = 0) -> Path:
    """A weights-only checkpoint (Megatron-LM layout) that pretrain_neon.py --load starts from."""
    return checkpointing.save(root, iteration, [model], None, None, consumed_train_samples=0,
                              config=cfg.to_dict(), keep_last=0)
