"""Every boolean setting of every section, parsed from a real command line: `--flag` sets True,
`--no-flag` (where offered) sets False, and a setting named `no_*` (`--no-load-optim`) is one
flag that sets it True (argparse's BooleanOptionalAction would read it as False)."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import yaml

from neon.training.config import SECTIONS, annotation, build_parser, flag_names, is_bool, resolve
from tests.neon.training.runs import REPO

BOOLEANS = [(section, f.name) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
            if is_bool(annotation(section, f.name))]


PARSER = build_parser()  # parse_args leaves the parser as it was
OPTIONS = [opt for action in PARSER._actions for opt in action.option_strings]


def parse(*argv) -> dict:
    return vars(PARSER.parse_args(list(argv)))


def test_every_section_has_its_booleans_found():
    found = {key for key in BOOLEANS}
    assert {("checkpointing", "no_load_optim"), ("checkpointing", "no_load_rng"),
            ("checkpointing", "exit_signal_handler"), ("parallelism", "sequence_parallel"),
            ("schedule", "skip_train"), ("logging", "progress_bar"), ("model", "ngpt"), ("model", "bf16"),
            ("model", "qk_layernorm"), ("model", "moe_router_padding_for_fp8")} <= found  # last: Optional[bool]
    assert len(BOOLEANS) > 60  # megatron-core's TransformerConfig switches are there too


@pytest.mark.parametrize("section,name", BOOLEANS, ids=[f"{s}.{n}" for s, n in BOOLEANS])
def test_boolean_flag_sets_true_and_its_negation_false(section, name):
    dest, flag = f"{section}.{name}", flag_names(section, name)[0]
    assert parse(flag)[dest] is True, f"{flag} must set {dest}=True"
    negation = "--no-" + flag[2:]
    if name.startswith("no_"):
        assert negation not in OPTIONS, f"{negation} must not exist"
    else:
        assert negation in OPTIONS, f"{negation} is missing"
        assert parse(negation)[dest] is False, f"{negation} must set {dest}=False"
        assert parse(flag, negation)[dest] is False and parse(negation, flag)[dest] is True, "last one wins"
    assert dest not in parse(), "an absent flag leaves the lower layers' value"


def test_no_option_string_is_claimed_twice_or_doubly_negated():
    assert len(OPTIONS) == len(set(OPTIONS))
    assert not [opt for opt in OPTIONS if opt.startswith("--no-no-")]


def _print_config(corpus, *extra, world_size=1):
    tokenizer, data = corpus
    argv = ["--data-path", data, "--tokenizer-model", tokenizer, "--num-layers", "2", "--hidden-size", "64",
            "--num-attention-heads", "4", "--seq-length", "32", "--max-position-embeddings", "64",
            "--split", "90,10,0", "--print-config", *extra]
    env = dict(os.environ, WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("RANK", None)
    done = subprocess.run([sys.executable, str(REPO / "pretrain_neon.py"), *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return yaml.safe_load(done.stdout)


def test_pretrain_neon_reads_the_run_booleans_from_its_command_line(corpus):
    """Through the real script: the non-model booleans, every one away from its default, then back."""
    on = _print_config(corpus, "--no-load-optim", "--no-load-rng", "--no-exit-signal-handler", "--no-progress-bar",
                       "--skip-train", "--use-distributed-optimizer", "--overlap-grad-reduce",
                       "--tensor-model-parallel-size", "2", "--sequence-parallel", "--ngpt", world_size=2)
    expected = {("checkpointing", "no_load_optim"): True, ("checkpointing", "no_load_rng"): True,
                ("checkpointing", "exit_signal_handler"): False, ("logging", "progress_bar"): False,
                ("schedule", "skip_train"): True, ("parallelism", "use_distributed_optimizer"): True,
                ("parallelism", "overlap_grad_reduce"): True, ("parallelism", "sequence_parallel"): True,
                ("model", "ngpt"): True}
    assert {key: on[key[0]][key[1]] for key in expected} == expected, json.dumps(on, default=str)[:2000]


def test_resolve_takes_the_negations_over_a_yaml_file(corpus, tmp_path):
    """The YAML file turns each run boolean away from its default; the flags turn it back."""
    tokenizer, data = corpus
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"checkpointing": {"no_load_optim": True, "exit_signal_handler": False},
                                      "logging": {"progress_bar": False}, "schedule": {"skip_train": True},
                                      "model": {"ngpt": True}, "parallelism": {"use_distributed_optimizer": True}}))
    cfg = resolve(["--config", str(config), "--data-path", data, "--tokenizer-model", tokenizer,
                   "--split", "90,10,0", "--exit-signal-handler", "--progress-bar", "--no-skip-train", "--no-ngpt",
                   "--no-use-distributed-optimizer"], check_files=False)
    assert (cfg.checkpointing.no_load_optim, cfg.checkpointing.exit_signal_handler, cfg.logging.progress_bar,
            cfg.schedule.skip_train, cfg.model.ngpt, cfg.parallelism.use_distributed_optimizer) == (
        True, True, True, False, False, False)
    assert cfg.origin("checkpointing.no_load_optim") == "config file"
    assert cfg.origin("model.ngpt") == "command line"

