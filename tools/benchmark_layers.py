"""Forward+backward step time of the Neon layer variants against the Mistral layer, in one run.

    python tools/benchmark_layers.py                                    # CPU, small preset
    python tools/benchmark_layers.py --device cuda --dtype bf16 --preset gpu --peak-tflops 989

Each variant builds the megatron Neon model (single process, TP=PP=1) with the same sizes and
times forward+backward of its decoder block (every transformer layer and the final norm; no
embedding or logits) on random hidden states. The Mistral base is measured in the same run and
every variant is reported as a ratio to it. Variants alternate in rounds (base, A, B, base, A, B,
...) so drift of a shared or throttling machine hits all of them alike; the median and the
fastest step of each are reported (on a contended machine the fastest is the steadier figure).

MFU (with --peak-tflops): model FLOPs of the step / time / peak, the FLOPs from Neon's one count
(neon.flops: the per-layer terms, no logits; causal attention at half, as Megatron-LM
counts it).

Extend VARIANTS to benchmark a new feature: a name and the NeonConfig switches. nGPT variants
time the normalized layers (no final norm); the weight normalisation after the optimizer step
is not part of the timed step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_plugins import cpu_runtime, distributed  # noqa: E402
from neon.config import NeonConfig  # noqa: E402
from neon.flops import flops_terms  # noqa: E402
from neon.model import build_model  # noqa: E402


@dataclass
class Variant:
    name: str
    switches: dict = field(default_factory=dict)


VARIANTS = [
    Variant("mistral", {}),
    Variant("diff-matched", {"diff_attention": "matched"}),
    Variant("diff-expressive", {"diff_attention": "expressive"}),
    Variant("ngpt", {"ngpt": True}),
    Variant("diff-ngpt", {"diff_attention": "matched", "ngpt": True}),
]
BASELINE = "mistral"

PRESETS = {  # model sizes: CPU (fits a 2-core machine) and GPU ("glow"-like 768/12 layers)
    "cpu": dict(hidden=256, layers=2, heads=8, groups=4, ffn=688, seq=256, batch=2),
    "gpu": dict(hidden=2048, layers=4, heads=16, groups=8, ffn=5632, seq=4096, batch=2),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    for name in ("hidden", "layers", "heads", "groups", "ffn", "seq", "batch"):
        p.add_argument(f"--{name}", type=int, help=f"override the preset's {name}")
    p.add_argument("--window", type=int, default=None, help="sliding window (default: full causal)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=5, help="timed rounds per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--variants", default=",".join(v.name for v in VARIANTS),
                   help="comma-separated subset of: " + ", ".join(v.name for v in VARIANTS))
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense peak for --dtype (e.g. 989 for H100 SXM bf16) to report MFU")
    args = p.parse_args(argv)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible; use --device cpu")
    known = {v.name for v in VARIANTS}
    unknown = set(args.variants.split(",")) - known
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; choose from {sorted(known)}")
    if BASELINE not in args.variants.split(","):
        args.variants = BASELINE + "," + args.variants
    return args


def make_config(args, switches: dict) -> NeonConfig:
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    return NeonConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                      num_query_groups=args.groups, ffn_hidden_size=args.ffn, vocab_size=1024,
                      max_position_embeddings=args.seq, sliding_window=args.window,
                      bf16=args.dtype == "bf16", params_dtype=dtype, pipeline_dtype=dtype, **switches)


def step_flops(cfg: NeonConfig, seq: int, batch: int) -> float:
    """Model FLOPs of one forward+backward of the decoder block: 2 x 3 passes x the per-layer
    multiply-adds of Neon's count (causal attention at half) x layers x tokens."""
    layer = sum(v for k, v in flops_terms(cfg, seq, causal="half").items() if k != "logits")
    return 2.0 * 3 * layer * cfg.num_layers * seq * batch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Bench:
    def __init__(self, variant: Variant, args, device):
        self.variant, self.cfg = variant, make_config(args, variant.switches)
        model = build_model(self.cfg).to(device)
        if args.dtype == "bf16":
            model.bfloat16()
        self.decoder = model.decoder
        self.rope = model.rotary_pos_emb(args.seq)
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        gen = torch.Generator(device=device).manual_seed(0)
        self.x = torch.randn(args.seq, args.batch, args.hidden, device=device, dtype=dtype, generator=gen)
        self.grad = torch.randn(self.x.shape, device=device, dtype=dtype, generator=gen)
        self.device, self.times = device, []
        self.flops = step_flops(self.cfg, args.seq, args.batch)

    def step(self) -> float:
        x = self.x.detach().requires_grad_()
        sync(self.device)
        start = time.perf_counter()
        out = self.decoder(x, attention_mask=None, rotary_pos_emb=self.rope)
        out.backward(self.grad)
        sync(self.device)
        elapsed = time.perf_counter() - start
        self.decoder.zero_grad(set_to_none=True)
        return elapsed


def main(argv=None):
    args = parse_args(argv)
    distributed.initialize()
    device = cpu_runtime.device() if args.device == "cuda" else torch.device("cpu")
    chosen = [v for v in VARIANTS if v.name in args.variants.split(",")]
    print(f"# benchmark_layers: device={torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} "
          f"dtype={args.dtype} hidden={args.hidden} layers={args.layers} heads={args.heads} "
          f"groups={args.groups} ffn={args.ffn} seq={args.seq} batch={args.batch} window={args.window} "
          f"torch={torch.__version__} threads={torch.get_num_threads()}", flush=True)
    benches = []
    for v in chosen:
        b = Bench(v, args, device)
        for _ in range(args.warmup):
            b.step()
        benches.append(b)
        print(f"  built and warmed up {v.name}", flush=True)
    for r in range(args.steps):  # rounds: every variant once per round
        for b in benches:
            b.times.append(b.step())
        print(f"  round {r + 1}/{args.steps}: " + ", ".join(f"{b.variant.name} {b.times[-1] * 1e3:.1f} ms"
                                                         for b in benches), flush=True)
    base = statistics.median(next(b for b in benches if b.variant.name == BASELINE).times)
    base_min = min(next(b for b in benches if b.variant.name == BASELINE).times)
    header = f"{'variant':<18}{'ms/step':>10}{'vs ' + BASELINE:>14}{'min ms':>10}{'min vs':>9}{'TFLOP/s':>10}"
    print(header + (f"{'MFU':>8}" if args.peak_tflops else ""))
    for b in benches:
        t, fastest = statistics.median(b.times), min(b.times)
        tflops = b.flops / t / 1e12
        line = (f"{b.variant.name:<18}{t * 1e3:>10.2f}{t / base:>13.3f}x{fastest * 1e3:>10.2f}"
                f"{fastest / base_min:>8.3f}x{tflops:>10.2f}")
        if args.peak_tflops:
            line += f"{tflops / args.peak_tflops:>8.1%}"
        print(line, flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main()
