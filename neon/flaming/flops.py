"""Multiply-adds per token of a FlamingMoE block, for Neon's FLOP count (neon/flops.py).

Per layer, for each bank of n > 0 functions (F learned + the m IO functions of that bank):

    router                 d * n                          (logits = W_r x', every token)
    routed functions       k * mean_f macs(f)             (top-k; the mean: uniform routing)

    macs(linear)  = d * d
    macs(swiglu)  = 3 * d * F_f                           (F_f = flaming_ffn_hidden_size or ffn)
    macs(lowrank) = 2 * d * r
    macs(store)   = [d * K] + k_s * K + k_s * V + V * d   ([W_q x if query='hidden'], the k_s
                    rescored keys, the weighted sum of their values, W_out)
    macs(callable)= V * d                                 (W_out; the call itself is not a matmul)

V: the IO function's value width (value_width * embed_dim for token values).

A `model` function's frozen model runs forward only, once per micro-batch and pipeline stage (it
is shared by every layer and bank): `frozen_forward_macs`, per token, is its linear layers'
weights (every matmul but attention's; the LM head included, since the causal-LM forward computes
logits at every position) + per layer 2 keys H_A d_A (Q K^T and A V over its own causal keys).
neon/features/flaming.py (`forward_only_flops`) reports it; neon/flops.py multiplies it by 2
FLOPs and the model chunks, not by the training passes. With re-tokenization it is counted at
Neon's tokens (the frozen sequence may be longer or shorter); a frozen MoE counts every expert.

A bank that mixes
learned and IO functions is counted at uniform routing, the load-balancing loss's target. The
store's exact search (N * K per query) and the frozen n-gram encoder run on the CPU without
gradients (neon/flaming/store.py), off the accelerator whose MFU this is, so they are left out.
"""

from __future__ import annotations

import functools
import os

from neon.flaming.block import BANKS, bank_kind, bank_size
from neon.flaming.io import IOFunctionSpec, io_specs


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


def io_function_macs(config, spec: IOFunctionSpec) -> float:
    """Multiply-adds per routed token of one IO function's learned, on-device part."""
    d = config.hidden_size
    embed = spec.embed_dim or d
    if spec.kind == "callable":
        return (spec.width * embed if spec.returns == "tokens" else spec.width) * d
    if spec.kind == "store":
        from neon.flaming.store import open_store

        meta = open_store(spec.source, where=spec.where()).meta  # meta.json only; sizes checked
        key_dim = meta["key_dim"]
        value = meta["value_width"] * (embed if meta["values"] == "tokens" else 1)
        query = d * key_dim if spec.query == "hidden" else 0
        return query + spec.topk * key_dim + spec.topk * value + value * d
    if spec.kind == "model":  # the learned projection of the frozen model's state; the frozen
        from neon.flaming.frozen_model import frozen_config  # forward runs once per micro-batch

        return frozen_config(spec).hidden_size * d
    return 0.0  # an IO kind this count does not know yet counts no matmuls


def flaming_macs(config) -> float:
    """Multiply-adds per token of one layer's FlamingMoE block (routers + routed functions)."""
    total = 0.0
    for bank in BANKS:
        n = bank_size(config, bank)
        if not n:
            continue
        specs = io_specs(config, bank)
        costs = [function_macs(config, bank_kind(config, bank))] * (n - len(specs))
        costs += [io_function_macs(config, spec) for spec in specs]
        total += config.hidden_size * n + config.flaming_topk * sum(costs) / n
    return total


def frozen_forward_macs(config, seq_length: int, causal: str = "half") -> float:
    """Multiply-adds per token of the frozen models' forward passes (one per distinct source)."""
    from neon.flaming.frozen_model import frozen_config
    from neon.flops import attention_keys

    total = 0.0
    for source, spec in {s.source: s for s in io_specs(config) if s.kind == "model"}.items():
        cfg = frozen_config(spec)
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        keys = attention_keys(seq_length, getattr(cfg, "sliding_window", None), causal)
        total += frozen_linear_macs(source) + cfg.num_hidden_layers * 2 * keys * heads * head_dim
    return total


def frozen_linear_macs(source: str) -> int:
    """in x out summed over the frozen model's linear layers (GPT-2's Conv1D included), built
    on the meta device from its config: no weight is read or allocated."""
    path = os.path.join(source, "config.json")
    return _linear_macs(os.path.abspath(source), os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _linear_macs(source: str, _mtime: int) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(source, local_files_only=True, trust_remote_code=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=True)
    total = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            total += m.in_features * m.out_features
        elif type(m).__name__ == "Conv1D":  # transformers' GPT-2 projection: weight [in, out]
            total += m.weight.numel()
    return total
