"""tools/benchmark_flaming_io.py through its CLI on a tiny store: one line per (entries, tokens)
with a positive step time, and the store it writes opens as a valid store (sizes and hash)."""

import re

from neon.io.store import content_hash, open_store
from tests.data_helpers import load_tool


def test_benchmark_prints_a_time_per_store_size_and_token_count(capsys, tmp_path):
    tool = load_tool("benchmark_flaming_io")
    store = tmp_path / "s"
    tool.write_random_store(str(store), 300, 8, 2, 64)
    opened = open_store(str(store), verify=True)
    assert opened.entries == 300 and opened.meta["content_sha256"] == content_hash(str(store))
    assert tool.main(["--entries", "100", "300", "--tokens", "4", "16", "--hidden", "16", "--key-dim", "8",
                      "--value-width", "2", "--topk", "2", "--vocab", "64", "--repeats", "1",
                      "--work-dir", str(tmp_path)]) == 0
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+([\d.]+)\s", capsys.readouterr().out, re.M)
    assert [(int(n), int(t)) for n, t, _ in rows] == [(100, 4), (100, 16), (300, 4), (300, 16)]
    assert all(float(s) > 0 for _, _, s in rows)


def test_benchmark_reuse_case_prints_both_times_and_their_ratio(capsys, tmp_path):
    tool = load_tool("benchmark_flaming_io")
    assert tool.main(["--entries", "200", "--tokens", "16", "--hidden", "16", "--key-dim", "8",
                      "--value-width", "2", "--topk", "2", "--vocab", "64", "--repeats", "1",
                      "--reuse-layers", "3", "--routed-fraction", "0.5", "--work-dir", str(tmp_path)]) == 0
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", capsys.readouterr().out, re.M)
    assert [(int(n), int(t)) for n, t, *_ in rows] == [(200, 16)]
    (_, _, without, with_, ratio), = rows
    without, with_, ratio = float(without), float(with_), float(ratio)
    assert without > 0 and with_ > 0
    # the ratio of the unrounded times: the printed times are rounded to 1e-4 s, the ratio to 0.01
    rounding = ratio * (0.5e-4 / without + 0.5e-4 / with_) / (1 - 0.5e-4 / with_) + 0.005
    assert abs(ratio - without / with_) <= rounding, (without, with_, ratio)
