"""tools/benchmark_startup.py through its CLI, one repeat: both rows with their ratio, and the
checkpoint writer's helper processes (megatron's Manager stays alive; Neon's queue starts none)."""

import re

from tests.data_helpers import load_tool


def test_benchmark_prints_both_costs_and_the_writer_processes(capsys):
    assert load_tool("benchmark_startup").main(["--repeats", "1"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^(import megatron.core|first checkpoint save \(process\))\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x$",
                      out, re.M)
    assert [r[0] for r in rows] == ["import megatron.core", "first checkpoint save (process)"], out
    assert all(float(base) > 0 and float(neon) > 0 for _, base, neon, _ in rows), out
    assert "megatron: helper processes after the save: 1; neon: helper processes after the save: 0" in out, out
