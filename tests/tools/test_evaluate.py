"""Downstream evaluation with lm-evaluation-harness (neon/evaluation/), on small local tasks in
lm-eval's own format (a cloze, a multiple-choice and a generation task over pydoc text):

The model has a FlamingMoE IO function (a Python callable) in every layer.

- tools/evaluate.py on a Neon checkpoint and `lm_eval --model hf` on its Hugging Face export
  score every request alike: each log-likelihood within the bound fp32 rounding allows (below),
  the same greedy generations, and the same accuracies except where two choices are closer than
  that bound;
- pretrain_neon.py --eval-tasks at PP=2 logs the task scores at each evaluation (console and
  metrics.jsonl), and they are the ones tools/evaluate.py gives the saved checkpoint in one
  process;
- an unknown task stops both before any model is built: exit 2, the task named, no traceback.

The bound: a log-likelihood sums, over its n continuation tokens, the picked logit minus the
log-sum-exp of the logits; both are 1-Lipschitz in the max-norm, so |d loglik| <= 2 n |d z|, and
|d z| <= tests.parity.logits_bound (fp32 reductions, scaled by the largest logit). The largest
logit is bounded from the exported weights: |z_v| = |w_v . h| <= |w_v| |h| with |h| <= sqrt(d)
max|g| after the final RMSNorm of gain g.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neon.evaluation.tasks import write_local_tasks
from tests.data_helpers import sample_documents
from tests.neon.training.corpus import make_corpus
from tests.neon.training.runs import REPO, as_flags, check, launch, metrics
from tests.parity import logits_bound

pytestmark = pytest.mark.slow

TASKS = ["neon_cloze", "neon_choice", "neon_generate"]
LIMIT = 24
MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
             max_position_embeddings=64, seq_length=32, micro_batch_size=2, global_batch_size=8, train_iters=6,
             lr=3e-3, min_lr=3e-4, lr_warmup_iters=1, eval_interval=3, eval_iters=1, log_interval=1,
             split="90,10,0", seed=7, flaming_moe="between", flaming_layer_functions=1, flaming_router="topk",
             flaming_topk=1)
# a FlamingMoE IO function (a Python callable over the token context) in every layer: evaluation runs it
IO = ["--flaming-io-functions", "name=add,kind=callable,source=tests.neon.io_callables:sum_last_two,width=2"]
ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run dir, task dir, console output): a model with an IO function trained by pretrain_neon.py
    (default settings otherwise) at PP=2 with --eval-tasks, and the local tasks."""
    d = tmp_path_factory.mktemp("evaluate")
    tokenizer, data = make_corpus(d / "corpus")
    tasks = write_local_tasks(sample_documents(400), d / "tasks")
    run = d / "run"
    out = check(launch(["--data-path", data, "--tokenizer-model", tokenizer, "--save", str(run),
                        "--pipeline-model-parallel-size", "2", "--eval-tasks", *TASKS[:2],
                        "--eval-tasks-include-path", str(tasks), "--eval-tasks-limit", str(LIMIT), *IO,
                        *as_flags(MODEL)],
                       nproc=2, timeout=300, **ENV))
    return run, tasks, out


def run_evaluate(*args, timeout=300):
    return subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), *map(str, args)], cwd=REPO,
                          env={**os.environ, **ENV, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=timeout)


def logit_scale(hf_dir: Path) -> float:
    """An upper bound on |logit| of the exported model (see the module docstring)."""
    from safetensors.torch import load_file

    weights = load_file(str(hf_dir / "model.safetensors"))
    out = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    gain = weights["model.norm.weight"]
    return float(out.norm(dim=1).max() * math.sqrt(gain.numel()) * gain.abs().max())


def samples(records) -> dict:
    """{(task, doc_id): [responses]} from lm-eval sample records (loglik as float, or text)."""
    out = {}
    for task, rows in records.items():
        for row in rows:
            out[(task, row["doc_id"])] = [(float(r[0]), r[1] in (True, "True")) if isinstance(r, list) else r
                                          for r in row["filtered_resps"]]
    return out


