"""The functions of a FlamingMoE bank, laid out as megatron-core experts.

A bank of n functions is megatron's `SequentialMLP` with one module per local function: the
bank is sharded over the expert-parallel group exactly like experts (n / EP functions per
rank, parameters marked for the expert-data-parallel gradient reduction, checkpoint keys with
an expert axis). Each function receives the tokens the dispatcher routed to it, with their
routing weights p, and returns p * f(x).

Kinds:
- 'linear':  f(x) = W x, W in R^{d x d}, no bias (the prototype's function)
- 'swiglu':  f(x) = W2 (SiLU(Wg x) * (Wu x)), width `flaming_ffn_hidden_size` (megatron's MLP)
- 'lowrank': f(x) = B A x, A in R^{r x d}, B in R^{d x r} (megatron's MLP, no activation)
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.transformer_config import TransformerConfig


def _identity(x):
    return x


def function_config(config: TransformerConfig, kind: str) -> dict:
    """megatron config fields that make its expert MLP compute a function of this kind."""
    if kind == "swiglu":
        width = config.flaming_ffn_hidden_size or config.ffn_hidden_size
        return dict(moe_ffn_hidden_size=width, gated_linear_unit=True, activation_func=F.silu)
    if kind == "lowrank":
        return dict(moe_ffn_hidden_size=config.flaming_lowrank_rank, gated_linear_unit=False,
                    activation_func=_identity)
    if kind == "linear":  # the MLP fields are unused; keep megatron's checks quiet
        return dict(moe_ffn_hidden_size=config.hidden_size, gated_linear_unit=False,
                    activation_func=_identity)
    raise ValueError(f"unknown FlamingMoE function kind {kind!r}")


class LinearFunction(MegatronModule):
    """f(x) = W x, bias-free d -> d; `per_token_scale` p gives p * W x (megatron's expert call)."""

    unit_sphere_dims = {"linear.weight": 0}  # W [d, d]: its columns live in d_model space (for nGPT)

    def __init__(self, config: TransformerConfig, tp_group=None):
        super().__init__(config=config)
        self.linear = ColumnParallelLinear(
            config.hidden_size, config.hidden_size, config=config, init_method=config.init_method,
            bias=False, gather_output=False, skip_bias_add=True, is_expert=True, tp_group=tp_group)

    def forward(self, hidden_states, per_token_scale=None, **_):
        out, _ = self.linear(hidden_states)  # [tokens, d]
        if per_token_scale is not None:
            out = (out * per_token_scale.unsqueeze(-1)).to(hidden_states.dtype)
        return out, None


class FunctionBankExperts(SequentialMLP):
    """n / EP local functions of one kind; forward(tokens, tokens_per_function, weights)."""

    def __init__(self, num_local_experts: int, config: TransformerConfig, kind: str = "linear",
                 pg_collection=None):
        pg_collection = pg_collection or get_default_pg_collection()
        mlp_config = copy.deepcopy(config)
        mlp_config.ffn_hidden_size = config.moe_ffn_hidden_size
        MegatronModule.__init__(self, config=mlp_config)
        self.kind = kind
        self.num_local_experts = num_local_experts
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        self.local_experts = torch.nn.ModuleList()
        for _ in range(num_local_experts):
            if kind == "linear":
                expert = LinearFunction(self.config, tp_group=pg_collection.expt_tp)
            else:
                expert = MLP(self.config, MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                        linear_fc2=RowParallelLinear),
                             ffn_hidden_size=self.config.moe_ffn_hidden_size, is_expert=True,
                             tp_group=pg_collection.expt_tp)
            self.local_experts.append(expert)
        if config.tensor_model_parallel_size > 1:
            # megatron marks experts (allreduce False: gradients summed over expert-DP) only at
            # EP > 1. Under TP the functions are whole on every TP rank, and each TP rank routes
            # its part of the sequence (sequence parallelism): their gradients must be summed over
            # the TP ranks too, which expert-DP (DP x TP / EP ranks at expert TP 1) does.
            for p in self.parameters():
                p.allreduce = False

    @property
    def first_function(self) -> int:
        """Bank index of this rank's first function."""
        return self.ep_group.rank() * self.num_local_experts

    def reset_parameters_deterministic(self, seed: int) -> None:
        """Re-initialise function g from seed (seed, g) alone: the same weights on every pipeline
        stage and at every expert-parallel size (megatron's init draws from stage-dependent
        RNG state)."""
        for i, expert in enumerate(self.local_experts):
            gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + self.first_function + i)
            for name, p in expert.named_parameters():
                std = self.config.init_method_std
                if "fc2" in name:  # megatron's scaled output init
                    std = std / (2.0 * self.config.num_layers) ** 0.5
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return self.main_replica_on_first_stage(super().sharded_state_dict(prefix, sharded_offsets, metadata))

    def main_replica_on_first_stage(self, sd: dict) -> dict:
        """The global bank (one replica per pipeline stage): one copy in the checkpoint, the
        first stage's replica is the main one. A per-layer bank's entries are left as they are."""
        if getattr(self, "replicated_over_pipeline", False):
            from megatron.core import parallel_state

            pp_rank = parallel_state.get_pipeline_model_parallel_rank()
            for sh in sd.values():
                if hasattr(sh, "replica_id"):
                    sh.replica_id = (pp_rank, *sh.replica_id[1:])
        return sd


