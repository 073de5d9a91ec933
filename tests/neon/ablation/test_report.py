"""The table's numbers from hand-written metrics.jsonl files, against values worked out by hand."""

from __future__ import annotations

import json

import pytest

from neon.ablation import report


def write_run(path, valid: dict[int, float], step_times: list[float], samples_per_step: int = 4):
    path.mkdir(parents=True)
    lines = [{"kind": "train", "iteration": i + 1, "step_time_s": t, "consumed_samples": (i + 1) * samples_per_step}
             for i, t in enumerate(step_times)]
    lines += [{"kind": "valid", "iteration": it, "consumed_samples": it * samples_per_step, "loss": loss}
              for it, loss in valid.items()]
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return path


def test_mean_curve_averages_the_seeds_at_shared_evaluations(tmp_path):
    a = write_run(tmp_path / "a", {2: 6.0, 4: 5.0}, [1.0])
    b = write_run(tmp_path / "b", {2: 5.0, 4: 4.0, 6: 3.0}, [1.0])
    # tokens = iteration x 4 samples x seq 8
    assert report.mean_curve([a, b], seq_length=8) == [(2, 64, 5.5), (4, 128, 4.5)]


def test_median_step_time_leaves_out_each_runs_first_window(tmp_path):
    a = write_run(tmp_path / "a", {}, [9.0, 1.0, 2.0])
    b = write_run(tmp_path / "b", {}, [8.0, 4.0])
    assert report.median_step_time([a, b]) == 2.0  # median of 1, 2, 4


def result(name, best_loss, curve, step):
    return report.VariantResult(name=name, source="built-in", grid={}, best_lr=1e-3, best_loss=best_loss,
                                seed_losses=[best_loss], curve=curve, step_time_s=step)


def test_tokens_to_the_bases_final_loss_and_step_time_ratio():
    base = result("base", 5.0, [(1, 100, 6.0), (2, 200, 5.0)], 2.0)
    fast = result("fast", 4.5, [(1, 100, 5.2), (2, 200, 4.9), (3, 300, 4.5)], 3.0)  # 4.9 <= 5.0 at 200
    slow = result("slow", 5.5, [(1, 100, 6.5), (2, 200, 5.5)], 1.0)
    report.compare_to_base([base, fast, slow])
    assert base.tokens_to_base == 200 and fast.tokens_to_base == 200 and slow.tokens_to_base is None
    assert fast.step_time_ratio == pytest.approx(1.5) and slow.step_time_ratio == pytest.approx(0.5)
    table = report.markdown([base, fast, slow], budget_tokens=200)
    assert "| slow | 0.001 | 5.5000 | 5.500 | not reached | 0.50 |" in table
