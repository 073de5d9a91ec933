"""The learning-rate grid rule, driven to the end against known loss landscapes."""

from __future__ import annotations

import math

from neon.ablation.grid import next_runs, starting_rates


def drive(loss, rates, seeds, max_rates=7):
    """Run the rule to completion with loss(lr, seed) (None = the run failed); returns
    (results, final state, every (lr, seed) in the order the rule asked for them)."""
    results, asked = {}, []
    for _ in range(100):
        state = next_runs(results, rates, seeds, max_rates)
        if not state.pending:
            return results, state, asked
        for lr, seed in state.pending:
            asked.append((lr, seed))
            results.setdefault(lr, {})[seed] = loss(lr, seed)
    raise AssertionError("the rule did not stop")


def bowl(optimum):
    """Loss = squared distance in log-rate from the optimum, plus a seed offset."""
    return lambda lr, seed: (math.log(lr) - math.log(optimum)) ** 2 + 0.01 * seed


def test_starting_rates_are_three_apart_around_the_config_rate():
    assert starting_rates(1e-3) == [0.000333, 0.001, 0.003]


def test_interior_optimum_needs_no_extension_and_runs_every_seed():
    results, state, asked = drive(bowl(1e-3), starting_rates(1e-3), [1, 2])
    assert sorted(results) == [0.000333, 0.001, 0.003]
    assert all(set(by_seed) == {1, 2} for by_seed in results.values())
    assert state.best_lr == 0.001 and not state.at_edge
    assert [s for _, s in asked[:3]] == [1, 1, 1]  # seed 1 over the grid first


def test_optimum_beyond_the_top_edge_extends_until_the_best_is_interior():
    results, state, _ = drive(bowl(0.05), starting_rates(1e-3), [1, 2])
    rates = sorted(results)
    assert all(math.isclose(b / a, 3, rel_tol=2e-3) for a, b in zip(rates, rates[1:])), rates
    assert state.best_lr == 0.081  # 0.027 and 0.243 lie on either side of 0.05; 0.081 is the closer in log
    assert rates[0] < state.best_lr < rates[-1]
    assert all(set(by_seed) == {1, 2} for by_seed in results.values())


def test_optimum_below_the_bottom_edge_extends_downwards():
    _, state, _ = drive(bowl(1e-5), starting_rates(1e-3), [1])
    assert math.isclose(state.best_lr, 1.23e-5) and not state.at_edge


def test_max_rates_stops_the_extension_and_flags_the_edge():
    results, state, _ = drive(bowl(1.0), starting_rates(1e-3), [1], max_rates=4)
    assert len(results) == 4 and state.best_lr == max(results) and state.at_edge


def test_a_diverging_rate_counts_as_worse_than_any_finished_one():
    def loss(lr, seed):
        return None if lr > 0.004 else bowl(1.0)(lr, seed)  # better and better until it diverges

    results, state, _ = drive(loss, starting_rates(1e-3), [1, 2])
    assert results[0.009] == {1: None}  # no second seed where the first failed
    assert state.best_lr == 0.003 and not state.at_edge


def test_a_variant_whose_every_first_seed_fails_stops_without_more_runs():
    results, state, asked = drive(lambda lr, seed: None, starting_rates(1e-3), [1, 2])
    assert state.best_lr is None and len(asked) == 3 and {s for _, s in asked} == {1}


def test_the_best_rate_is_chosen_on_the_mean_over_seeds():
    # seed 1 alone prefers 1e-3, the mean over seeds prefers 3e-3
    table = {(0.000333, 1): 3.0, (0.001, 1): 1.0, (0.003, 1): 1.1,
             (0.000333, 2): 3.0, (0.001, 2): 1.5, (0.003, 2): 1.2}
    _, state, _ = drive(lambda lr, s: table.get((lr, s), 5.0), starting_rates(1e-3), [1, 2])
    assert state.best_lr == 0.003
