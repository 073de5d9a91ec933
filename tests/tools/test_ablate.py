"""tools/ablate.py through its command line, on tiny sizes: real pretrain_neon.py runs under
torchrun on the real test corpus.

One ablation (module fixture) trains the base and a variant whose overlay passes the config
check but crashes every run at model build (a negative init std, which torch's init refuses),
over the grid rule with seed 1 (the 2-seed part of the rule is tests/neon/ablation/test_grid.py).
The tests then read what it wrote, rerun it (nothing may be launched) and give it bad input.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.data_helpers import load_tool

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 900  # seconds for the whole first ablation (7 tiny runs on a loaded 2-core machine)
GRID = ["--seeds", "1", "--max-rates", "4"]  # config lr 1e-2: 3 rates, room for one extension


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, crash overlay, directory) of a 2-layer, 32-wide model training 4 steps."""
    from tests.neon.training.corpus import make_corpus

    d = tmp_path_factory.mktemp("ablate")
    tokenizer, data = make_corpus(d / "corpus")
    config = {
        "model": dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                      max_position_embeddings=32),
        "data": dict(data_path=[data], tokenizer_model=tokenizer, seq_length=32, split="90,10,0", num_workers=0),
        "optimizer": dict(lr=1e-2, min_lr=1e-3),
        "schedule": dict(train_iters=4, micro_batch_size=4, global_batch_size=4, eval_interval=2, eval_iters=1),
        "logging": dict(log_interval=1),
    }
    (d / "tiny.yaml").write_text(yaml.safe_dump(config))
    (d / "crash.yaml").write_text(yaml.safe_dump({"model": {"init_method_std": -1.0}}))
    return d / "tiny.yaml", d / "crash.yaml", d


def ablate_argv(tiny, work: Path, *variants: str) -> list[str]:
    config, _, _ = tiny
    return ["--config", str(config), "--work-dir", str(work), "--variants", *variants, *GRID]


@pytest.fixture(scope="module")
def ablation(tiny):
    """The first invocation, as a user runs it: (completed process, work dir)."""
    work = tiny[2] / "work"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "ablate.py"),
                             *ablate_argv(tiny, work, "base", str(tiny[1]))],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    return result, work


