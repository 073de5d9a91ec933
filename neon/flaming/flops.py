"""Multiply-adds per token of a FlamingMoE block, for Neon's FLOP count (neon/flops.py).

Per layer, for each bank of n > 0 functions (F learned + the m IO functions of that bank):

    router                 d * n                          (logits = W_r x', every token)
    routed functions       k * mean_f macs(f)             (top-k; the mean: uniform routing)

    macs(linear)  = d * d
    macs(swiglu)  = 3 * d * F_f                           (F_f = flaming_ffn_hidden_size or ffn)
    macs(lowrank) = 2 * d * r
    macs(IO)      = its kind's `IOKind.macs` (neon/io/: a store's rescoring and W_out, a callable's
                    W_out, a frozen model's projection); a kind that does not count its FLOPs
                    stops the count with an error instead of counting 0

Work that runs forward only, once per micro-batch and pipeline stage (a frozen model, shared by
every layer and bank), is each kind's `forward_only_macs`: neon/features/flaming.py
(`forward_only_flops`) reports it; neon/flops.py multiplies it by 2 FLOPs and the model chunks,
not by the training passes.

A bank that mixes learned and IO functions is counted at uniform routing, the load-balancing
loss's target. A store's search (exact or an index) and the frozen n-gram encoder run without
gradients, mostly on the CPU, off the accelerator whose MFU this is, so they are left out.
"""

from __future__ import annotations

from neon.flaming.block import BANKS, bank_kind, bank_size
from neon.flaming.io import io_settings, io_specs
from neon.io.base import kind_of


def function_macs(config, kind: str) -> float:
    """Multiply-adds per routed token of one learned function of `kind`."""
    d = config.hidden_size
    if kind == "linear":
        return d * d
    if kind == "swiglu":
        return 3 * d * (config.flaming_ffn_hidden_size or config.ffn_hidden_size)
    if kind == "lowrank":
        return 2 * d * config.flaming_lowrank_rank
    raise ValueError(f"unknown FlamingMoE function kind {kind!r}")


def flaming_macs(config) -> float:
    """Multiply-adds per token of one layer's FlamingMoE block (routers + routed functions)."""
    settings, total = io_settings(config), 0.0
    for bank in BANKS:
        n = bank_size(config, bank)
        if not n:
            continue
        specs = io_specs(config, bank)
        costs = [function_macs(config, bank_kind(config, bank))] * (n - len(specs))
        costs += [kind_of(spec.kind).macs(spec, settings) for spec in specs]
        total += config.hidden_size * n + config.flaming_topk * sum(costs) / n
    return total


def forward_only_macs(config, seq_length: int, causal: str = "half") -> float:
    """Multiply-adds per token of the IO kinds' forward-only work (the frozen models)."""
    from neon.flops import attention_keys

    specs, settings = io_specs(config), io_settings(config)
    kinds = dict.fromkeys(spec.kind for spec in specs)
    return sum(kind_of(kind).forward_only_macs(specs, settings, seq_length,
                                               lambda window: attention_keys(seq_length, window, causal))
               for kind in kinds)
