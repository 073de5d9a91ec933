"""Distributed checkpoints with megatron-core's dist_checkpointing (torch_dist format).

Layout (Megatron-LM's):  SAVE/latest_checkpointed_iteration.txt   the iteration to resume from
                         SAVE/iter_0000100/                       one complete checkpoint
A checkpoint is complete or absent: every rank writes into SAVE/.tmp_iter_XXXXXXX, all ranks
meet at a barrier, then rank 0 renames the directory and replaces the marker atomically
(write + fsync + os.replace). A crash mid-write leaves the previous marker and checkpoint; the
stale temporary directory is removed by the next save.

Each checkpoint holds the model chunks, the optimizer (the distributed optimizer in its
"fully_reshardable" layout), the learning-rate scheduler, the RNG states per (PP, TP) rank
(and per DP rank with expert parallelism, as Megatron-LM saves them),
the data position (consumed samples) and the resolved run configuration. Loading at another
TP/PP layout reshards model and optimizer (megatron-core does it); RNG states are then
re-seeded instead.

A weights-only checkpoint (`save(..., optimizer=None)`, written by tools/convert_from_hf.py)
holds the model and the common state with `weights_only: True`; loading it skips optimizer,
scheduler and RNG (as Megatron-LM's --finetune / --no-load-optim), and the optimizer's main
parameters are re-copied from the loaded weights.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import queue
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from torch.distributed.checkpoint.api import CheckpointException

from neon.errors import CheckpointError, InfrastructureError, IOSourceError, NeonError
from neon.training import checksums, model_match

TRACKER = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}  # any TP/PP/DP on load


@dataclass
class Loaded:
    iteration: int
    consumed_train_samples: int
    config: dict
    resharded: bool


def prepare_writer(asynchronous: bool = False) -> None:
    """Give megatron's checkpoint writer a result queue without its spawned Manager.

    megatron-core collects the forked writer processes' results through a module-level queue
    that it makes a spawned multiprocessing Manager. A synchronous save gathers the results in
    the training process and reads them back there, so a plain queue does; an asynchronous save
    writes from a forked process, whose results come back through a pipe (a fork-context
    queue, made here before the fork). The Manager cost a process per rank that imports torch to
    unpickle the first results (about 3 CPU-seconds at the first save), and it died of the
    SIGTERM/SIGUSR1 that Slurm and torchrun send the whole process group, failing the save the
    signal asks for."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._results_queue = (multiprocessing.get_context("fork").Queue() if asynchronous
                                       else queue.Queue())


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def _tmp_dir(root, iteration: int) -> Path:
    return Path(root) / f".tmp_iter_{iteration:07d}"


def latest_iteration(root: str | os.PathLike) -> Optional[int]:
    """The iteration the marker names, None when there is no checkpoint yet."""
    marker = Path(root) / TRACKER
    if not marker.is_file():
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{marker}: expected an iteration number, found {text!r}. Fix: point --load "
                              f"at a directory written by pretrain_neon.py --save (a Megatron-LM 'release' "
                              f"checkpoint is not supported), or remove the file to start from scratch.")
    return int(text)


def layout() -> dict:
    ps = parallel_state
    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),  # CP ranks hold copies of the weights: never a reshard
        "dp": ps.get_data_parallel_world_size(),
    }


def rng_per_data_parallel_rank() -> bool:
    """Whether this layout saves an RNG state per data-parallel rank: with expert parallelism
    (Megatron-LM's rule), since each DP rank then runs other experts, which draw other amounts
    from the default generator and the expert-parallel tracker stream (dropout, Gumbel noise);
    otherwise every DP rank of a (PP, TP) rank holds the same state and one copy is saved."""
    return parallel_state.get_expert_model_parallel_world_size() > 1


def _rng_object(per_dp_rank: bool) -> ShardedObject:
    ps = parallel_state
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    pp, tp = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    pp_rank, tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
    if per_dp_rank:
        return ShardedObject("rng_state", state, (pp, tp, ps.get_data_parallel_world_size(with_context_parallel=True)),
                             (pp_rank, tp_rank, dp_rank), replica_id=0)
    return ShardedObject("rng_state", state, (pp, tp), (pp_rank, tp_rank), replica_id=dp_rank)


