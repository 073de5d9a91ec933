"""The settings the launch scripts ship with are accepted by pretrain_neon.py's configuration:
each sbatch script's defaults (config, TP/PP/EP, batch sizes, nodes x GPUs) and each sweep's
config, checked with the same resolve() the training script runs first."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from neon.training.config import resolve

ROOT = Path(__file__).resolve().parents[2]
SBATCH = sorted((ROOT / "examples" / "slurm").glob("*.sbatch"))


def _defaults(text: str) -> dict:
    """KNOB=${KNOB:-default} / ${KNOB-default} lines and #SBATCH --name=value lines of a script."""
    knobs = dict(re.findall(r"^([A-Z_]+)=\$\{\1:?-([^}]*)\}", text, flags=re.M))
    knobs.update(re.findall(r"^#SBATCH --([a-z-]+)=(\S+)", text, flags=re.M))
    return knobs


@pytest.mark.parametrize("script", SBATCH, ids=[p.stem for p in SBATCH])
def test_sbatch_defaults_are_a_valid_run(script, launch_corpus):
    text = script.read_text()
    k = _defaults(text)
    tokenizer, data = launch_corpus
    # the flags the script adds (`add --flag "$KNOB"`, only when the knob is set), at their defaults
    argv = ["--data-path", data, "--tokenizer-model", tokenizer, "--save", "/tmp/x"]
    for flag, knob in re.findall(r'^add (--[a-z-]+) "\$([A-Z_]+)"$', text, flags=re.M):
        if k.get(knob):
            argv += [flag, str(ROOT / k[knob]) if flag == "--config" else k[knob]]
    assert "--config" in argv and len(argv) > 6, argv
    world = int(k["nodes"]) * int(k["gpus-per-node"])
    assert int(k["GPUS_PER_NODE"]) == int(k["gpus-per-node"]), "GPUS_PER_NODE must match #SBATCH --gpus-per-node"
    resolve(argv, world_size=world)


def test_sweep_configs_are_a_valid_run(launch_corpus):
    tokenizer, data = launch_corpus
    configs = {yaml.safe_load(p.read_text())["command"][5] for p in (ROOT / "examples" / "sweeps").glob("*.yaml")}
    assert configs == {"examples/configs/neon_125m.yaml"}
    for config in configs:
        resolve(["--config", str(ROOT / config), "--data-path", data, "--tokenizer-model", tokenizer,
                 "--save", "/tmp/x"], world_size=8)  # run.sh gives every run --save
