"""The main job (`make demo`): from text every machine has to a trained, checkpointed Neon model.

1. builds the demo corpus from Python's own documentation, trains a sentencepiece tokenizer and
   writes megatron's .bin/.idx (neon.data.corpus.prepare_demo_data; no network needed),
2. trains the model of examples/configs/cpu_demo.yaml on the CPU with pretrain_neon.py,
3. plots the training and validation loss, and prints where checkpoint, metrics and plot are.

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Other flags go to pretrain_neon.py (see its --help).")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--config", type=Path, default=REPO / "examples" / "configs" / "cpu_demo.yaml")
    args, extra = parser.parse_known_args(argv)
    start = time.monotonic()
    work = args.work_dir.resolve()

    print(f"[1/3] demo data in {work / 'data'} (Python's documentation -> sentencepiece -> .bin/.idx)", flush=True)
    from neon.data.corpus import prepare_demo_data

    tokenizer, data_prefix = prepare_demo_data(work / "data", VOCAB_SIZE)

    run = work / "run"
    print(f"[2/3] training {args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config} "
          f"on the CPU -> {run}", flush=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               str(REPO / "pretrain_neon.py"), "--config", str(args.config), "--data-path", str(data_prefix),
               "--tokenizer-model", str(tokenizer), "--save", str(run), "--load", str(run), *extra]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    result = subprocess.run(command, cwd=REPO, env=env)
    if result.returncode != 0:
        print(f"demo: pretrain_neon.py exited with status {result.returncode}", file=sys.stderr)
        return result.returncode

    print("[3/3] loss curves", flush=True)
    sys.path.insert(0, str(REPO / "tools"))
    from plot_metrics import plot, read_metrics

    png = plot([run], run / "loss.png", labels=["demo"], title="Neon CPU demo")
    _, valid = read_metrics(run)
    its = sorted(valid)
    marker = run / "latest_checkpointed_iteration.txt"
    checkpoint = run / f"iter_{int(marker.read_text()):07d}" if marker.is_file() else None
    print(f"\nNeon demo finished in {time.monotonic() - start:.0f} s")
    if len(its) >= 2:
        print(f"  validation loss: {valid[its[0]]['loss']:.3f} (iteration {its[0]}) -> "
              f"{valid[its[-1]]['loss']:.3f} (iteration {its[-1]})")
    print(f"  checkpoint: {checkpoint}")
    print(f"  metrics:    {run / 'metrics.jsonl'}")
    print(f"  plot:       {png}")
    print(f"  config:     {run / 'config.yaml'}")
    print(f"  resume or extend: python examples/cpu_demo.py --train-iters N (loads {run})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
