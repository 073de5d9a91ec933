"""The ablation's result: per variant, its best learning rate and loss, the tokens it needs to
reach the base's final validation loss, and its step time against the base's.

- best lr: the grid rate with the lowest final validation loss averaged over the seeds;
- tokens to base: the first evaluation (of the variant at its best rate, losses averaged over
  the seeds) whose loss is at or below the base's best final loss; the resolution is the
  evaluation interval. The base's own entry is its last evaluation;
- step time: the median of `step_time_s` of every logged training window of every finished run
  of the variant, each run's first window left out (it holds the start-up); ratio = variant / base.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from neon.ablation import runs


@dataclass
class VariantResult:
    name: str
    source: str
    grid: dict[float, dict[int, float | None]]  # lr -> seed -> final loss (None: failed)
    best_lr: float | None
    best_loss: float | None
    seed_losses: list[float]
    curve: list[tuple[int, int, float]]  # (iteration, tokens, mean loss over seeds) at the best lr
    step_time_s: float | None
    failed: list[dict] = field(default_factory=list)  # {lr, seed, reason, log}
    best_at_edge: bool = False
    tokens_to_base: int | None = None
    step_time_ratio: float | None = None


def mean_curve(run_dirs: list[Path], seq_length: int) -> list[tuple[int, int, float]]:
    """(iteration, tokens, loss averaged over the runs) at the evaluations every run has."""
    curves = [runs.validation_curve(d) for d in run_dirs]
    if not curves:
        return []
    common = sorted(set.intersection(*(set(c) for c in curves)))
    return [(it, curves[0][it]["consumed_samples"] * seq_length,
             sum(c[it]["loss"] for c in curves) / len(curves)) for it in common]


def median_step_time(run_dirs: list[Path]) -> float | None:
    times = []
    for d in run_dirs:
        windows = [r["step_time_s"] for r in runs.read_records(d) if r.get("kind") == "train"]
        times += windows[1:] if len(windows) > 1 else windows
    return statistics.median(times) if times else None


def tokens_to_reach(curve: list[tuple[int, int, float]], target: float) -> int | None:
    return next((tokens for _, tokens, loss in curve if loss <= target), None)


def compare_to_base(results: list[VariantResult]) -> None:
    base = next(r for r in results if r.name == "base")
    for r in results:
        if base.best_loss is not None and r.curve:
            r.tokens_to_base = r.curve[-1][1] if r is base else tokens_to_reach(r.curve, base.best_loss)
        if base.step_time_s and r.step_time_s:
            r.step_time_ratio = r.step_time_s / base.step_time_s


def _tokens(n: int | None) -> str:
    if n is None:
        return "not reached"
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k" if n >= 1e3 else str(n)


def markdown(results: list[VariantResult], budget_tokens: int) -> str:
    lines = [f"Token budget per run: {_tokens(budget_tokens)} tokens.", "",
             "| variant | best lr | final validation loss | per seed | tokens to base's final loss | "
             "step time / base | runs ok / failed |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        ok = sum(v is not None for by_seed in r.grid.values() for v in by_seed.values())
        if r.best_lr is None:
            lines.append(f"| {r.name} | failed | - | - | - | - | {ok} / {len(r.failed)} |")
            continue
        edge = " (at the grid's edge)" if r.best_at_edge else ""
        ratio = f"{r.step_time_ratio:.2f}" if r.step_time_ratio is not None else "-"
        seeds = ", ".join(f"{v:.3f}" for v in r.seed_losses)
        reach = "-" if r.best_loss is None else _tokens(r.tokens_to_base)
        lines.append(f"| {r.name} | {r.best_lr:g}{edge} | {r.best_loss:.4f} | {seeds} | {reach} | {ratio} | "
                     f"{ok} / {len(r.failed)} |")
    failures = [(r.name, f) for r in results for f in r.failed]
    if failures:
        lines += ["", "Failed runs:", ""]
        lines += [f"- {name} lr={f['lr']:g} seed={f['seed']}: {f['reason']} (log: {f['log']})" for name, f in failures]
    return "\n".join(lines) + "\n"


def write_json(results: list[VariantResult], path: Path, budget_tokens: int) -> None:
    def clean(r: VariantResult) -> dict:
        d = asdict(r)
        d["grid"] = {f"{lr:g}": {str(s): v for s, v in by_seed.items()} for lr, by_seed in r.grid.items()}
        d["curve"] = [{"iteration": i, "tokens": t, "loss": v} for i, t, v in r.curve]
        return d

    path.write_text(json.dumps({"token_budget": budget_tokens, "variants": [clean(r) for r in results]}, indent=1))


def plot(results: list[VariantResult], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(results):
        if r.curve and r.best_lr is not None:
            ax.plot([t for _, t, _ in r.curve], [v for _, _, v in r.curve], marker="o", color=f"C{i}",
                    label=f"{r.name} (lr {r.best_lr:g})")
    base = next(r for r in results if r.name == "base")
    if base.best_loss is not None and math.isfinite(base.best_loss):
        ax.axhline(base.best_loss, color="gray", linestyle=":", label="base's final loss")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
