"""The main job (`make demo`): from text every machine has to a trained, checkpointed Neon model.

1. builds the demo corpus from Python's own documentation, trains a sentencepiece tokenizer and
   writes megatron's .bin/.idx (neon.data.corpus.prepare_demo_data; no network needed),
2. builds a datastore of the training split (FlamingMoE IO: every training position's 4-gram key
   and next id, no validation document; neon/ablation/datastore.py),
3. trains the model of examples/configs/cpu_demo.yaml on the CPU with pretrain_neon.py, with the
   datastore as a routed function of the global bank (STORE_FUNCTION), and the same run without
   it, for what the store adds to validation loss and step time,
4. plots the training and validation loss of both,
5. evaluates the checkpoint on three small local lm-eval tasks (a cloze, a multiple choice and a
   generation task over the corpus's last documents) with tools/evaluate.py, and prints the
   scores and where checkpoint, metrics and plot are.

    python examples/cpu_demo.py [--work-dir runs/demo] [pretrain_neon.py flags, e.g. --train-iters 50]

Rerunning resumes from the last checkpoint (and does nothing once training finished); delete the
work directory to start over.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VOCAB_SIZE = 2048
# kNN-LM's datastore as a FlamingMoE function: the 4 entries nearest each token's 4-gram code,
# none of the token's own passage (exclude=1, docs/flaming_moe.md)
STORE_FUNCTION = "name=datastore,kind=store,source={store},bank=global,query=context,topk=4,exclude=1"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Other flags go to pretrain_neon.py (see its --help).")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--config", type=Path, default=REPO / "examples" / "configs" / "cpu_demo.yaml")
    args, extra = parser.parse_known_args(argv)
    start = time.monotonic()
    work = args.work_dir.resolve()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # for the tools it starts (megatron's TE/Apex notices)

    from neon.ablation import datastore
    from neon.data.corpus import demo_data_paths, prepare_demo_data
    from neon.errors import NeonError
    from neon.training.config import resolve

    run, plain = work / "run", work / "run_without_store"
    tokenizer, data_prefix = demo_data_paths(work / "data", VOCAB_SIZE)
    data_flags = ["--data-path", str(data_prefix), "--tokenizer-model", str(tokenizer)]
    try:  # the flags checked before any work, with the paths the demo data will have
        cfg = resolve(["--config", str(args.config), *data_flags, "--vocab-size", str(VOCAB_SIZE), "--save", str(run),
                       "--load", str(run), *extra], world_size=1, check_files=False)
        print(f"[1/5] demo data in {work / 'data'} (Python's documentation -> sentencepiece -> .bin/.idx)",
              flush=True)
        prepare_demo_data(work / "data", VOCAB_SIZE)
        print(f"[2/5] a datastore of the training split ({cfg.data.split}) in {work / 'datastore'}", flush=True)
        store = datastore.build(cfg.data, work / "datastore", log="     ")
    except NeonError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return e.exit_status
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    config = args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config
    for i, (directory, flags) in enumerate(((run, ["--flaming-io-functions", STORE_FUNCTION.format(store=store)]),
                                            (plain, [])), 1):
        print(f"[3/5] training {config} on the CPU ({i} of 2: {'with' if flags else 'without'} the datastore) "
              f"-> {directory}", flush=True)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                   str(REPO / "pretrain_neon.py"), "--config", str(args.config), *data_flags, "--save", str(directory),
                   "--load", str(directory), *flags, *extra]
        result = subprocess.run(command, cwd=REPO, env=env)
        if result.returncode != 0:
            print(f"demo: pretrain_neon.py exited with status {result.returncode}", file=sys.stderr)
            return result.returncode

    print("[4/5] loss curves", flush=True)
    sys.path.insert(0, str(REPO / "tools"))
    from plot_metrics import plot, read_metrics

    png = plot([run, plain], run / "loss.png", labels=["with the datastore", "without"], title="Neon CPU demo")
    _, valid = read_metrics(run)
    _, plain_valid = read_metrics(plain)
    its = sorted(valid)
    marker = run / "latest_checkpointed_iteration.txt"
    checkpoint = run / f"iter_{int(marker.read_text()):07d}" if marker.is_file() else None

    print("[5/5] downstream tasks (lm-evaluation-harness, local tasks)", flush=True)
    scores = evaluate(work, run, env)
    print(f"\nNeon demo finished in {time.monotonic() - start:.0f} s")
    if len(its) >= 2:
        print(f"  validation loss: {valid[its[0]]['loss']:.3f} (iteration {its[0]}) -> "
              f"{valid[its[-1]]['loss']:.3f} (iteration {its[-1]})")
    if its and its[-1] in plain_valid:
        from neon.ablation.report import median_step_time  # the ablation table's step time

        with_store, without = valid[its[-1]]["loss"], plain_valid[its[-1]]["loss"]
        step, plain_step = median_step_time([run]), median_step_time([plain])
        print(f"  the datastore: validation loss {with_store:.3f} against {without:.3f} without it "
              f"({with_store - without:+.3f}); step time {step:.3f} s against {plain_step:.3f} s "
              f"(x{step / plain_step:.2f})")
    for line in scores:
        print(f"  {line.strip()}")
    print(f"  checkpoint: {checkpoint}")
    print(f"  datastore:  {store}")
    print(f"  metrics:    {run / 'metrics.jsonl'}")
    print(f"  plot:       {png}")
    print(f"  config:     {run / 'config.yaml'}")
    print(f"  resume or extend: python examples/cpu_demo.py --train-iters N (loads {run} and {plain})")
    return 0


def evaluate(work: Path, run: Path, env: dict) -> list[str]:
    """tools/evaluate.py on the run's checkpoint over local tasks written from the corpus's last 3%
    of documents (the end of the validation and test splits); its score lines."""
    import json

    from neon.data.corpus import CORPUS_NAME
    from neon.evaluation.tasks import LOCAL_TASKS, write_local_tasks

    lines = (work / "data" / CORPUS_NAME).read_text(encoding="utf-8").splitlines()
    held_out = [json.loads(line)["text"] for line in lines[-max(1, len(lines) * 3 // 100):]]
    tasks = write_local_tasks(held_out, work / "eval_tasks", n=64)
    command = [sys.executable, str(REPO / "tools" / "evaluate.py"), "--load", str(run), "--tasks", *LOCAL_TASKS,
               "--include-path", str(tasks), "--quiet", "--output", str(run / "eval_tasks.json")]
    result = subprocess.run(command, cwd=REPO, env={**env, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
                            capture_output=True, text=True)
    if result.returncode != 0:
        return [f"evaluation failed (status {result.returncode}): {result.stderr.strip().splitlines()[-1:]}"]
    return [line for line in result.stdout.splitlines() if line.startswith(" neon_")]


if __name__ == "__main__":
    sys.exit(main())
