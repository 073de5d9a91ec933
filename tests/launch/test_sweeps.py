"""The W&B sweeps of examples/sweeps/: valid definitions over pretrain_neon.py's flags, and one
run of a sweep's command, its parameters substituted by wandb's own agent code, with wandb
offline: the offline run must hold the training metrics and the config with the sweep's values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.launch import training
from tests.launch.wandb_offline import read_run

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = sorted((ROOT / "examples" / "sweeps").glob("*.yaml"))
BANK_SIZES = [4, 8, 16, 32, 64]


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / "examples" / "sweeps" / name).read_text())


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_sweeps_pretrain_flags_through_run_sh(path):
    from neon.training.config import build_parser

    sweep = yaml.safe_load(path.read_text())
    known = {opt for action in build_parser()._actions for opt in action.option_strings}
    assert sweep["program"] == "pretrain_neon.py", path
    assert sweep["method"] in ("grid", "random", "bayes") and sweep["metric"]["goal"] == "minimize", path
    command = sweep["command"]
    assert command[:4] == ["${env}", "bash", "examples/sweeps/run.sh", "${program}"], path
    assert command[-1] == "${args_no_boolean_flags}", path
    for name, spec in sweep["parameters"].items():
        assert f"--{name}" in known, f"{path.name}: {name} is not a pretrain_neon.py flag"
        assert "value" in spec or "values" in spec or "distribution" in spec, (path.name, name)


def test_sweeps_cover_bank_sizes_routers_and_ablations():
    assert len(SWEEPS) >= 4
    assert _load("flaming_moe_global_bank.yaml")["parameters"]["flaming-global-functions"]["values"] == BANK_SIZES
    assert _load("flaming_moe_layer_bank.yaml")["parameters"]["flaming-layer-functions"]["values"] == BANK_SIZES
    router = _load("flaming_moe_router.yaml")["parameters"]
    assert router["flaming-global-functions"]["values"] == router["flaming-layer-functions"]["values"] == BANK_SIZES
    assert set(router["flaming-router"]["values"]) == {"gumbel", "topk"}
    ablation = _load("diffattn_ngpt_ablation.yaml")["parameters"]
    assert ablation["diff-attention"]["values"] == ["off", "matched", "expressive"]
    assert ablation["ngpt"]["values"] == [False, True]


def _agent_command(sweep: dict, params: dict) -> list[str]:
    """The argv wandb's agent (wandb_agent.Agent._command_run) builds for one run of the sweep."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    command = sweep_utils.create_sweep_command(list(sweep["command"]))
    sweep_vars = sweep_utils.create_sweep_command_args({"args": params})
    sweep_vars.update(interpreter=["python"], program=[sweep["program"]], env=["/usr/bin/env"])
    argv = []
    for chunk in map(str, command):
        if chunk.startswith("${") and chunk.endswith("}"):
            argv += sweep_vars.get(chunk[2:-1]) or []
        else:
            argv.append(chunk)
    return argv


def test_sweep_run_logs_metrics_and_config_to_offline_wandb(launch_corpus, tmp_path):
    sweep = _load("diffattn_ngpt_ablation.yaml")
    # One grid point, as the sweep controller would send it (seed 5678 is not the default).
    chosen = {"diff-attention": "matched", "ngpt": False, "seed": 5678, "train-iters": 5000, "lr-warmup-iters": 500,
              "eval-interval": 500}
    assert all(v in sweep["parameters"][k].get("values", [sweep["parameters"][k].get("value")])
               for k, v in chosen.items())
    params = {k: {"value": v} for k, v in chosen.items()}
    argv = _agent_command(sweep, params)
    assert argv[:4] == ["/usr/bin/env", "bash", "examples/sweeps/run.sh", "pretrain_neon.py"]
    assert argv[-5:] == ["--diff-attention=matched", "--seed=5678", "--train-iters=5000", "--lr-warmup-iters=500",
                         "--eval-interval=500"]  # ngpt false: no flag

    from wandb.sdk.lib import config_util

    run_id, sweep_id = "sweeptest01", "abcd1234"
    param_file = tmp_path / "wandb" / f"sweep-{sweep_id}" / f"config-{run_id}.yaml"
    param_file.parent.mkdir(parents=True)
    config_util.save_config_file_from_dict(str(param_file), params)
    config = training.write_config(tmp_path / "tiny.yaml", launch_corpus)
    iters = 6
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", WANDB_SWEEP_ID=sweep_id, WANDB_RUN_ID=run_id, WANDB_PROJECT="neon-test",
               WANDB_SWEEP_PARAM_PATH=str(param_file), WANDB_SILENT="true", NPROC_PER_NODE="1",
               SWEEP_RUNS_DIR=str(tmp_path / "runs"), OMP_NUM_THREADS="1",
               # a tiny model and a short run instead of the sweep's 125M x 2000 iterations
               SWEEP_EXTRA_ARGS=f"--config {config} --train-iters {iters} --lr-warmup-iters 1 --micro-batch-size 2 "
                                "--global-batch-size 4",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=training.JOB_TIMEOUT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]

    run_dir = tmp_path / "runs" / sweep_id / run_id
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {rec["iteration"]: rec["loss"] for rec in jsonl if rec["kind"] == "train"}
    assert sorted(losses) == list(range(1, iters + 1))

    history, logged_config = read_run(run_dir)
    logged = {row["_step"]: row["train/loss"] for row in history if "train/loss" in row}
    assert logged == pytest.approx(losses), (logged, losses)
    # the sweep's parameters (the agent's param file) and the run's resolved config
    assert logged_config["seed"] == 5678 and logged_config["diff-attention"] == "matched", logged_config
    assert logged_config["schedule"]["seed"] == 5678, logged_config["schedule"]
    assert logged_config["model"]["diff_attention"] == "matched"
    assert logged_config["schedule"]["train_iters"] == iters


def _sweep_values():
    """(sweep file, parameter, value) for every listed value of every sweep."""
    cases = []
    for path in SWEEPS:
        for name, spec in yaml.safe_load(path.read_text())["parameters"].items():
            for value in spec.get("values", [spec["value"]] if "value" in spec else []):
                cases.append(pytest.param(path, name, value, id=f"{path.stem}-{name}-{value}"))
    return cases


@pytest.mark.parametrize("path,name,value", _sweep_values())
def test_every_sweep_value_is_accepted_by_pretrain(path, name, value, launch_corpus):
    from neon.training.config import resolve

    sweep = yaml.safe_load(path.read_text())
    # the other parameters at their first value (a distribution at its minimum)
    base = {k: v["value"] if "value" in v else v["values"][0] if "values" in v else v["min"]
            for k, v in sweep["parameters"].items()}
    params = {k: {"value": v} for k, v in {**base, name: value}.items()}
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    flags = sweep_utils.create_sweep_command_args({"args": params})["args_no_boolean_flags"]
    tokenizer, data = launch_corpus
    resolve(["--config", str(ROOT / "examples/configs/neon_125m.yaml"), "--data-path", data,
             "--tokenizer-model", tokenizer, "--save", "/tmp/x", *flags], world_size=8)
