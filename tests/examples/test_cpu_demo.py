"""examples/cpu_demo.py (what `make demo` runs) through its command line, at a few steps: the
demo data, the training split's datastore, the runs with and without it, the comparison line,
the plot and the lm-eval scores; a bad flag is refused before any of that."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def demo(work: Path, *flags: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "examples" / "cpu_demo.py"), "--work-dir", str(work), *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_demo_trains_with_and_without_the_training_split_datastore_and_evaluates(tmp_path):
    work = tmp_path / "demo"
    r = demo(work, "--train-iters", "4", "--eval-interval", "2", "--eval-iters", "1", "--save-interval", "4")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for step in ("[1/5]", "[2/5] a datastore of the training split (98,2,0)", "[3/5]", "[4/5]", "[5/5]"):
        assert step in r.stdout, r.stdout
    line = next(x for x in r.stdout.splitlines() if "the datastore: validation loss" in x)
    assert "without it" in line and "step time" in line, line
    assert "neon_choice acc" in r.stdout and "Traceback" not in r.stderr, r.stdout[-2000:]
    source = json.loads((work / "datastore" / "ablation_source.json").read_text())
    assert source["split"] == "98,2,0"  # built from the training split the runs train on
    meta = json.loads((work / "datastore" / "meta.json").read_text())
    assert meta["passage_ids"] >= 1 and meta["index"]["type"] == "ivf_flat"
    with_store = (work / "run" / "config.yaml").read_text()
    assert f"source={work / 'datastore'}" in with_store and "exclude=1" in with_store
    assert "kind=store" not in (work / "run_without_store" / "config.yaml").read_text()
    for run in ("run", "run_without_store"):
        kinds = [json.loads(x)["kind"] for x in (work / run / "metrics.jsonl").read_text().splitlines()]
        assert kinds.count("valid") == 2, (run, kinds)
    assert (work / "run" / "loss.png").stat().st_size > 0


def test_a_bad_flag_is_refused_before_the_demo_data_is_built(tmp_path):
    work = tmp_path / "demo"
    r = demo(work, "--train-iters", "-3", timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--train-iters" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (work / "data").exists() and "[1/5]" not in r.stdout
