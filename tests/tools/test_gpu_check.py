"""tools/gpu_check.sh --dry-run: the prepared GPU run end to end on the CPU, at tiny sizes, with the
same script and benchmark code, so it cannot rot between GPU sessions."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def run_check(out: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_dry_run_writes_every_section(tmp_path):
    r = run_check(tmp_path, "--dry-run")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "megatron-core 0.16.1 device NO CUDA" in (tmp_path / "gpu_check.log").read_text()
    assert len(list(tmp_path.iterdir())) <= 8  # what the device tool brings back

    # tests: the GPU-marked tests were collected and skipped cleanly (no CUDA here)
    suite = ET.parse(tmp_path / "gpu_tests.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) > 0 and int(suite.get("skipped")) == int(suite.get("tests"))
    assert int(suite.get("failures")) == int(suite.get("errors")) == 0

    # model: every variant trained; at init (std 0.02) the logits are near uniform: loss ~ ln(vocab)
    model = json.loads((tmp_path / "benchmark_model.json").read_text())
    records = {r["variant"]: r for r in model["results"]}
    assert list(records) == ["base", "diff", "ngpt", "diff-ngpt", "flaming", "base-window"]
    for name, rec in records.items():
        assert "error" not in rec, (name, rec)
        assert rec["tokens_per_s"] > 0 and rec["tflops_causal_half"] > 0, name
        assert rec["tflops_causal_half"] <= rec["tflops_causal_full"], name
        assert abs(rec["loss"] - math.log(model["vocab"])) < 0.5, (name, rec["loss"])
    assert records["base"]["step_vs_base"] == 1.0
    # the FLOPs behind its TFLOP/s are Neon's one count, at both conventions, for each variant
    from neon.flops import training_flops_per_token

    bench = load_tool("benchmark_model")
    args = bench.parse_args(["--preset", model["preset"], *[f"--{k}={model[k]}" for k in (
        "hidden", "layers", "heads", "groups", "ffn", "vocab", "seq", "batch", "window")]])
    for variant in bench.variants(bench.PRESETS[model["preset"]]):
        rec, cfg = records[variant.name], bench.make_config(args, variant)
        for convention in ("half", "full"):
            got = rec[f"tflops_causal_{convention}"] * 1e12 / rec["tokens_per_s"]
            assert got == pytest.approx(training_flops_per_token(cfg, args.seq, causal=convention), rel=1e-9)
    assert records["diff"]["tflops_causal_half"] / records["diff"]["tokens_per_s"] > (
        records["base"]["tflops_causal_half"] / records["base"]["tokens_per_s"])  # the second map
    assert records["base-window"]["window"] == model["window"] < model["seq"]
    assert (tmp_path / "benchmark_model.txt").read_text().count("x ") >= 6  # the ratio table

    # attention: every kernel at every length, FlexAttention's CPU backward left out
    attn = json.loads((tmp_path / "benchmark_attention.json").read_text())
    kernels = {(r["kernel"], r["seq"]): r for r in attn["results"]}
    for seq in {r["seq"] for r in attn["results"]}:
        assert {k for k, s in kernels if s == seq} == {"sdpa-mask", "neon", "causal", "flex"}
        assert kernels["sdpa-mask", seq]["fwd_s_vs_base"] == 1.0
        assert kernels["flex", seq]["fwd_bwd_s"] is None and kernels["neon", seq]["fwd_bwd_s"] > 0

    # io: a timed row per index for the dry run's store size and token count
    io = (tmp_path / "benchmark_flaming_io.txt").read_text()
    for index, search in (("exact", "-"), ("ivf_flat", "4")):
        assert re.search(rf"^\s+1000\s+{index}\s+[\d.]+\s+{search}\s+[\d.]+\s+16\s+[\d.]+\s", io, re.M), io

    # cp: both variants at both lengths, CP=1 and CP=2; splitting the sequence lowers each rank's
    # activations (every per-token activation halves; the gathered keys/values do not)
    rows = re.findall(r"^seq\s+(\d+)\s+(\S+)\s+CP=(\d)\s+activations ([\d.]+) GiB\s+step ([\d.]+) s",
                      (tmp_path / "benchmark_context_parallel.txt").read_text(), re.M)
    cp = {(variant, int(seq), int(size)): (float(act), float(step)) for seq, variant, size, act, step in rows}
    assert set(cp) == {(v, s, c) for v in ("base", "diff+ngpt") for s in (64, 128) for c in (1, 2)}, rows
    for (variant, seq, size), (activations, step) in cp.items():
        assert step > 0 and activations > 0
        if size == 2:
            assert activations < cp[variant, seq, 1][0], (variant, seq)


def test_unknown_section_is_refused_before_any_work(tmp_path):
    r = run_check(tmp_path, "--dry-run", "--only", "modle", timeout=30)
    assert r.returncode == 2
    assert "--only modle is not a section; choose one of: tests model attention io cp" in r.stderr
    assert not any(tmp_path.iterdir())


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("tool", "argv"), [("benchmark_attention", ["--seqs", "256", "--window", "256"]),
                                            ("benchmark_model", ["--window", "128"])])
def test_benchmarks_refuse_a_window_that_masks_nothing(tool, argv, capsys):
    with pytest.raises(SystemExit) as e:
        load_tool(tool).parse_args(argv)
    assert e.value.code == 2
    assert f"--window {argv[-1]}: a window at least as long as the sequence" in capsys.readouterr().err
