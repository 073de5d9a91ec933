"""Sliding-window core attention: Neon's kernel against SDPA with an explicit mask, in one run.

    python tools/benchmark_attention.py --preset gpu --json $OUT/benchmark_attention.json   # CUDA
    python tools/benchmark_attention.py --preset tiny                                       # CPU dry run

Kernels, each on the same random q/k/v (GQA heads of examples/configs/neon_1b.yaml) per length:
- `sdpa-mask` (the baseline): the path Neon had before, K/V copied per query head with
  repeat_interleave and an explicit boolean s x s causal-window mask into torch SDPA;
- `neon`: neon.attention.attention, FlexAttention with a block mask on CUDA (SDPA with a mask on
  the CPU, where the forward of the compiled FlexAttention is timed as `flex`);
- `causal`: plain causal SDPA over the whole sequence (flash/cuDNN): what the window saves.

Reported per kernel and length: median forward time (inputs that need gradients, as in
training) and forward+backward time (CUDA events on a GPU), peak memory of forward+backward
above the inputs, and ratios to `sdpa-mask`. On the CPU the compiled FlexAttention has no
backward (torch 2.13): it is timed in forward only, without gradients.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neon.attention import attention, causal_window_mask, flex_window_attention  # noqa: E402

PRESETS = {
    "gpu": dict(seqs=[4096, 8192], window=1024, batch=2, heads=32, groups=8, head_dim=64, reps=20),
    "tiny": dict(seqs=[256], window=64, batch=1, heads=4, groups=2, head_dim=16, reps=3),
}
BASELINE = "sdpa-mask"


def sdpa_mask(q, k, v, *, scale, window):
    """The baseline: K/V repeated per query head and an explicit boolean [s, s] mask."""
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    mask = causal_window_mask(q.size(2), k.size(2), window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def causal(q, k, v, *, scale, window):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


def kernels(device: torch.device) -> dict:
    found = {BASELINE: sdpa_mask, "neon": attention, "causal": causal}
    if device.type == "cpu":
        found["flex"] = flex_window_attention  # compiled; forward only on the CPU
    return found


def timed(fn, reps: int, device: torch.device) -> float:
    """Median seconds of fn() after one untimed call (compilation, caches)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name, kernel, q, k, v, args, device) -> dict:
    scale = 1 / math.sqrt(q.size(-1))
    probe = torch.randn_like(q)

    # The forward as training runs it (inputs that need gradients: the same compiled graph as the
    # backward's), except FlexAttention on the CPU, whose training graph does not compile there.
    cpu_flex = name == "flex" and device.type == "cpu"

    def forward():
        leaves = [t.detach().requires_grad_(not cpu_flex) for t in (q, k, v)]
        with torch.set_grad_enabled(not cpu_flex):
            kernel(*leaves, scale=scale, window=args.window)

    def forward_backward():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        (kernel(*leaves, scale=scale, window=args.window) * probe).sum().backward()

    record = dict(kernel=name, seq=q.size(2), fwd_s=timed(forward, args.reps, device))
    if cpu_flex:
        return dict(record, fwd_bwd_s=None, peak_memory_gib=None)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    record["fwd_bwd_s"] = timed(forward_backward, args.reps, device)
    record["peak_memory_gib"] = ((torch.cuda.max_memory_allocated() - base) / 2**30
                                 if device.type == "cuda" else None)
    return record


def add_ratios(records: list[dict]) -> None:
    for r in records:
        base = next(b for b in records if b["kernel"] == BASELINE and b["seq"] == r["seq"])
        for key in ("fwd_s", "fwd_bwd_s", "peak_memory_gib"):
            if r[key] is not None and base[key]:
                r[f"{key}_vs_base"] = r[key] / base[key]


def column(r: dict, key: str, width: int, scale: float = 1.0) -> str:
    """r[key] (times scale) and its ratio to the baseline, right-aligned; '-' where not measured."""
    value = f"{r[key] * scale:.3f}" if r[key] is not None else "-"
    ratio = f"{r[key + '_vs_base']:.3f}x" if key + "_vs_base" in r else "-"
    return value.rjust(width) + ratio.rjust(9)


def print_table(records: list[dict]) -> None:
    print(f"{'kernel':<11}{'seq':>6}{'fwd ms':>10}{'vs mask':>9}{'fwd+bwd ms':>12}{'vs mask':>9}"
          f"{'peak GiB':>10}{'vs mask':>9}")
    for r in records:
        print(f"{r['kernel']:<11}{r['seq']:>6}" + column(r, "fwd_s", 10, 1e3) + column(r, "fwd_bwd_s", 12, 1e3)
              + column(r, "peak_memory_gib", 10), flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--seqs", type=int, nargs="+")
    for name in ("window", "batch", "heads", "groups", "head_dim", "reps"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int)
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args(argv)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if any(args.window >= s for s in args.seqs):
        p.error(f"--window {args.window}: a window at least as long as the sequence ({args.seqs}) is plain "
                "causal attention and tests nothing; choose a shorter window")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    header = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  torch=torch.__version__, dtype=str(dtype), window=args.window, batch=args.batch,
                  heads=args.heads, groups=args.groups, head_dim=args.head_dim, reps=args.reps,
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print("# benchmark_attention: " + " ".join(f"{k}={v}" for k, v in header.items()), flush=True)
    records = []
    for seq in args.seqs:
        gen = torch.Generator(device=device).manual_seed(seq)
        q = torch.randn(args.batch, args.heads, seq, args.head_dim, device=device, dtype=dtype, generator=gen)
        k, v = (torch.randn(args.batch, args.groups, seq, args.head_dim, device=device, dtype=dtype,
                            generator=gen) for _ in range(2))
        for name, kernel in kernels(device).items():
            records.append(measure(name, kernel, q, k, v, args, device))
            print(f"  {json.dumps(records[-1])}", flush=True)
    add_ratios(records)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header, results=records), f, indent=1)
    print_table(records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
