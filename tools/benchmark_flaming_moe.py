"""Step time of the FlamingMoE block at top-1: megatron dispatch vs the prototype's dense formulation.

Dispatched: neon.flaming.FlamingMoE (megatron router + token dispatcher + SequentialMLP of the
bank's functions): only the chosen function runs on each token.
Dense (the prototype): every function runs on every token, then the outputs are weighted by
the hard Gumbel selection, r = x + sum_i sel_i f_i(x) (one batched einsum over the bank).
Both: one bank of bias-free Linear(d, d) functions (the prototype's kind), forward + backward
in training mode, the same tokens. Printed: median step time per bank size, the ratio
dense / dispatched measured in the same run, and the dispatched block's TFLOP/s: model FLOPs from
Neon's one count (neon.flops: the "flaming" term, router + top-1 function, x 2 x 3
passes x tokens), which the dense formulation spends n times over on the functions.

    python tools/benchmark_flaming_moe.py --sizes 4 16 64 --hidden 256 --tokens 2048
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class DenseFunctionBank(torch.nn.Module):
    """The prototype: Gumbel-softmax(hard) selection over ALL n function outputs."""

    def __init__(self, n: int, d: int, tau: float = 1.0):
        super().__init__()
        self.router = torch.nn.Linear(d, n, bias=False)
        self.weight = torch.nn.Parameter(torch.randn(n, d, d) * d ** -0.5)  # f_i(x) = W_i x
        self.tau = tau

    def forward(self, x):  # x [T, d]
        sel = F.gumbel_softmax(self.router(x), tau=self.tau, hard=True)  # [T, n]
        every = torch.einsum("td,nod->tno", x, self.weight)  # [T, n, d]: every function on every token
        return x + torch.einsum("tn,tno->to", sel, every)


def one_step(module, x) -> float:
    xi = x.detach().requires_grad_(True)
    start = time.perf_counter()
    out = module(xi)
    out = out[0] if isinstance(out, tuple) else out
    out.float().pow(2).mean().backward()
    elapsed = time.perf_counter() - start
    module.zero_grad(set_to_none=True)
    return elapsed


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 16, 64], help="bank sizes")
    ap.add_argument("--hidden", type=int, default=256, help="d_model")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per step (sequence x batch)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--dispatcher", choices=["alltoall", "allgather"], default="alltoall")
    args = ap.parse_args(argv)
    if args.hidden % 2:
        ap.error(f"--hidden={args.hidden}: use an even width (the model config needs 2 heads)")

    torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_PORT", "29517")
    from megatron_plugins import cpu_runtime, distributed
    from neon.config import NeonConfig
    from neon.flaming import FlamingMoE
    from neon.flops import flops_terms

    distributed.initialize(seed=0)
    device = cpu_runtime.device()
    seq = 512 if args.tokens % 512 == 0 else args.tokens
    x = torch.randn(seq, args.tokens // seq, args.hidden, device=device)
    print(f"# FlamingMoE top-1, d={args.hidden}, {args.tokens} tokens, linear functions, {args.dispatcher}, "
          f"{args.threads} thread(s), {platform.processor() or platform.machine()}, torch {torch.__version__}")
    modules, step_flops = {}, {}
    for n in args.sizes:
        cfg = NeonConfig(num_layers=1, hidden_size=args.hidden, num_attention_heads=2, vocab_size=128,
                         flaming_moe="mlp", flaming_layer_functions=n, flaming_layer_kind="linear",
                         flaming_router="gumbel", flaming_topk=1, flaming_token_dispatcher=args.dispatcher,
                         pipeline_dtype=torch.float32)
        step_flops[n] = 2.0 * 3 * flops_terms(cfg, seq)["flaming"] * args.tokens
        modules[n] = (FlamingMoE(cfg, layer_number=1).to(device).train(),
                      _Flat(DenseFunctionBank(n, args.hidden).to(device).train(), args.hidden))
    # round-robin over sizes and formulations so that load changes on a shared machine hit all alike
    times = {(n, kind): [] for n in args.sizes for kind in (0, 1)}
    for r in range(args.warmup + args.iters):
        for n in args.sizes:
            for kind in (0, 1):
                t = one_step(modules[n][kind], x)
                if r >= args.warmup:
                    times[(n, kind)].append(t)
        print(f"# round {r + 1}/{args.warmup + args.iters}", file=sys.stderr, flush=True)
    print(f"{'bank':>5} {'dispatched ms':>14} {'dense ms':>10} {'dense/dispatched':>17} {'TFLOP/s':>9}")
    rows = []
    for n in args.sizes:
        t_disp, t_dense = (statistics.median(times[(n, kind)]) for kind in (0, 1))
        rows.append((n, t_disp, t_dense))
        print(f"{n:>5} {t_disp * 1e3:>14.1f} {t_dense * 1e3:>10.1f} {t_dense / t_disp:>16.2f}x"
              f" {step_flops[n] / t_disp / 1e12:>9.4f}", flush=True)
    first = rows[0]
    print(f"# growth from {first[0]} to {rows[-1][0]} functions: dispatched x{rows[-1][1] / first[1]:.2f}, "
          f"dense x{rows[-1][2] / first[2]:.2f}")
    distributed.shutdown()


class _Flat(torch.nn.Module):
    """[s, b, d] -> the dense bank on [s * b, d]."""

    def __init__(self, bank: DenseFunctionBank, d: int):
        super().__init__()
        self.bank, self.d = bank, d

    def forward(self, x):
        return self.bank(x.reshape(-1, self.d))


if __name__ == "__main__":
    main()
