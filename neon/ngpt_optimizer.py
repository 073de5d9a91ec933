"""nGPT weight normalisation after every optimizer step, inside megatron-core's optimizer.

    optimizer = add_weight_normalization(get_megatron_optimizer(opt_config, chunks))

(`neon.training.optim.build_optimizer` does this when the model config has ngpt=True.)

A post-step hook on each inner torch optimizer puts the updated *main* parameters back on the unit
sphere before megatron copies them into the model parameters (and, with the distributed optimizer,
all-gathers them), so no copy or all-gather runs twice and bf16 models keep exact fp32 masters:
- FP32Optimizer: the main parameters are the model parameters;
- Float16OptimizerWithFloat16Params: full fp32 copies of each model parameter;
- DistributedOptimizer: each data-parallel rank holds a contiguous slice of the flattened
  parameter, so one weight vector can straddle two ranks. Each rank sums the squares of its part
  of every vector, one all-reduce over the optimizer's data-parallel group completes the sums, and
  each rank scales its own part: the result is that of the unsharded run.
Under tensor parallelism every vector is whole on one rank, and pipeline stages normalise their
own parameters, so no other communication is needed.

Which matrices and along which dim: the `ngpt_unit_norm_dim` attribute `neon.ngpt` sets on them
(1: rows of [out, d_model] matrices; 0: columns of [d_model, in] matrices).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from neon.ngpt import NORM_DIM_ATTR


@dataclass
class _Slice:
    """Elements [start, end) of a row-major [rows, cols] matrix, held in `main` (flat, fp32)."""
    main: torch.Tensor | None
    rows: int
    cols: int
    dim: int
    device: torch.device
    start: int = 0
    end: int = 0

    @property
    def num_vectors(self) -> int:
        return self.rows if self.dim == 1 else self.cols

    def blocks(self):
        """Rectangular pieces (flat offset, first row, n rows, first col, n cols) of the slice."""
        pos, cols = self.start, self.cols
        while pos < self.end:
            row, col = divmod(pos, cols)
            if col or self.end - pos < cols:  # a partial row
                n = min(cols - col, self.end - pos)
                yield pos - self.start, row, 1, col, n
                pos += n
            else:  # a run of whole rows
                n_rows = (self.end - pos) // cols
                yield pos - self.start, row, n_rows, 0, cols
                pos += n_rows * cols

    def _piece(self, offset, n_rows, n_cols):
        return self.main[offset:offset + n_rows * n_cols].view(n_rows, n_cols)

    def sum_of_squares(self) -> torch.Tensor:
        """This slice's part of each vector's squared norm [num_vectors] (fp32)."""
        out = torch.zeros(self.num_vectors, dtype=torch.float32, device=self.device)
        for offset, row, n_rows, col, n_cols in self.blocks():
            sq = self._piece(offset, n_rows, n_cols).float().square()
            if self.dim == 1:
                out[row:row + n_rows] += sq.sum(1)
            else:
                out[col:col + n_cols] += sq.sum(0)
        return out

    def scale_(self, inv_norm: torch.Tensor) -> None:
        for offset, row, n_rows, col, n_cols in self.blocks():
            piece = self._piece(offset, n_rows, n_cols)
            if self.dim == 1:
                piece.mul_(inv_norm[row:row + n_rows, None].to(piece.dtype))
            else:
                piece.mul_(inv_norm[None, col:col + n_cols].to(piece.dtype))


class _SphereProjection:
    """Normalises the main parameters of one megatron optimizer (a hook on its torch optimizer)."""

    def __init__(self, slices: list[_Slice], group=None):
        self.slices, self.group = slices, group

    def __call__(self, *_hook_args) -> None:
        with torch.no_grad():
            local = [s.sum_of_squares() for s in self.slices]
            sizes = [t.numel() for t in local]
            sums = torch.cat(local)
            if self.group is not None and torch.distributed.get_world_size(self.group) > 1:
                torch.distributed.all_reduce(sums, group=self.group)
            inv = sums.clamp_min(torch.finfo(torch.float32).tiny).rsqrt()
            for s, part in zip(self.slices, inv.split(sizes)):
                s.scale_(part)


def _matrix(param) -> tuple[int, int, int] | None:
    dim = getattr(param, NORM_DIM_ATTR, None)
    return None if dim is None else (*param.shape, dim)


def _whole(model_param, main) -> _Slice | None:
    shape = _matrix(model_param)
    return None if shape is None else _Slice(main.view(-1), *shape, main.device, start=0, end=main.numel())


def _projection_for(opt) -> _SphereProjection | None:
    """The projection for one (non-chained) megatron optimizer, or None when it owns no nGPT matrix."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer

    if getattr(opt.config, "use_precision_aware_optimizer", False):
        raise NotImplementedError("nGPT weight normalisation needs megatron's fp32 main params: "
                                  "set use_precision_aware_optimizer=False")
    if isinstance(opt, DistributedOptimizer):
        # every rank lists the same parameters in the same order (the DDP buffers), with its own
        # slice of each (possibly empty), so that the one all-reduce lines up
        mains = {}
        for model_groups, main_groups in ((opt.model_float16_groups, opt.shard_fp32_from_float16_groups),
                                          (opt.model_fp32_groups, opt.shard_fp32_groups)):
            for model_group, main_group in zip(model_groups, main_groups):
                mains.update(zip(model_group, main_group))
        slices = []
        for buffer in opt.buffers:
            for param in buffer.params:
                shape = _matrix(param)
                if shape is None:
                    continue
                if param in mains:
                    r = opt._get_model_param_range_map(param)["param"]
                    slices.append(_Slice(mains[param].view(-1), *shape, param.device, start=r.start, end=r.end))
                else:
                    slices.append(_Slice(None, *shape, param.device))
        return _SphereProjection(slices, opt.data_parallel_group) if slices else None
    if isinstance(opt, Float16OptimizerWithFloat16Params):
        pairs = [pair for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups)
                 for pair in zip(model_group, main_group)]
        pairs += [(p, p) for group in opt.fp32_from_fp32_groups for p in group]
    elif isinstance(opt, FP32Optimizer):
        pairs = [(p, p) for group in opt.optimizer.param_groups for p in group["params"]]
    else:
        raise NotImplementedError(f"nGPT weight normalisation does not know {type(opt).__name__}")
    slices = [s for model, main in pairs if (s := _whole(model, main.data)) is not None]
    return _SphereProjection(slices) if slices else None


def _project_current(opt, *_hook_args) -> None:
    projection = _projection_for(opt)
    if projection is not None:
        projection()


def add_weight_normalization(optimizer):
    """Make every `optimizer.step()` end with nGPT's weights back on the unit sphere. Returns it."""
    if getattr(optimizer, "ngpt_weight_normalization", False):
        return optimizer
    subs = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    hooked = 0
    for opt in subs:
        if opt.is_stub_optimizer:
            continue
        projection = _projection_for(opt)
        if projection is not None:
            # the main tensors are looked up again at every step: a checkpoint load or a
            # re-sharding may replace megatron's main parameters after this call
            opt.optimizer.register_step_post_hook(partial(_project_current, opt))
            hooked += len(projection.slices)
    optimizer.ngpt_weight_normalization = True
    optimizer.ngpt_normalized_matrices = hooked
    return optimizer


def normalized_slices(optimizer) -> list[_Slice]:
    """The slices each hook normalises (for tests and diagnostics)."""
    subs = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    projections = [_projection_for(opt) for opt in subs if not opt.is_stub_optimizer]
    return [s for p in projections if p is not None for s in p.slices]