def _restore_rng(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _materialize_optimizer_state(optimizer) -> None:
    """megatron-core 0.16.1's DistributedOptimizer.state_dict() needs Adam's per-parameter 'step',
    which exists only after a first step (without apex/TE). A fresh optimizer gets megatron's own
    dummy state (one step on zero gradients); every value is overwritten by the load."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and inner is not None and not inner.state:
            opt._init_optimizer_states_with_dummy_values()


def _keep_adam_step_on_load(optimizer) -> None:
    """megatron-core 0.16.1 without apex/TE: DistributedOptimizer.load_state_dict puts torch Adam's
    'step' into each parameter state (restored from the checkpoint's param groups), then copies
    every state key from the "fully_reshardable" tensors, which carry no 'step' (KeyError).
    Supply the already-restored step for that copy."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        original = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if original is None or getattr(original, "_neon_keeps_step", False):
            continue

        def setter(model_param, tensors, _opt=opt, _original=original):
            group, order = _opt.model_param_group_index_map[model_param]
            state = _opt.optimizer.state[_opt.optimizer.param_groups[group]["params"][order]]
            if "step" in state and "step" not in tensors:
                tensors = {**tensors, "step": state["step"]}
            return _original(model_param, tensors)

        setter._neon_keeps_step = True
        opt._set_main_param_and_optimizer_states = setter


def _unwrap(chunk):
    """The GPTModel inside megatron's DDP wrapper (parameter names without 'module.')."""
    return getattr(chunk, "module", chunk)


def _model_keys(chunks) -> list[str]:
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def _sharded_state(chunks, optimizer, scheduler, *, is_loading: bool, with_optimizer: bool,
                   with_rng: bool, rng_per_dp_rank: bool = False, common: Optional[dict] = None) -> dict:
    state = dict(common or {})
    for key, chunk in zip(_model_keys(chunks), chunks):
        state[key] = _unwrap(chunk).sharded_state_dict()
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading,
                                                          metadata=OPTIMIZER_METADATA)
        state["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        state["rng_state"] = _rng_object(rng_per_dp_rank)
    return state


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_marker(root: Path, iteration: int) -> None:
    tmp = root / f".{TRACKER}.tmp"
    with open(tmp, "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / TRACKER)
    _fsync_dir(root)


def save(root: str | os.PathLike, iteration: int, chunks, optimizer, scheduler, *,
         consumed_train_samples: int, config: dict, keep_last: int = 0, asynchronous: bool = False):
    """Write a complete checkpoint of `iteration` (collective: every rank calls it). With
    optimizer=None only the model is written (a weights-only checkpoint). Returns its directory;
    with `asynchronous`, (its directory, megatron's AsyncRequest): the files are written by a
    forked process and the request's finalize functions commit the checkpoint (the caller
    schedules it, neon/training/checkpointer.py). A failure that is the machine's (a full or
    read-only disk) is an InfrastructureError naming the directory, the space and the intact
    checkpoint; the partial directory is removed."""
    prepare_writer(asynchronous)  # every save (training runs, tools/convert_from_hf.py) without megatron's Manager
    root = Path(root)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    tmp, final = _tmp_dir(root, iteration), iteration_dir(root, iteration)
    try:
        if rank0:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp_iter_*"):  # left by a crash during an earlier save
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
    except OSError as e:
        raise save_failure(e, root, iteration) from None
    _barrier()
    common = {"iteration": iteration, "consumed_train_samples": consumed_train_samples,
              "config": config, "layout": layout(), "format_version": FORMAT_VERSION,
              "weights_only": optimizer is None, "rng_per_dp_rank": rng_per_data_parallel_rank()}
    try:
        state = _sharded_state(chunks, optimizer, scheduler, is_loading=False, with_optimizer=optimizer is not None,
                               with_rng=optimizer is not None, rng_per_dp_rank=common["rng_per_dp_rank"],
                               common=common)
        request = dist_checkpointing.save(state, str(tmp), async_sharded_save=asynchronous)
    except NeonError:  # e.g. an IO function's source that vanished: named already
        discard(root, iteration)
        raise
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - torch DCP's is a BaseException
        raise save_failure(e, root, iteration) from None
    if asynchronous:
        request.add_finalize_fn(lambda: commit(root, iteration, keep_last))
        return final, request
    return commit(root, iteration, keep_last)


def commit(root: str | os.PathLike, iteration: int, keep_last: int = 0) -> Path:
    """Make the written .tmp_iter directory of `iteration` the latest checkpoint: after every
    rank has written, its files' checksums are recorded, rank 0 renames it and moves the marker
    (atomically), then removes checkpoints past `keep_last`. Collective."""
    root = Path(root)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    tmp, final = _tmp_dir(root, iteration), iteration_dir(root, iteration)
    _barrier()  # every rank has finished writing
    try:
        checksums.record(tmp)  # collective; before the checkpoint is committed
        if rank0:
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(root)
            _write_marker(root, iteration)
    except OSError as e:
        raise save_failure(e, root, iteration) from None
    if rank0 and keep_last > 0:
        kept = sorted(root.glob("iter_*"), key=lambda p: p.name)
        for old in kept[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
# how a full disk reads through torch's writers (the zip writer of torch.save counts bytes it could not write)
DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "unexpected pos")


def _failures(e: BaseException):
    """`e` and what it wraps: its causes and, for torch DCP's CheckpointException, every rank's."""
    seen, todo = [], [e]
    while todo:
        err = todo.pop()
        if err is None or any(err is s for s in seen):
            continue
        seen.append(err)
        todo += [err.__cause__, err.__context__]
        for failure in (getattr(err, "failures", None) or {}).values():
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
    return seen


def save_failure(e: BaseException, root: Path, iteration: int) -> BaseException:
    """The error of a failed save: an InfrastructureError when the disk is full or read-only
    (naming the directory, the bytes free against a checkpoint's size, the intact checkpoint and
    the fixes), else `e` itself (a bug: its traceback). The partial directory is removed so the
    next attempt has the space."""
    causes = _failures(e)
    full = any(getattr(c, "errno", None) in DISK_FULL or any(t in str(c) for t in DISK_FULL_TEXT) for c in causes)
    read_only = not full and any(getattr(c, "errno", None) in READ_ONLY for c in causes)
    discard(root, iteration)
    latest = latest_checkpoint(root)
    size = sum(f.stat().st_size for f in latest.rglob("*") if f.is_file()) if latest else None
    free = shutil.disk_usage(root if root.exists() else root.parent).free
    # The ranks whose own writes succeeded see a peer's failure as a CheckpointException without
    # its cause: the disk is full for them too when it cannot hold another checkpoint.
    full = full or (isinstance(e, CheckpointException) and not read_only and size is not None and free < size)
    if not (full or read_only):
        return e
    intact = (f"the latest checkpoint, {latest}, is intact: resume from it with --load {root}" if latest
              else "no checkpoint was written before")
    if read_only:
        return InfrastructureError(f"saving iteration {iteration} to {root} failed: the directory is not writable "
                                   f"({_cause(e)}); {intact}. Fix: make {root} writable, or save to another "
                                   f"directory (--save).")
    need = f"a checkpoint of this run takes {size:,} bytes" if size else "this checkpoint did not fit"
    return InfrastructureError(f"saving iteration {iteration} to {root} failed: the disk is full ({free:,} bytes "
                               f"free, {need}); {intact}. Fix: free space on that disk, keep fewer checkpoints "
                               f"(--ckpt-keep-last), or save to another disk (--save).")


def discard(root: str | os.PathLike, iteration: int) -> None:
    """Remove the partial directory of an unfinished save of `iteration` (rank 0); the marker
    never moved, so the previous checkpoint stays the latest."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        shutil.rmtree(_tmp_dir(root, iteration), ignore_errors=True)


def latest_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    """The directory of the latest complete checkpoint under root, None without one."""
    try:
        it = latest_iteration(root)
    except NeonError:
        return None
    return None if it is None else iteration_dir(root, it)


def load(root: str | os.PathLike, chunks, optimizer, scheduler, *, load_optimizer: bool = True,
         load_rng: bool = True, iteration: Optional[int] = None,
         distributed_optimizer: Optional[bool] = None, config: Optional[dict] = None) -> Optional[Loaded]:
    """Restore the latest checkpoint (or `iteration`) under `root` into the built model, optimizer
    and scheduler (collective). Returns None when there is none (the run starts from scratch).
    With `config` (this run's cfg.to_dict()) the model settings are compared with the saved ones
    first. Every file is verified against its recorded checksum before anything is read."""
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            return None
    path = iteration_dir(root, iteration)
    if not (path / "metadata.json").is_file():
        raise CheckpointError(f"{path}: no complete checkpoint of iteration {iteration} there. Fix: check "
                              f"--load / --ckpt-step (or {root}/{TRACKER}) names an existing iter_XXXXXXX "
                              f"directory, or{_earlier_hint(root, iteration, ' ')}.")
    common = _read_common(root, path, iteration)
    weights_only = bool(common.get("weights_only", False))  # no optimizer, scheduler or RNG state in it
    load_optimizer = load_optimizer and not weights_only
    _check_settings(path, common.get("config", {}), config, load_optimizer, distributed_optimizer)
    _verify_files(root, path, iteration)
    saved = common.get("layout", {})
    now = layout()
    resharded = any(saved.get(k) != now[k] for k in ("tp", "pp", "vpp", "ep"))
    # an RNG state per DP rank (EP > 1) restores only at the same DP size; checkpoints written before
    # Neon kept them (no "rng_per_dp_rank") hold one per (PP, TP) rank, which every DP rank loads
    rng_per_dp_rank = bool(common.get("rng_per_dp_rank", False))
    with_rng = (load_rng and not resharded and not weights_only
                and not (rng_per_dp_rank and saved.get("dp") != now["dp"]))
    if load_optimizer:
        _materialize_optimizer_state(optimizer)
    state = _sharded_state(chunks, optimizer, scheduler, is_loading=True, with_optimizer=load_optimizer,
                           with_rng=with_rng, rng_per_dp_rank=rng_per_dp_rank)
    try:
        loaded = dist_checkpointing.load(state, str(path))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - torch DCP's is a BaseException
        raise CheckpointError(f"{path}: loading failed ({_cause(e)}). The recorded model settings match this "
                              f"run's and the files pass their checks, so the saved tensors do not fit this "
                              f"build of the model. Fix:{_earlier_hint(root, iteration, ' ')}; if that fails "
                              f"too, report it with the run's config.yaml.") from None
    for key, chunk in zip(_model_keys(chunks), chunks):
        try:
            _unwrap(chunk).load_state_dict(loaded[key], strict=True)
        except IOSourceError as e:  # a FlamingMoE IO source other than the recorded one
            raise CheckpointError(f"{path}: {e}") from None
    if load_optimizer:
        _keep_adam_step_on_load(optimizer)
        optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    elif optimizer is not None:
        optimizer.reload_model_params()  # main (fp32 / distributed) copies of the loaded weights
    if with_rng:
        _restore_rng(loaded["rng_state"])
    return Loaded(iteration=int(common["iteration"]),
                  consumed_train_samples=int(common["consumed_train_samples"]),
                  config=common.get("config", {}), resharded=resharded)


def _earlier(root, iteration: int) -> Optional[int]:
    """The newest complete checkpoint before `iteration` under root, if any."""
    found = [int(p.name[5:]) for p in Path(root).glob("iter_*")
             if p.name[5:].isdigit() and int(p.name[5:]) < iteration and (p / "metadata.json").is_file()]
    return max(found, default=None)


def _earlier_hint(root, iteration: int, lead: str) -> str:
    earlier = _earlier(root, iteration)
    if earlier is None:
        return f"{lead}there is no earlier checkpoint in {root}: restore this one from a copy, or start from " \
               f"scratch in another --save directory"
    return f"{lead}resume from the previous checkpoint with --ckpt-step {earlier} ({iteration_dir(root, earlier)})"


def _read_common(root, path: Path, iteration: int) -> dict:
    try:
        return dist_checkpointing.load_common_state_dict(str(path))
    except Exception as e:  # noqa: BLE001 - any unreadable file becomes one clear error
        raise CheckpointError(f"{path}/common.pt: cannot be read ({type(e).__name__}: {e}), the checkpoint is "
                              f"damaged. Fix:{_earlier_hint(root, iteration, ' ')}.") from None


def _check_settings(path: Path, saved: dict, config: Optional[dict], load_optimizer: bool,
                    distributed_optimizer: Optional[bool]) -> None:
    if config is not None and isinstance(saved.get("model"), dict):
        message = model_match.mismatch_message(path, saved["model"], config.get("model", {}), load_optimizer)
        if message:
            raise CheckpointError(message)
    saved_dist_opt = saved.get("parallelism", {}).get("use_distributed_optimizer")
    if load_optimizer and distributed_optimizer is not None and saved_dist_opt is not None \
            and saved_dist_opt != distributed_optimizer:
        raise CheckpointError(f"{path}: its optimizer state was saved with use_distributed_optimizer="
                              f"{saved_dist_opt}, this run has {distributed_optimizer}. Fix: pass "
                              f"{'--use-distributed-optimizer' if saved_dist_opt else '--no-use-distributed-optimizer'}"
                              f" or --no-load-optim (weights only).")


def _verify_files(root, path: Path, iteration: int) -> None:
    """Every file against checksums.json (collective); without one, sizes against DCP's index."""
    has_checksums, problem = checksums.verify(path)
    if not has_checksums:
        problem = checksums.check_sizes(path)
    if problem:
        raise CheckpointError(f"{path}: the checkpoint is damaged: {problem}. Fix:{_earlier_hint(root, iteration, ' ')}"
                              f" (and point {TRACKER} at it, or delete {path.name}, to make it the latest).")
    if not has_checksums and (not dist.is_initialized() or dist.get_rank() == 0):
        print(f"warning: {path} has no {checksums.MANIFEST} (written before Neon recorded checksums): loading it "
              f"unverified; a damaged block would go unnoticed.", file=sys.stderr, flush=True)


def _cause(e: BaseException) -> str:
    """The first underlying error of a (torch DCP) exception, in one line."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, failure = next(iter(failures.items()))
        inner = failure[0] if isinstance(failure, tuple) else failure
        return f"on rank {rank}: {_one_line(inner)}"
    return _one_line(e)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if len(text[0]) <= 300 else text[0][:300] + " ..."
    return f"{type(e).__name__}: {first}" if text else type(e).__name__
