"""FlamingMoE (neon/flaming/) under the feature contract.

HF weight mapping: HF `<block>.global_router` / `<block>.layer_router` are megatron's
`<block>.global_bank.router` / `<block>.layer_bank.router` (<block>: HF `flaming` / megatron
`flaming_moe` between attention and MLP, `mlp` in its place); function g of a bank of n is local
function g - ep_rank * n / EP of expert-parallel rank g // (n / EP) (`layer_bank.experts.local_experts.j`,
the model-level `flaming_global_functions.local_experts.j` on every pipeline stage); a SwiGLU
function's linear_fc1 is [gate; up]. Functions and routers are replicated over TP.
IO functions (`bank=layer`: the per-layer bank's entries F, F + 1, ...): HF
`<block>.io_functions.<name>.<param>` is megatron's `<block>.layer_bank.experts.local_experts.j.<param>`
of the EP rank holding entry g = F + i (every parameter of the function, whatever its kind).
Global IO functions (`bank=global`: the global bank's entries G, G + 1, ...; G may be 0, an
IO-only global bank with its router): HF `model.flaming_global_io_functions.<name>.<param>`
is megatron's `flaming_global_functions.local_experts.j.<param>` of the EP rank holding g = G + i.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal, Optional

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.spec_utils import ModuleSpec

from neon.errors import ConfigError, IOSourceError
from neon.features.base import Feature, choices
from neon.flaming import FlamingMoE, FlamingTransformerLayer, FlamingTransformerLayerSubmodules, attach_global_bank
from neon.flaming.block import bank_size, num_learned  # a bank's entries: learned, then IO
from neon.flaming.io import io_specs


@dataclass
class FlamingMoESettings:
    flaming_moe: Literal["off", "between", "mlp"] = "off"
    """Where the FlamingMoE block sits: 'between' attention and MLP (own pre-norm and residual,
    the prototype's place) or in place of the 'mlp'."""
    flaming_global_functions: int = 0
    """G: functions of the global bank shared by every layer (0: no global bank)."""
    flaming_layer_functions: int = 0
    """F: functions of each layer's own bank (0: no per-layer bank)."""
    flaming_global_kind: Literal["linear", "swiglu", "lowrank"] = "linear"
    """Function kind of the global bank: bias-free Linear(d, d), SwiGLU MLP, or low-rank d -> r -> d."""
    flaming_layer_kind: Literal["linear", "swiglu", "lowrank"] = "linear"
    """Function kind of the per-layer banks: bias-free Linear(d, d), SwiGLU MLP, or low-rank d -> r -> d."""
    flaming_ffn_hidden_size: Optional[int] = None
    """Width of the 'swiglu' functions (None: ffn_hidden_size)."""
    flaming_lowrank_rank: int = 16
    """r of the 'lowrank' functions."""
    flaming_router: Literal["gumbel", "topk"] = "gumbel"
    """'gumbel': straight-through hard Gumbel-softmax (the prototype's; weight 1 for chosen
    functions, noise only in training); 'topk': megatron's top-k softmax router."""
    flaming_topk: int = 1
    """Functions applied per token per bank."""
    flaming_gumbel_temperature: float = 1.0
    """Temperature of the Gumbel-softmax router."""
    flaming_aux_loss_coeff: float = 0.0
    """Switch-style load-balancing loss per bank (megatron's aux_loss)."""
    flaming_z_loss_coeff: float = 0.0
    """Router z-loss per bank (ST-MoE)."""
    flaming_token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    """megatron-core's token dispatcher for the banks."""
    flaming_identity: bool = True
    """The block's output includes its normalized input (the prototype's r = x' + sum ...)."""
    flaming_init_seed: int = 4321
    """Seed of the global bank's initialisation: function g gets the same weights on every
    pipeline stage and at every expert-parallel size."""
    flaming_io_functions: list[str] = field(default_factory=list)
    """One entry per IO function, 'name=...,kind=store|callable|model,source=...[,key=value...]';
    they join the per-layer bank after its learned functions, or with 'bank=global' the global
    bank after its learned ones (see docs/flaming_moe.md)."""
    flaming_io_context_window: int = 8
    """W: token ids (the token itself and the W - 1 before it) in each token's context row."""
    flaming_io_store_swap: bool = False
    """At checkpoint load, accept stores other than the ones the checkpoint recorded."""
    flaming_io_reuse_search: bool = True
    """Search each global-bank `context`-query store once per micro-batch for all its tokens and
    reuse the result in every layer (neon/flaming/search_reuse.py); False: each layer searches
    for the tokens it routes there."""


PLACEMENTS = choices(FlamingMoESettings, "flaming_moe")
KINDS = choices(FlamingMoESettings, "flaming_layer_kind")
ROUTERS = choices(FlamingMoESettings, "flaming_router")
DISPATCHERS = choices(FlamingMoESettings, "flaming_token_dispatcher")

# FlamingMoE function parameters per kind: (HF names, joined along dim 0) -> megatron name
FUNCTION_PARAMS = {
    "linear": [(("proj.weight",), "linear.weight")],
    "swiglu": [(("gate_proj.weight", "up_proj.weight"), "linear_fc1.weight"),
               (("down_proj.weight",), "linear_fc2.weight")],
    "lowrank": [(("in_proj.weight",), "linear_fc1.weight"), (("out_proj.weight",), "linear_fc2.weight")],
}


class FlamingMoEFeature(Feature):
    name = "flaming_moe"
    settings = FlamingMoESettings
    hf_fields = ("flaming_moe", "flaming_global_functions", "flaming_layer_functions", "flaming_global_kind",
                 "flaming_layer_kind", "flaming_ffn_hidden_size", "flaming_lowrank_rank", "flaming_router",
                 "flaming_topk", "flaming_gumbel_temperature", "flaming_identity", "flaming_io_functions",
                 "flaming_io_context_window", "flaming_io_store_swap", "flaming_io_reuse_search")
    hf_reference = ("NeonFlamingMoE", "NeonFunction", "NeonModel.__init__", "NeonModel._build_global_bank",
                    "NeonModel.io_inputs")
    # how the banks are trained or run, not what they compute (the IO context search: where it
    # runs, not what it finds)
    run_fields = ("flaming_aux_loss_coeff", "flaming_z_loss_coeff", "flaming_token_dispatcher",
                  "flaming_gumbel_temperature", "flaming_init_seed", "flaming_io_store_swap",
                  "flaming_io_reuse_search")
    ablation_name = "flaming"
    ablation_settings = {"flaming_moe": "between", "flaming_global_functions": 8, "flaming_layer_functions": 4,
                         "flaming_router": "topk", "flaming_topk": 1, "flaming_aux_loss_coeff": 0.01}

    def validate(self, config, fail) -> None:
        if config.flaming_moe not in PLACEMENTS:
            fail("flaming_moe", config.flaming_moe, "is not a FlamingMoE placement", f"use one of {PLACEMENTS}")
        if config.flaming_moe == "off":
            return
        banks = {"flaming_global_functions": config.flaming_global_functions,
                 "flaming_layer_functions": config.flaming_layer_functions}
        for name, n in banks.items():
            if n < 0:
                fail(name, n, "must be >= 0", f"set {name} to a bank size (0 for no bank)")
        if not any(banks.values()) and not config.flaming_io_functions:
            fail("flaming_layer_functions", 0, "FlamingMoE is on but both banks are empty",
                 "set flaming_global_functions and/or flaming_layer_functions > 0, or flaming_moe='off'")
        ep = config.expert_model_parallel_size
        io = _io_counts(config)  # IO functions join their bank (`bank=` in their entry)
        for name, learned in banks.items():
            n = learned + io[name]
            size = f"{name}={learned} + {io[name]} IO functions" if io[name] else f"{name}={n}"
            if n and config.flaming_topk > n:
                fail("flaming_topk", config.flaming_topk, f"exceeds the bank size {size}",
                     "choose k no larger than the smallest bank")
            if n and n % ep:
                fail(name, learned, f"gives a bank of {size}, not divisible by "
                     f"expert_model_parallel_size={ep}",
                     "use a bank size that is a multiple of the expert-parallel size")
        self._validate_values(config, fail)
        self._validate_io(config, fail)

    @staticmethod
    def _validate_io(config, fail) -> None:
        """IO functions: the window (their entries were parsed, options checked, by _io_counts).
        No source is opened here: `prepare` does, before the model is built."""
        if config.flaming_io_functions and config.flaming_io_context_window < 1:
            fail("flaming_io_context_window", config.flaming_io_context_window, "must be >= 1",
                 "use the number of token ids each context row holds, e.g. 8")

    @staticmethod
    def _validate_values(config, fail) -> None:
        for name in ("flaming_global_kind", "flaming_layer_kind"):
            if getattr(config, name) not in KINDS:
                fail(name, getattr(config, name), "is not a function kind", f"use one of {KINDS}")
        if config.flaming_topk < 1:
            fail("flaming_topk", config.flaming_topk, "must be >= 1", "route each token to k >= 1 functions")
        if config.flaming_router not in ROUTERS:
            fail("flaming_router", config.flaming_router, "is not a FlamingMoE router", f"use one of {ROUTERS}")
        if config.flaming_gumbel_temperature <= 0:
            fail("flaming_gumbel_temperature", config.flaming_gumbel_temperature, "must be > 0",
                 "use a positive temperature such as 1.0")
        if config.flaming_token_dispatcher not in DISPATCHERS:
            fail("flaming_token_dispatcher", config.flaming_token_dispatcher,
                 "is not a megatron-core token dispatcher FlamingMoE supports", f"use one of {DISPATCHERS}")
        if config.flaming_lowrank_rank < 1:
            fail("flaming_lowrank_rank", config.flaming_lowrank_rank, "must be >= 1", "use a rank r >= 1")
        if config.flaming_ffn_hidden_size is not None and config.flaming_ffn_hidden_size < 1:
            fail("flaming_ffn_hidden_size", config.flaming_ffn_hidden_size, "must be >= 1",
                 "use a positive SwiGLU width or None for ffn_hidden_size")
        for name in ("flaming_aux_loss_coeff", "flaming_z_loss_coeff"):
            if getattr(config, name) < 0:
                fail(name, getattr(config, name), "must be >= 0", f"set {name} to 0 (off) or a positive weight")
        if config.add_bias_linear:
            fail("add_bias_linear", True, "FlamingMoE functions are bias-free (megatron-core 0.16.1 "
                 "experts fail with biases)", "set add_bias_linear=False")
        etp = config.expert_tensor_parallel_size or config.tensor_model_parallel_size
        if etp != 1:
            fail("expert_tensor_parallel_size", etp, "FlamingMoE functions are not split by tensor "
                 "parallelism", "set expert_tensor_parallel_size=1 (functions are sharded over EP; with "
                 "tensor parallelism also start the process groups with expert TP 1)")
        if config.tensor_model_parallel_size > 1 and not config.sequence_parallel:
            fail("sequence_parallel", False, "FlamingMoE banks under tensor parallelism route each TP "
                 "rank's part of the sequence (megatron's MoE layer refuses TP without sequence "
                 "parallelism in training)", "set sequence_parallel=True")

    def configure(self, config):
        after = {}
        if config.num_moe_experts is None:
            # megatron-core refuses expert parallelism without MoE MLPs; FlamingMoE's banks build
            # their own MoE configs (neon/flaming/functions.py:bank_config), the model config
            # keeps the EP size.
            after["expert_model_parallel_size"] = config.expert_model_parallel_size
            config.expert_model_parallel_size = 1
        # megatron's finalize_model_grads sums the grads of parameters marked `pipeline_parallel`
        # over the pipeline stages when the config says it has replicated (conditional)
        # embedders: the global FlamingMoE bank is such a replica on every stage.
        after["has_cond_embedder"] = (config.flaming_global_functions > 0
                                      or _io_counts(config)["flaming_global_functions"] > 0)
        return after

    def layer_spec(self, spec, config, use_te):
        sub = spec.submodules
        kept = {f.name: getattr(sub, f.name) for f in fields(sub)}
        if config.flaming_moe == "mlp":  # the block replaces the MLP (uses pre_mlp_layernorm)
            if not config.flaming_io_functions:
                return replace(spec, submodules=replace(sub, mlp=ModuleSpec(module=FlamingMoE)))
            # IO functions: Neon's layer hands the block the token context (no block between)
            return replace(spec, module=FlamingTransformerLayer, submodules=FlamingTransformerLayerSubmodules(
                **{**kept, "mlp": ModuleSpec(module=FlamingMoE)}))
        # 'between': its own pre-norm (the layer's norm class) and residual between attention and MLP
        return replace(spec, module=FlamingTransformerLayer, submodules=FlamingTransformerLayerSubmodules(
            **kept, pre_flaming_layernorm=sub.input_layernorm, flaming_moe=ModuleSpec(module=FlamingMoE),
            flaming_bda=get_bias_dropout_add))

    def norm_slots(self, config):
        return {"pre_flaming_layernorm": "pre_flaming_layernorm"} if config.flaming_moe == "between" else {}

    def residual_slots(self, config):
        return {"flaming_bda": "flaming"} if config.flaming_moe == "between" else {}

    def uses_expert_parallelism(self, config):
        return True  # the banks' functions are sharded like experts

    def model_class(self, config):
        if config.flaming_io_functions:  # the stage builds the IO functions' token context
            from neon.flaming.io_model import IOGPTModel

            return IOGPTModel
        return None

    def prepare(self, config):
        """Open every IO function's source (a missing or foreign one fails here, exit status 2)."""
        if config.flaming_io_functions:
            from neon.flaming.io import check_io_sources

            try:
                check_io_sources(config)
            except IOSourceError as e:
                raise IOSourceError(f"flaming_io_functions: {e}") from None

    def attach(self, model, config, post_process):
        attach_global_bank(model, config)  # the stage's replica of the global bank, if any

    # --- checkpoints and training --------------------------------------------------------------
    def architecture_value(self, name, value):
        """IO entries compare as their parsed fields without `source=`: each IO function's
        checkpoint state records its source's identity (path, size, content hash) and checks it
        at load, where flaming_io_store_swap may allow another."""
        return _without_sources(value) if name == "flaming_io_functions" else value

    def before_step(self, config, num_microbatches):
        # megatron's schedules scale MoE router-loss gradients only for configs with MoE MLPs
        from neon.flaming.losses import set_aux_loss_scale

        set_aux_loss_scale(config, num_microbatches)

    def after_step(self, chunks, config, iteration):
        """Each IO function's own work after a step (a learned store's re-index), once per function
        (a global bank's function is shared by the layers)."""
        return [line for m in _io_functions(chunks) if (line := m.after_step(iteration))]

    def step_report(self, chunks, config, *, step_time_s, num_microbatches):
        """The banks' router losses (reduced over ranks) and what the IO context providers report
        (a frozen model's share of the step and its memory), summed over this rank's providers."""
        from neon.flaming.losses import aux_loss_report

        report = aux_loss_report(num_microbatches)
        providers = {id(p): p for c in chunks for m in c.modules() for p in (getattr(m, "io_providers", None) or ())}
        for provider in providers.values():
            for key, value in provider.report(step_time_s).items():
                report[key] = report.get(key, 0.0) + value
        totals: dict[str, list[float]] = {}  # IO functions' own values (a learned query's recall), over layers
        for m in _io_functions(chunks):
            for key, (total, count) in m.report().items():
                acc = totals.setdefault(key, [0.0, 0.0])
                acc[0], acc[1] = acc[0] + total, acc[1] + count
        report.update({key: total / count for key, (total, count) in totals.items() if count})
        return report

    def hf_config_extra(self, model, config):
        """{'flaming_io_sources': {name: identity}} of the IO functions, as the checkpoint checked
        them; the HF model checks them again when it is loaded."""
        sources = {m.spec.name: m.source_identity() for m in model.modules() if getattr(m, "is_io", False)}
        return {"flaming_io_sources": sources} if sources else {}

    def hf_code(self, config):
        """The modules of the IO kinds the model uses and a registry of just those (kinds.py): the
        exported model runs the same IO code as training."""
        import inspect

        from neon.io.base import kind_of

        kinds = [kind_of(k) for k in dict.fromkeys(spec.kind for spec in io_specs(config))]
        code = {Path(inspect.getsourcefile(type(k))).name: Path(inspect.getsourcefile(type(k))).read_text()
                for k in kinds}
        imports = "".join(f"from neon.io.{Path(inspect.getsourcefile(type(k))).stem} import {type(k).__name__}\n"
                          for k in kinds)
        code["kinds.py"] = ('"""The IO kinds of this exported model, registered (written by Neon\'s export; '
                            'neon/io/kinds.py lists every built-in kind)."""\n\n'
                            f"from neon.io.base import KINDS, register\n{imports}\n"
                            f"for _kind in ({''.join(f'{type(k).__name__}(), ' for k in kinds)}):\n"
                            "    register(_kind)\n\n__all__ = [\"KINDS\"]\n")
        return code

    # --- HF weight mapping ----------------------------------------------------------------------
    def hf_layer_tensors(self, config):
        if config.flaming_moe == "between":
            return [("pre_flaming_layernorm.weight", "pre_flaming_layernorm.weight", None)]
        return []

    def hf_dropped(self, config):
        return ("mlp.",) if config.flaming_moe == "mlp" else ()  # the block takes the dense MLP's place

    def layer_to_megatron(self, hf, config, src, dst, ep_rank, ep_size, out):
        mg_blk, hf_blk = _block(config)
        for bank in _banks(config):
            out[f"{dst}{mg_blk}{bank}_bank.router.weight"] = hf[f"{src}{hf_blk}{bank}_router.weight"].clone()
        total = bank_size(config, "layer")
        if config.flaming_layer_functions:
            _functions_to_megatron(hf, f"{src}{hf_blk}layer_functions.", f"{dst}{mg_blk}layer_bank.experts.",
                                   config.flaming_layer_kind, config.flaming_layer_functions, ep_rank, ep_size, out,
                                   total=total)
        _io_to_megatron(hf, f"{src}{hf_blk}io_functions.", f"{dst}{mg_blk}layer_bank.experts.", config, "layer",
                        ep_rank, ep_size, out)

    def layer_to_hf(self, first, expert_shards, config, src, dst, out):
        mg_blk, hf_blk = _block(config)
        for bank in _banks(config):
            out[f"{dst}{hf_blk}{bank}_router.weight"] = first[f"{src}{mg_blk}{bank}_bank.router.weight"]
        total = bank_size(config, "layer")
        if config.flaming_layer_functions:
            _functions_to_hf(expert_shards, f"{src}{mg_blk}layer_bank.experts.", f"{dst}{hf_blk}layer_functions.",
                             config.flaming_layer_kind, config.flaming_layer_functions, out, total=total)
        _io_to_hf(expert_shards, f"{src}{mg_blk}layer_bank.experts.", f"{dst}{hf_blk}io_functions.", config, "layer",
                  out)

    def model_to_megatron(self, hf, config, ep_rank, ep_size, out):
        if config.flaming_moe == "off":
            return
        total = bank_size(config, "global")  # a replica on every pipeline stage
        if config.flaming_global_functions:
            _functions_to_megatron(hf, "model.flaming_global_functions.", "flaming_global_functions.",
                                   config.flaming_global_kind, config.flaming_global_functions, ep_rank, ep_size, out,
                                   total=total)
        _io_to_megatron(hf, "model.flaming_global_io_functions.", "flaming_global_functions.", config, "global",
                        ep_rank, ep_size, out)

    def model_to_hf(self, expert_shards, config, out):
        if config.flaming_moe == "off":
            return
        total = bank_size(config, "global")
        if config.flaming_global_functions:
            _functions_to_hf(expert_shards, "flaming_global_functions.", "model.flaming_global_functions.",
                             config.flaming_global_kind, config.flaming_global_functions, out, total=total)
        _io_to_hf(expert_shards, "flaming_global_functions.", "model.flaming_global_io_functions.", config, "global",
                  out)

    def flops_terms(self, config, keys, terms):
        """The block's routers and routed functions (neon/flaming/flops.py) as the "flaming" term;
        in the MLP's place ('mlp') the dense MLP's term goes."""
        from neon.flaming.flops import flaming_macs

        mlp = 0 if config.flaming_moe == "mlp" else terms["mlp"]
        return {**terms, "mlp": mlp, "flaming": flaming_macs(config)}

    def forward_only_flops(self, config, seq_length, causal):
        """The frozen models of `model` IO functions: one forward per micro-batch and stage."""
        from neon.flaming.flops import forward_only_macs

        return forward_only_macs(config, seq_length, causal)


def _io_functions(chunks: list) -> list:
    """The IO functions of the model chunks, each once (a global bank's is shared by the layers)."""
    return list({id(m): m for c in chunks for m in c.modules() if getattr(m, "is_io", False)}.values())


def _io_counts(config) -> dict[str, int]:
    """IO functions per bank (keyed by the bank's learned-size setting), from their `bank=` keys;
    a malformed entry is a ConfigError naming it."""
    try:
        specs = io_specs(config)
    except IOSourceError as e:
        raise ConfigError(f"flaming_io_functions: {e}") from None
    return {"flaming_global_functions": sum(s.bank == "global" for s in specs),
            "flaming_layer_functions": sum(s.bank == "layer" for s in specs)}


def _without_sources(entries) -> list:
    """IO entries as their kinds' canonical fields (neon/io/base.py `canonical`: defaults filled in,
    no `source`, no run options); entries that do not parse, as their text without `source=`."""
    from neon.io.base import canonical, parse_spec

    try:
        return [canonical(parse_spec(e)) for e in entries or ()]
    except IOSourceError:
        return [",".join(p for p in str(e).split(",") if not p.strip().startswith("source="))
                for e in entries or ()]


def _block(config) -> tuple[str, str]:
    """(megatron, HF) prefix of the FlamingMoE block within a layer."""
    return ("flaming_moe.", "flaming.") if config.flaming_moe == "between" else ("mlp.", "mlp.")


def _banks(config) -> list[str]:
    """The banks with entries (learned or IO; each has a router): "global" and/or "layer"."""
    return [bank for bank in ("global", "layer") if bank_size(config, bank)]


def _io_to_megatron(hf: dict, hf_prefix: str, mg_prefix: str, config, bank: str, ep_rank: int, ep_size: int,
                    out: dict) -> None:
    """The IO functions of `bank` (its entries g = learned + i, n / EP per rank) held by `ep_rank`:
    every HF tensor under `<hf_prefix><name>.` (whatever its kind's parameters are)."""
    first = num_learned(config, bank)
    local = bank_size(config, bank) // ep_size
    for g, spec in enumerate(io_specs(config, bank), start=first):
        if g // local == ep_rank:
            src = f"{hf_prefix}{spec.name}."
            for name in [k for k in hf.keys() if k.startswith(src)]:
                out[f"{mg_prefix}local_experts.{g % local}.{name[len(src):]}"] = hf[name].clone()


def _io_to_hf(expert_shards: list[dict], mg_prefix: str, hf_prefix: str, config, bank: str, out: dict) -> None:
    first = num_learned(config, bank)
    local = bank_size(config, bank) // len(expert_shards)
    for g, spec in enumerate(io_specs(config, bank), start=first):
        shard, src = expert_shards[g // local], f"{mg_prefix}local_experts.{g % local}."
        for name in [k for k in shard if k.startswith(src) and not k.endswith("_extra_state")]:
            out[f"{hf_prefix}{spec.name}.{name[len(src):]}"] = shard[name]


def _functions_to_megatron(hf: dict, hf_prefix: str, mg_prefix: str, kind: str, n: int,
                           ep_rank: int, ep_size: int, out: dict, total: int | None = None) -> None:
    """Learned functions 0..n-1 of a bank of `total` entries (default n) held n / EP per rank."""
    local = (total or n) // ep_size
    for j in range(local):
        g = ep_rank * local + j
        if g >= n:
            break
        for hf_names, mg_name in FUNCTION_PARAMS[kind]:
            out[f"{mg_prefix}local_experts.{j}.{mg_name}"] = torch.cat(
                [hf[f"{hf_prefix}{g}.{h}"] for h in hf_names]).clone()


def _functions_to_hf(expert_shards: list[dict], mg_prefix: str, hf_prefix: str, kind: str, n: int,
                     out: dict, total: int | None = None) -> None:
    local = (total or n) // len(expert_shards)
    for r, sd in enumerate(expert_shards):
        for j in range(local):
            if r * local + j >= n:
                break
            for hf_names, mg_name in FUNCTION_PARAMS[kind]:
                parts = torch.chunk(sd[f"{mg_prefix}local_experts.{j}.{mg_name}"], len(hf_names))
                for h, t in zip(hf_names, parts):
                    out[f"{hf_prefix}{r * local + j}.{h}"] = t.clone()