class SharedFunctions(MegatronModule):
    """Stands in for a bank's experts when the functions are the model's global bank.

    Holds no parameters: forward runs the global bank attached by `attach()` (owned by the
    model, once per pipeline stage), so each layer's state dict does not repeat it."""

    def __init__(self, num_local_experts: int, config: TransformerConfig, pg_collection=None, **_):
        super().__init__(config=config)
        self.num_local_experts = num_local_experts
        self._bank: tuple = ()  # a tuple keeps the module out of this module's children

    def attach(self, bank: FunctionBankExperts) -> None:
        assert bank.num_local_experts == self.num_local_experts, "global bank shards differ"
        self._bank = (bank,)

    @property
    def bank(self) -> FunctionBankExperts:
        if not self._bank:
            raise RuntimeError("the global FlamingMoE bank is not attached: build the model with "
                               "neon.model.build_model (or call neon.flaming.attach_global_bank)")
        return self._bank[0]

    def forward(self, tokens, tokens_per_expert, probs, context=None):
        """The global bank's forward; with IO functions in it, their tokens' context [T, C]."""
        if context is None:
            return self.bank(tokens, tokens_per_expert, probs)
        return self.bank(tokens, tokens_per_expert, probs, context=context)

    def backward_dw(self):
        pass


def bank_config(config: TransformerConfig, n: int, kind: str, **overrides) -> TransformerConfig:
    """The megatron MoE config of one bank: n experts, top-k, dispatcher, losses, kind.

    A copy of the model's config (which passed Neon's checks) with the bank's MoE fields, checked
    by megatron-core's own __post_init__: the bank's config describes its functions, while the
    model's features act on the layer around the block."""
    fields = dict(
        num_moe_experts=n,
        moe_router_topk=config.flaming_topk,
        moe_router_pre_softmax=True,  # softmax over the whole bank, then the top-k weights
        moe_router_score_function="softmax",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=config.flaming_aux_loss_coeff,
        moe_z_loss_coeff=config.flaming_z_loss_coeff or None,
        moe_token_dispatcher_type=config.flaming_token_dispatcher,
        moe_router_dtype="fp32",
        moe_grouped_gemm=False,
        moe_shared_expert_intermediate_size=None,
        moe_layer_recompute=False,
        expert_tensor_parallel_size=1,
        **function_config(config, kind),
    )
    fields.update(overrides)
    cfg = copy.copy(config)
    for name, value in fields.items():
        setattr(cfg, name, value)
    TransformerConfig.__post_init__(cfg)
    return cfg
