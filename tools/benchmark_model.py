"""Training-step throughput of whole Neon models (embedding to loss, optimizer step included), one
variant after another in one process, each reported against the base model of the same run.

    python tools/benchmark_model.py --preset gpu --json $OUT/benchmark_model.json     # ~1B, bf16, CUDA
    python tools/benchmark_model.py --preset tiny                                     # CPU dry run

Each variant builds the model with neon.model.build_model, wraps it in megatron DDP, builds
megatron's Adam, and times `train_step` (forward, backward, gradient reduction, optimizer step)
on random tokens after untimed warm-up steps. Reported per variant: median step time, tokens/s,
TFLOP/s and MFU under both attention conventions (causal attention counted at half as
Megatron-LM counts it, and at full as torchtitan and PaLM count it), peak device memory, and
every figure's ratio to `base`.

The 'gpu' preset has the widths of examples/configs/neon_1b.yaml (~1.1B parameters); the 'tiny'
preset is the same code at sizes a 2-core CPU runs in seconds. A variant that fails (out of
memory, say) is reported with its error and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.optimizer import OptimizerConfig  # noqa: E402

from megatron_plugins import cpu_runtime, distributed  # noqa: E402
from neon.config import NeonConfig  # noqa: E402
from neon.flops import training_flops_per_token  # noqa: E402
from neon.model import build_model  # noqa: E402
from neon.training.metrics import peak_tflops  # noqa: E402
from neon.training.optim import build_optimizer  # noqa: E402
from neon.training.step import build_model_chunks, train_step  # noqa: E402


@dataclass
class Variant:
    name: str
    switches: dict = field(default_factory=dict)
    windowed: bool = False  # run with the preset's sliding window


def flaming(functions_global: int, functions_layer: int, ffn: int) -> dict:
    """FlamingMoE between attention and MLP, as examples/configs/neon_flaming_moe_1b.yaml has it."""
    return dict(flaming_moe="between", flaming_global_functions=functions_global,
                flaming_layer_functions=functions_layer, flaming_global_kind="swiglu",
                flaming_layer_kind="swiglu", flaming_ffn_hidden_size=ffn, flaming_router="topk",
                flaming_topk=2, flaming_aux_loss_coeff=0.01, flaming_z_loss_coeff=0.001)


PRESETS = {
    # examples/configs/neon_1b.yaml widths; micro-batch 2 of 4096 tokens
    "gpu": dict(hidden=2048, layers=16, heads=32, groups=8, ffn=8192, vocab=32000, seq=4096, batch=2,
                window=1024, flaming=(32, 8, 1024)),
    "tiny": dict(hidden=64, layers=2, heads=4, groups=2, ffn=128, vocab=256, seq=128, batch=2,
                 window=32, flaming=(4, 2, 32)),
}
BASELINE = "base"
# what flops_per_token counts (docs/training.md, "How MFU is counted")
FLOPS_SOURCE = ("neon.flops.training_flops_per_token: matmuls of every variant (both DiffAttention "
                "maps, FlamingMoE routers and routed functions), causal attention at half and at full")


def variants(preset: dict) -> list[Variant]:
    return [
        Variant("base"),
        Variant("diff", {"diff_attention": "matched"}),
        Variant("ngpt", {"ngpt": True}),
        Variant("diff-ngpt", {"diff_attention": "matched", "ngpt": True}),
        Variant("flaming", flaming(*preset["flaming"])),
        Variant("base-window", windowed=True),
    ]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    for name in ("hidden", "layers", "heads", "groups", "ffn", "vocab", "seq", "batch", "window"):
        p.add_argument(f"--{name}", type=int, help=f"override the preset's {name}")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (compilation)")
    p.add_argument("--variants", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak (default: from the card's name, none on a CPU)")
    p.add_argument("--json", default=None, help="write the results here too (after every variant)")
    args = p.parse_args(argv)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.window >= args.seq:
        p.error(f"--window {args.window}: a window at least as long as the sequence ({args.seq}) is plain "
                "causal attention and the base-window variant would test nothing; choose a shorter window")
    known = [v.name for v in variants(PRESETS[args.preset])]
    chosen = args.variants.split(",") if args.variants else known
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {known}")
    args.variants = [BASELINE] + [v for v in chosen if v != BASELINE]
    return args


def make_config(args, variant: Variant) -> NeonConfig:
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32  # bf16 on the GPU; fp32 on the CPU dry run
    return NeonConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                      num_query_groups=args.groups, ffn_hidden_size=args.ffn, vocab_size=args.vocab,
                      max_position_embeddings=args.seq, sliding_window=args.window if variant.windowed else None,
                      bf16=on_gpu, params_dtype=dtype, pipeline_dtype=dtype, **variant.switches)


def flops_per_token(cfg: NeonConfig, seq: int, causal_half: bool) -> float:
    """Model FLOPs per trained token: Neon's one count (neon.flops), causal attention
    at half (Megatron-LM's convention) or at full (torchtitan's and PaLM's)."""
    return training_flops_per_token(cfg, seq, causal="half" if causal_half else "full")


def random_batches(args, device_gen: torch.Generator, count: int) -> list[dict]:
    tokens = torch.randint(0, args.vocab, (count, args.batch, args.seq + 1), generator=device_gen)
    positions = torch.arange(args.seq).expand(args.batch, args.seq)
    return [dict(tokens=t[:, :-1].contiguous(), labels=t[:, 1:].contiguous(), position_ids=positions,
                 loss_mask=torch.ones(args.batch, args.seq)) for t in tokens]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_variant(args, variant: Variant) -> dict:
    cfg = make_config(args, variant)
    distributed.set_seed(1234)
    chunks = build_model_chunks(cfg, build_model)
    optimizer = build_optimizer(chunks, OptimizerConfig(
        optimizer="adam", lr=1e-4, weight_decay=0.1, clip_grad=1.0, bf16=cfg.bf16, params_dtype=cfg.params_dtype))
    params = sum(p.numel() for c in chunks for p in c.parameters())
    data = random_batches(args, torch.Generator().manual_seed(0), args.warmup + args.steps)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i, batch in enumerate(data):
        sync()
        start = time.perf_counter()
        result = train_step(chunks, optimizer, iter([batch]), cfg, num_microbatches=1,
                            seq_length=args.seq, micro_batch_size=args.batch)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    tokens = args.batch * args.seq
    record = dict(variant=variant.name, parameters=params, window=cfg.sliding_window, step_s=step,
                  step_min_s=min(times), tokens_per_s=tokens / step, loss=result.loss,
                  peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None)
    for convention, half in (("causal_half", True), ("causal_full", False)):
        tflops = flops_per_token(cfg, args.seq, half) * tokens / step / 1e12
        record[f"tflops_{convention}"] = tflops
        record[f"mfu_{convention}"] = tflops / args.peak_tflops if args.peak_tflops else None
    del chunks, optimizer
    return record


def add_ratios(records: list[dict]) -> None:
    base = next((r for r in records if r["variant"] == BASELINE and "error" not in r), None)
    for r in records:
        if base is not None and "error" not in r:
            r["step_vs_base"] = r["step_s"] / base["step_s"]
            r["tokens_per_s_vs_base"] = r["tokens_per_s"] / base["tokens_per_s"]


def print_table(records: list[dict]) -> None:
    def pct(x):
        return f"{x:.1%}" if x is not None else "-"

    print(f"{'variant':<13}{'params':>8}{'ms/step':>10}{'vs base':>9}{'tok/s':>11}{'MFU half':>10}"
          f"{'MFU full':>10}{'TF/s half':>11}{'peak GiB':>10}")
    for r in records:
        if "error" in r:
            print(f"{r['variant']:<13} FAILED: {r['error']}")
            continue
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        print(f"{r['variant']:<13}{r['parameters'] / 1e6:>7.1f}M{r['step_s'] * 1e3:>10.1f}"
              f"{r['step_vs_base']:>8.3f}x{r['tokens_per_s']:>11.0f}{pct(r['mfu_causal_half']):>10}"
              f"{pct(r['mfu_causal_full']):>10}{r['tflops_causal_half']:>11.4g}{mem:>10}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    distributed.initialize()
    device = cpu_runtime.device()
    args.peak_tflops = args.peak_tflops or (peak_tflops(None) if device.type == "cuda" else None)
    header = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  torch=torch.__version__, preset=args.preset, hidden=args.hidden, layers=args.layers,
                  heads=args.heads, groups=args.groups, ffn=args.ffn, vocab=args.vocab, seq=args.seq,
                  batch=args.batch, window=args.window, steps=args.steps, warmup=args.warmup,
                  peak_tflops=args.peak_tflops, flops=FLOPS_SOURCE,
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print("# benchmark_model: " + " ".join(f"{k}={v}" for k, v in header.items()), flush=True)
    records = []
    for variant in (v for v in variants(PRESETS[args.preset]) if v.name in args.variants):
        try:
            records.append(run_variant(args, variant))
        except Exception as e:  # noqa: BLE001  (report the variant, run the others)
            traceback.print_exc()
            records.append(dict(variant=variant.name, error=f"{type(e).__name__}: {e}"[:300]))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"  {variant.name}: {json.dumps(records[-1])}", flush=True)
        add_ratios(records)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(header, results=records), f, indent=1)
    print_table(records)
    distributed.shutdown()
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
