"""Activation memory and step time per rank with context parallelism (CP=2) against CP=1.

    torchrun --nproc-per-node 2 tools/benchmark_context_parallel.py                  # CPU: 2K, 4K, 8K
    torchrun --nproc-per-node 2 tools/benchmark_context_parallel.py --seq 8192 16384 --json out.json
    torchrun --nproc-per-node 1 tools/benchmark_context_parallel.py --cp 1 --seq 8192   # one GPU: CP=1 only

Both processes run every measurement: first at CP=1 (two data-parallel ranks, each with a whole
sequence), then at CP=2 (the two ranks share one sequence, megatron's head-tail split), for the
base model and DiffAttention + nGPT, at each sequence length; one micro-batch of one sequence per
rank, forward and backward through Neon's model (embedding to loss).

Activation memory per rank: the bytes of the distinct tensors autograd saves for the backward
during the forward, weights excepted (torch.autograd.graph.saved_tensors_hooks; gathered
keys/values included), the
memory a sequence holds between forward and backward whatever the device. On CUDA the peak of
allocated memory during forward + backward is reported too. Step time: median of the timed
forward + backward passes after one warm-up pass. Every CP=2 figure is given as its ratio to CP=1
of the same variant and length (the goal: activation memory <= 0.55x). On CUDA the processes
use NCCL, one GPU each: CP=2 needs two GPUs (NCCL refuses two ranks on one device and gloo has no
all-gather of CUDA tensors).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core import parallel_state  # noqa: E402
from megatron.core.utils import get_batch_on_this_cp_rank  # noqa: E402

from megatron_plugins import cpu_runtime, distributed  # noqa: E402
from neon.config import NeonConfig  # noqa: E402
from neon.model import build_model  # noqa: E402

VARIANTS = {"base": {}, "diff+ngpt": dict(diff_attention="matched", ngpt=True)}
MODEL = dict(num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=768,
             vocab_size=4096, rope_theta=10000.0)


def saved_bytes(fn, params) -> tuple:
    """(fn(), bytes of the distinct storages other than `params` that autograd saves while fn()
    runs its forward pass)."""
    weights = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def measure(variant: str, seq: int, cp: int, steps: int) -> dict:
    distributed.initialize(context_parallel=cp, seed=1)
    device = cpu_runtime.device()
    cfg = NeonConfig(**MODEL, **VARIANTS[variant], max_position_embeddings=seq, context_parallel_size=cp,
                     pipeline_dtype=torch.float32)
    model = build_model(cfg).to(device)
    gen = torch.Generator().manual_seed(dist.get_rank() // cp)  # the CP ranks of a sequence share it
    tokens = torch.randint(0, MODEL["vocab_size"], (1, seq + 1), generator=gen)
    batch = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], position_ids=torch.arange(seq)[None])
    batch = {k: v.to(device) for k, v in get_batch_on_this_cp_rank(batch).items()}

    def forward():
        return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).float().mean()

    times, activations, peak = [], 0, None
    for step in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss, activations = saved_bytes(forward, model.parameters())
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**30
        if step:  # the first pass warms up
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return dict(variant=variant, seq=seq, cp=cp, activation_gib=activations / 2**30,
                step_s=statistics.median(times), peak_gib=peak)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, nargs="+", default=[2048, 4096, 8192], help="sequence lengths")
    p.add_argument("--steps", type=int, default=2, help="timed forward+backward passes per measurement")
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2], help="context-parallel sizes (1 first: the baseline)")
    p.add_argument("--json", help="write the records here (rank 0)")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    records = []
    for seq in args.seq:
        for variant in VARIANTS:
            for cp in args.cp:
                r = measure(variant, seq, cp, args.steps)
                dist.barrier()
                records.append(r)
                if dist.get_rank() == 0:
                    base = next(b for b in records if b["variant"] == variant and b["seq"] == seq)
                    ratio = (f"  activations x{r['activation_gib'] / base['activation_gib']:.3f}"
                             f"  step x{r['step_s'] / base['step_s']:.2f}") if r is not base else ""
                    peak = f"  peak {r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else ""
                    print(f"seq {seq:6d}  {variant:10s}  CP={cp}  activations {r['activation_gib']:.3f} GiB"
                          f"  step {r['step_s']:.2f} s{peak}{ratio}", flush=True)
    if args.json and dist.get_rank() == 0:
        with open(args.json, "w") as f:
            json.dump(dict(world=dist.get_world_size(), device=str(cpu_runtime.device()), records=records), f,
                      indent=1)
    parallel_state.destroy_model_parallel()
    distributed.shutdown()


if __name__ == "__main__":
    main()
