"""The learning-rate grid rule of one variant, as a pure function of the results so far.

1. Seed 1 over the starting rates (default: the config's lr / 3, lr, 3 lr).
2. Every other seed at each rate where seed 1 finished. (A variant whose seed-1 runs all failed
   stops here: it is reported as failed.)
3. Score of a rate = mean final validation loss over the seeds; a rate where any seed failed
   scores +inf. If the best rate is the lowest or the highest of the grid, one rate FACTOR
   further out is added (back to 1.); else the grid is done.
4. At most `max_rates` rates per variant; a best rate still at an edge then is flagged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FACTOR = 3.0


def rate(value: float) -> float:
    """Rates are kept to 3 significant digits, so 3 x 1e-3 is 0.003 in names and comparisons."""
    return float(f"{value:.3g}")


def starting_rates(center: float, count: int = 3, factor: float = FACTOR) -> list[float]:
    low = -(count // 2)
    return [rate(center * factor ** (low + i)) for i in range(count)]


def scores(results: dict[float, dict[int, float | None]], seeds: list[int]) -> dict[float, float]:
    """Mean final loss per rate over all seeds; +inf where a seed failed or is missing."""
    out = {}
    for lr, by_seed in results.items():
        losses = [by_seed.get(s) for s in seeds]
        out[lr] = math.inf if any(v is None or not math.isfinite(v) for v in losses) else sum(losses) / len(losses)
    return out


@dataclass
class GridState:
    pending: list[tuple[float, int]]  # (lr, seed) still to run, in order
    best_lr: float | None  # None while pending, or when every rate failed
    at_edge: bool = False  # the best rate is at an edge and max_rates stopped the extension


def next_runs(results: dict[float, dict[int, float | None]], rates: list[float], seeds: list[int],
              max_rates: int = 7, factor: float = FACTOR) -> GridState:
    """What to run next. `results[lr][seed]` = final validation loss, None if the run failed;
    an absent entry is not run yet. `rates` = the starting grid."""
    grid = sorted(set(rates) | set(results))
    first, others = seeds[0], seeds[1:]
    todo = [(lr, first) for lr in grid if first not in results.get(lr, {})]
    if todo:
        return GridState(todo, None)
    finished = [lr for lr in grid if results[lr][first] is not None]
    if not finished:
        return GridState([], None)
    todo = [(lr, s) for lr in finished for s in others if s not in results[lr]]
    if todo:
        return GridState(todo, None)
    score = scores({lr: results[lr] for lr in grid}, seeds)
    best = min(grid, key=lambda lr: (score[lr], lr))
    if not math.isfinite(score[best]):
        return GridState([], None)
    edge = best == grid[0] or best == grid[-1]
    if edge and len(grid) < max_rates:
        new = rate(best / factor if best == grid[0] else best * factor)
        return GridState([(new, first)], None)
    return GridState([], best, at_edge=edge and len(grid) > 1)
