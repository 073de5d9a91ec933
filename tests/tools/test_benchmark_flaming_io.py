"""tools/benchmark_flaming_io.py through its CLI on a tiny store: one line per (entries, index,
tokens) with a build time, a recall in [0, 1] (1 for the exact search), a positive step time and
the ratio to the first row; the store it writes opens as a valid store (sizes and hash)."""

import re

from neon.io.store import content_hash, open_store
from tests.data_helpers import load_tool


def test_benchmark_prints_a_time_per_store_size_and_token_count(capsys, tmp_path):
    tool = load_tool("benchmark_flaming_io")
    store = tmp_path / "s"
    tool.write_random_store(str(store), 300, 8, 2, 64)
    opened = open_store(str(store), verify=True)
    assert opened.entries == 300 and opened.meta["content_sha256"] == content_hash(str(store))
    assert tool.main(["--entries", "1000", "2000", "--indexes", "exact", "ivf_flat", "hnsw", "--tokens", "4", "16",
                      "--nprobe", "2", "--ef-search", "16", "--queries", "20", "--hidden", "16", "--key-dim", "8",
                      "--value-width", "2", "--topk", "2", "--vocab", "64", "--repeats", "1",
                      "--work-dir", str(tmp_path)]) == 0
    pattern = r"^\s+(\d+)\s+(\w+)\s+([\d.]+)\s+(\S+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+(-?\d+)$"
    rows = re.findall(pattern, capsys.readouterr().out, re.M)
    assert [(int(n), i, p, int(t)) for n, i, _, p, _, t, *_ in rows] == [
        (n, i, p, t) for n in (1000, 2000) for i, p in (("exact", "-"), ("ivf_flat", "2"), ("hnsw", "16"))
        for t in (4, 16)]
    assert all(float(s) > 0 and 0 <= float(r) <= 1 for _, _, _, _, r, _, s, *_ in rows)
    assert all(float(r) == 1 for _, i, _, _, r, *_ in rows if i == "exact") and float(rows[0][7]) == 1


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