@pytest.mark.slow
def test_ablation_writes_the_table_the_json_and_the_plot(ablation):
    result, work = ablation
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((work / "ablation.json").read_text())
    base = next(v for v in data["variants"] if v["name"] == "base")
    # the best rate's loss is the lowest final validation record among the runs' own metrics.jsonl
    finals = {}
    for run in (work / "runs" / "base").iterdir():
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        finals[float(run.name[2:].split("-")[0])] = next(r["loss"] for r in records
                                                          if r["kind"] == "valid" and r["iteration"] == 4)
    assert base["best_loss"] == pytest.approx(min(finals.values()), rel=1e-12)
    assert float(base["best_lr"]) == min(finals, key=finals.get)
    rates = sorted(finals)
    assert len(rates) in (3, 4) and all(math.isclose(b / a, 3, rel_tol=2e-3) for a, b in zip(rates, rates[1:]))
    assert base["best_at_edge"] == (base["best_lr"] in (rates[0], rates[-1])), "the grid stops only off its edges"
    assert base["tokens_to_base"] == 4 * 4 * 32 and base["step_time_ratio"] == 1.0
    assert "| base |" in (work / "ablation.md").read_text() and "| base |" in result.stdout
    png = (work / "ablation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "round 1, run 1 of 6" in result.stdout and "ETA" in result.stdout


@pytest.mark.slow
def test_a_failing_variant_is_reported_and_the_others_still_run(ablation):
    result, work = ablation
    data = json.loads((work / "ablation.json").read_text())
    crash = next(v for v in data["variants"] if v["name"] == "crash")
    assert crash["best_lr"] is None and len(crash["failed"]) == 3  # seed 1 of each starting rate, no more
    assert all("normal expects std >= 0.0" in f["reason"] for f in crash["failed"]), crash["failed"]
    assert "| crash | failed |" in (work / "ablation.md").read_text()
    assert next(v for v in data["variants"] if v["name"] == "base")["best_lr"] is not None


@pytest.mark.slow
def test_rerun_skips_finished_and_failed_runs(ablation, tiny, capsys):
    _, work = ablation
    logs = {p: p.stat().st_mtime_ns for p in (work / "runs").glob("*/*/train.log")}
    before = json.loads((work / "ablation.json").read_text())
    assert load_tool("ablate").main(ablate_argv(tiny, work, "base", str(tiny[1]))) == 0
    out = capsys.readouterr().out
    assert "round" not in out, out  # no run launched
    assert {p: p.stat().st_mtime_ns for p in logs} == logs
    assert json.loads((work / "ablation.json").read_text()) == before


@pytest.mark.slow
def test_rerun_with_other_run_flags_is_refused_not_mixed(ablation, tiny, capsys):
    _, work = ablation
    argv = [*ablate_argv(tiny, work, "base", str(tiny[1])), "--eval-iters", "2"]
    assert load_tool("ablate").main(argv) == 2
    err = capsys.readouterr().err
    assert "holds a run made with other settings" in err and "--work-dir" in err, err


def assert_refused(tiny, tmp_path, capsys, variants: list[str], *expected: str):
    work = tmp_path / "work"
    assert load_tool("ablate").main(ablate_argv(tiny, work, *variants)) == 2
    err = capsys.readouterr().err
    assert err.startswith("ablate.py: error: ") and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    assert not (work / "runs").exists(), "nothing may run before the input is checked"


def test_unknown_variant_fails_before_any_run(tiny, tmp_path, capsys):
    assert_refused(tiny, tmp_path, capsys, ["base", "ngtp"], "'ngtp'", "Fix:")


@pytest.mark.parametrize("overlay, expected", [
    ({"model": {"ngtp": True}}, ("model.ngtp", "did you mean model.ngpt")),
    ({"model": {"num_layers": "four"}}, ("model.num_layers", "'four'")),
    ({"schedule": {"train_iters": 8}}, ("'schedule'", "same data, token budget")),
    ({"optimizer": {"lr": 1.0}}, ("optimizer.lr", "--lrs")),
])
def test_bad_overlay_fails_before_any_run(tiny, tmp_path, capsys, overlay, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(overlay))
    assert_refused(tiny, tmp_path, capsys, ["base", "diff", str(path)], str(path) if "schedule" in overlay
                   or "optimizer" in overlay else "'bad'", *expected)


@pytest.fixture
def frozen_model(tmp_path, monkeypatch) -> str:
    """A tiny frozen causal LM with the test corpus's vocabulary (256), as NEON_FROZEN_MODEL for
    examples/ablations/flaming_model.yaml."""
    from tests.neon.test_flaming_moe_io_frozen import write_frozen

    path = write_frozen(str(tmp_path / "frozen"), vocab=256)
    monkeypatch.setenv("NEON_FROZEN_MODEL", path)
    return path


def test_plan_checks_every_built_in_variant_and_example_overlay_and_runs_nothing(tiny, tmp_path, capsys,
                                                                                frozen_model):
    from neon.ablation.variants import DEFAULT_VARIANTS

    overlays = sorted(str(p) for p in (ROOT / "examples" / "ablations").glob("*.yaml"))
    work = tmp_path / "work"
    assert len(overlays) >= 2
    assert load_tool("ablate").main([*ablate_argv(tiny, work, *DEFAULT_VARIANTS, *overlays), "--plan"]) == 0
    out = capsys.readouterr().out
    # seed 1 at the 3 starting rates of every variant
    assert f"next round: {3 * (len(DEFAULT_VARIANTS) + len(overlays))} runs" in out, out
    assert not (work / "runs").exists()
    all_features = yaml.safe_load((work / "variants" / "all.yaml").read_text())["model"]
    assert (all_features["diff_attention"], all_features["ngpt"], all_features["flaming_moe"]) == (
        "matched", True, "between")
    base = yaml.safe_load((work / "variants" / "base.yaml").read_text())["model"]
    assert (base["diff_attention"], base["ngpt"], base["flaming_moe"]) == ("off", False, "off")


def test_model_overlay_reads_the_frozen_model_directory_from_the_environment(tiny, tmp_path, capsys,
                                                                             frozen_model, monkeypatch):
    overlay = str(ROOT / "examples" / "ablations" / "flaming_model.yaml")
    work = tmp_path / "work"
    assert load_tool("ablate").main([*ablate_argv(tiny, work, "base", overlay), "--plan"]) == 0
    assert "next round: 6 runs" in capsys.readouterr().out
    written = yaml.safe_load((work / "variants" / "flaming_model.yaml").read_text())["model"]
    assert written["flaming_io_functions"] == [f"name=augment,kind=model,source={frozen_model},layer=-1"]
    # a directory that is not there: refused before any run, naming it
    missing = str(tmp_path / "no_such_model")
    monkeypatch.setenv("NEON_FROZEN_MODEL", missing)
    assert_refused(tiny, tmp_path, capsys, ["base", overlay], "variant 'flaming_model'", "IO function 'augment'",
                   missing, "Fix:")
    monkeypatch.delenv("NEON_FROZEN_MODEL")
    assert_refused(tiny, tmp_path, capsys, ["base", overlay], overlay, "NEON_FROZEN_MODEL", "not set",
                   "Fix: export NEON_FROZEN_MODEL=")


def test_plan_checks_the_default_config_the_demo_model(tiny, tmp_path, capsys):
    """The default --config (examples/configs/cpu_demo.yaml), on the test corpus instead of the demo's."""
    config = yaml.safe_load(tiny[0].read_text())
    data = ["--data-path", *config["data"]["data_path"], "--tokenizer-model", config["data"]["tokenizer_model"]]
    work = tmp_path / "work"
    assert load_tool("ablate").main(["--work-dir", str(work), "--plan", *data]) == 0
    out = capsys.readouterr().out
    assert "next round: 18 runs" in out and "150 steps" in out, out  # 6 variants x 3 rates of cpu_demo.yaml


def test_a_feature_switch_among_the_run_flags_is_refused(tiny, tmp_path, capsys):
    work = tmp_path / "work"
    assert load_tool("ablate").main([*ablate_argv(tiny, work, "base"), "--ngpt"]) == 2
    assert "--ngpt would switch a feature for every variant" in capsys.readouterr().err


def test_the_training_split_datastore_holds_no_validation_document(tiny, tmp_path, capsys, monkeypatch):
    """examples/ablations/datastore_context.yaml: the ablation builds ${NEON_TRAIN_DATASTORE} from
    the base config's training split (tools/build_flaming_store.py), entry by entry exactly the
    training documents' tokens, none of a validation document; a rerun reuses it; a store built
    from other data or a blended --data-path is refused, naming the fix."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from neon.data.datasets import _split_ranges, parse_split
    from neon.io.store import open_store

    monkeypatch.delenv("NEON_TRAIN_DATASTORE", raising=False)
    overlay = str(ROOT / "examples" / "ablations" / "datastore_context.yaml")
    work = tmp_path / "work"
    assert load_tool("ablate").main([*ablate_argv(tiny, work, "base", overlay), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "building the training-split datastore" in out and "next round: 6 runs" in out, out
    written = yaml.safe_load((work / "variants" / "datastore_context.yaml").read_text())["model"]
    assert f"source={work / 'datastore'}," in written["flaming_io_functions"][0]

    config = yaml.safe_load(tiny[0].read_text())["data"]
    docs = IndexedDataset(config["data_path"][0], mmap=True)
    (begin, end), (valid_begin, valid_end) = _split_ranges(parse_split(config["split"]), len(docs))[:2]
    assert valid_end > valid_begin == end > begin  # both splits hold documents
    store = open_store(str(work / "datastore"), verify=True)
    assert store.passage_ids == 8  # what the overlay's exclude=1 needs
    train_next_ids = [t for i in range(begin, end) for t in docs[i].tolist()[1:]]
    assert store.values[:, 0].tolist() == train_next_ids  # every training position, nothing else
    valid = [docs[i].tolist() for i in range(valid_begin, valid_end)]
    assert store.entries == len(train_next_ids) < len(train_next_ids) + sum(len(d) - 1 for d in valid)

    assert load_tool("ablate").main([*ablate_argv(tiny, work, "base", overlay), "--plan"]) == 0
    assert "(built before)" in capsys.readouterr().out
    assert load_tool("ablate").main([*ablate_argv(tiny, work, "base", overlay), "--plan", "--split", "80,20,0"]) == 2
    err = capsys.readouterr().err
    assert "holds a datastore built from" in err and "Fix: use another --work-dir" in err, err
    blend = ["--data-path", "0.5", config["data_path"][0], "0.5", config["data_path"][0]]
    assert load_tool("ablate").main([*ablate_argv(tiny, tmp_path / "w2", "base", overlay), "--plan", *blend]) == 2
    err = capsys.readouterr().err
    assert "not a blend" in err and "export NEON_TRAIN_DATASTORE=" in err and "Traceback" not in err, err