def test_neon_checkpoint_and_its_hf_export_score_alike(trained, tmp_path):
    run, tasks, _ = trained
    neon_out = tmp_path / "neon.json"
    res = run_evaluate("--load", run, "--tasks", *TASKS, "--include-path", tasks, "--limit", LIMIT,
                       "--output", neon_out, "--log-samples", "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    neon = json.loads(neon_out.read_text())
    assert f" neon_choice acc: {neon['metrics']['neon_choice']['acc']:.4f}" in res.stdout

    hf = tmp_path / "hf"
    check(launch(["--load", str(run), "--save", str(hf), "--quiet"], nproc=0, timeout=300,
                 script=REPO / "tools" / "convert_to_hf.py"))
    lm_out = tmp_path / "lm_eval"
    res = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                          f"pretrained={hf},trust_remote_code=True,dtype=float32", "--tasks", ",".join(TASKS),
                          "--include_path", str(tasks), "--limit", str(LIMIT), "--device", "cpu",
                          "--batch_size", "8", "--log_samples", "--output_path", str(lm_out)],
                         cwd=tmp_path, env={**os.environ, **ENV, "PYTHONWARNINGS": "ignore"},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    hf_records = {task: [json.loads(line) for line in next(lm_out.rglob(f"samples_{task}_*.jsonl")).read_text()
                         .splitlines()] for task in TASKS}
    hf_results = json.loads(next(lm_out.rglob("results_*.json")).read_text())["results"]

    from neon.conversion.neon_checkpoint import locate, one_process_config

    _, config = one_process_config(locate(run).run_config)
    bound_per_token = 2 * logits_bound(config, MODEL["max_position_embeddings"], logit_scale(hf))
    ours, theirs = samples(neon["samples"]), samples(hf_records)
    assert ours.keys() == theirs.keys() and len(ours) == LIMIT * len(TASKS)
    near_ties = 0
    for key, mine in ours.items():
        other = theirs[key]
        if key[0] == "neon_generate":
            assert mine == other, key
            continue
        doc = next(r for r in neon["samples"][key[0]] if r["doc_id"] == key[1])
        tokens = [max(1, len(a[1])) for a in doc["arguments"]]  # continuation characters >= tokens
        for (a, _), (b, _), n in zip(mine, other, tokens):
            assert abs(a - b) <= n * bound_per_token, (key, a, b, n * bound_per_token)
        if key[0] == "neon_choice":
            ranked = sorted(a for a, _ in mine)
            near_ties += ranked[-1] - ranked[-2] <= 2 * max(tokens) * bound_per_token
    for task in ("neon_choice", "neon_cloze"):
        assert abs(neon["metrics"][task]["acc"] - hf_results[task]["acc,none"]) <= near_ties / LIMIT
    assert neon["metrics"]["neon_generate"]["exact_match"] == hf_results["neon_generate"]["exact_match,none"]


def test_eval_tasks_during_training_log_the_scores_tools_evaluate_gives(trained, tmp_path):
    run, tasks, out = trained
    scores = metrics(run, "tasks")
    assert sorted(scores) == [3, 6]
    assert " task scores at iteration 6 | neon_cloze/perplexity: " in out
    res = run_evaluate("--load", run, "--tasks", *TASKS[:2], "--include-path", tasks, "--limit", LIMIT,
                       "--output", tmp_path / "r.json", "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    single = json.loads((tmp_path / "r.json").read_text())["metrics"]
    assert scores[6]["neon_choice/acc"] == single["neon_choice"]["acc"]
    assert math.isclose(scores[6]["neon_cloze/perplexity"], single["neon_cloze"]["perplexity"], rel_tol=1e-3)


def test_skip_train_evaluates_a_checkpoint_at_its_own_layout(trained, tmp_path):
    """`pretrain_neon.py --load CKPT --skip-train --eval-tasks ...` at the checkpoint's PP=2 logs the
    scores the run logged at that iteration."""
    run, tasks, _ = trained
    out = tmp_path / "eval"
    corpus = run.parent / "corpus"
    check(launch(["--data-path", str(corpus / "corpus_text_document"), "--tokenizer-model", str(corpus / "tok.model"),
                  "--load", str(run), "--skip-train", "--run-dir", str(out), "--pipeline-model-parallel-size", "2",
                  "--eval-tasks", *TASKS[:2], "--eval-tasks-include-path", str(tasks), "--eval-tasks-limit",
                  str(LIMIT), *IO, *as_flags(MODEL)], nproc=2, timeout=300, **ENV))
    again = metrics(out, "tasks")
    assert list(again) == [6] and again[6]["neon_choice/acc"] == metrics(run, "tasks")[6]["neon_choice/acc"]


def test_unknown_task_is_refused_before_a_model_is_built(trained, tmp_path):
    run, tasks, _ = trained
    res = run_evaluate("--load", run, "--tasks", "neon_nonexistent", "--include-path", tasks)
    assert res.returncode == 2 and "'neon_nonexistent' is not a task" in res.stderr and "Traceback" not in res.stderr
    text = check(launch(["--mock-data", "--vocab-size", "128", "--tokenizer-model", str(next(run.parent.glob(
        "corpus/*.model"))), "--eval-tasks", "neon_nonexistent", "--save", str(tmp_path / "r")], nproc=0,
        timeout=120, **ENV), 2)
    assert "--eval-tasks: 'neon_nonexistent' is not a task" in text and "Traceback" not in text
    assert not (tmp_path / "r").exists() and torch is not None
