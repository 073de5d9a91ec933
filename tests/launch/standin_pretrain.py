"""A stand-in for pretrain_neon.py with the same launch contract, to test launchers quickly.

Started by torchrun like the real script; takes the flags the launchers pass (--config, --save,
--load, --train-iters, --save-interval, --run-dir, parallel sizes; others are accepted and
ignored). Every rank fits y = 2x with plain data parallelism over gloo (gradients all-reduced),
so the loss falls; rank 0 appends {"kind": "train", "iteration", "loss", "world_size",
"restarts"} to <run-dir>/metrics.jsonl. SIGTERM / SIGUSR1: finish the step, save, exit 0.
--load resumes from the last complete checkpoint (written to a temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--save")
    p.add_argument("--load")
    p.add_argument("--run-dir")
    p.add_argument("--train-iters", type=int, default=20)
    p.add_argument("--save-interval", type=int, default=1000)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--step-seconds", type=float, default=0.2)
    args, _unknown = p.parse_known_args()

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGUSR1, on_signal)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world % args.tensor_model_parallel_size == 0, "world size not divisible by TP"
    run_dir = Path(args.run_dir or args.save or "runs/standin")
    ckpt = Path(args.load or args.save or run_dir) / "standin.pt"

    w = torch.zeros(1)
    start = 0
    if args.load and ckpt.exists():
        state = torch.load(ckpt)
        w, start = state["w"], state["iteration"]
    gen = torch.Generator().manual_seed(rank)

    def save(iteration: int) -> None:
        if rank == 0 and args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            tmp = Path(args.save) / "standin.pt.tmp"
            torch.save({"w": w, "iteration": iteration}, tmp)
            os.replace(tmp, Path(args.save) / "standin.pt")
        dist.barrier()

    metrics = open(run_dir / "metrics.jsonl", "a", buffering=1) if rank == 0 else None
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"standin: world {world}, starting at iteration {start}", flush=True)
    iteration = start
    while iteration < args.train_iters:
        x = torch.randn(64, generator=gen)
        loss = ((w * x - 2 * x) ** 2).mean()
        grad = (2 * (w * x - 2 * x) * x).mean().reshape(1)
        dist.all_reduce(grad)
        w = w - 0.1 * grad / world
        iteration += 1
        total = loss.reshape(1).clone()
        dist.all_reduce(total)
        if rank == 0:
            metrics.write(json.dumps({"kind": "train", "iteration": iteration, "loss": total.item() / world,
                                      "world_size": world,
                                      "restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}) + "\n")
        time.sleep(args.step_seconds)
        flag = torch.tensor([1 if stop["signal"] else 0])
        dist.all_reduce(flag)  # every rank stops at the same step when any one got the signal
        if flag.item() or iteration % args.save_interval == 0:
            save(iteration)
        if flag.item():
            if rank == 0:
                print(f"standin: signal received, saved at iteration {iteration}, exiting", flush=True)
            break
    else:
        save(iteration)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
