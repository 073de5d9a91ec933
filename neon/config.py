"""NeonConfig: megatron-core's TransformerConfig plus the Mistral settings and the Neon switches.

With every Neon switch off, a NeonConfig describes a Mistral model (RoPE, GQA, SwiGLU, RMSNorm,
optional sliding window). `validate()` runs before megatron-core's own checks, so a bad value
gets an error that names the setting and the fix before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import init_method_normal


class NeonConfigError(ValueError):
    """A configuration value Neon cannot build; the message names the setting and the fix."""


DIFF_ATTENTION_MODES = ("off", "matched", "expressive")
FLAMING_PLACEMENTS = ("off", "between", "mlp")
FLAMING_KINDS = ("linear", "swiglu", "lowrank")
FLAMING_ROUTERS = ("gumbel", "topk")
FLAMING_DISPATCHERS = ("alltoall", "allgather")


@dataclass
class NeonConfig(TransformerConfig):
    # --- Mistral -----------------------------------------------------------------------
    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    sliding_window: Optional[int] = None
    """Each token sees itself and the sliding_window - 1 tokens before it (HF semantics)."""
    tie_word_embeddings: bool = False

    # --- Neon switches (filled in by the DiffAttention, nGPT and FlamingMoE work) -------
    diff_attention: Literal["off", "matched", "expressive"] = "off"
    """DiffAttention layout: 'matched' keeps the Mistral parameter count, 'expressive' doubles Q/K."""
    diff_lambda_init: Optional[float] = None
    """A constant lambda_init; None uses 0.8 - 0.6 * exp(-0.3 * (l - 1)) for 1-based layer l."""
    ngpt: bool = False
    """nGPT: hidden states and weights on the unit hypersphere."""

    # --- FlamingMoE (neon/flaming/): banks of functions routed per token -------------------
    flaming_moe: Literal["off", "between", "mlp"] = "off"
    """Where the FlamingMoE block sits: 'between' attention and MLP (own pre-norm and residual,
    the prototype's place) or in place of the 'mlp'."""
    flaming_global_functions: int = 0
    """G: functions of the global bank shared by every layer (0: no global bank)."""
    flaming_layer_functions: int = 0
    """F: functions of each layer's own bank (0: no per-layer bank)."""
    flaming_global_kind: Literal["linear", "swiglu", "lowrank"] = "linear"
    flaming_layer_kind: Literal["linear", "swiglu", "lowrank"] = "linear"
    """Function kind per bank: bias-free Linear(d, d), SwiGLU MLP, or low-rank d -> r -> d."""
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
    flaming_aux_loss_coeff: float = 0.0
    """Switch-style load-balancing loss per bank (megatron's aux_loss)."""
    flaming_z_loss_coeff: float = 0.0
    """Router z-loss per bank (ST-MoE)."""
    flaming_token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    flaming_identity: bool = True
    """The block's output includes its normalized input (the prototype's r = x' + sum ...)."""
    flaming_init_seed: int = 4321
    """Seed of the global bank's initialisation: function g gets the same weights on every
    pipeline stage and at every expert-parallel size."""

    # --- FlamingMoE IO functions (neon/flaming/io.py): routed functions reading outside the model
    flaming_io_functions: list[str] = field(default_factory=list)
    """One entry per IO function, 'name=...,kind=store|callable,source=...[,key=value...]'; they
    join the per-layer bank after its learned functions (see docs/flaming_moe.md)."""
    flaming_io_context_window: int = 8
    """W: token ids (the token itself and the W - 1 before it) in each token's context row."""
    flaming_io_store_swap: bool = False
    """At checkpoint load, accept stores other than the ones the checkpoint recorded."""

    # --- Mistral defaults for megatron-core's own fields ----------------------------------
    normalization: str = "RMSNorm"
    layernorm_epsilon: float = 1e-5
    gated_linear_unit: bool = True
    activation_func: callable = F.silu
    add_bias_linear: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    bias_activation_fusion: bool = False
    masked_softmax_fusion: bool = False
    bias_dropout_fusion: bool = False
    apply_rope_fusion: bool = False
    persist_layer_norm: bool = False
    gradient_accumulation_fusion: bool = False

    def __post_init__(self):
        self.validate()
        if self.ngpt:
            # nGPT's recipe: every weight drawn with std 1/sqrt(d_model) (then put on the sphere)
            if self.init_method_std == TransformerConfig.init_method_std:
                self.init_method_std = self.hidden_size ** -0.5
            if self.output_layer_init_method is None:
                self.output_layer_init_method = init_method_normal(self.init_method_std)
        if self.sliding_window is not None:
            # megatron/TE window is (left, right) tokens besides the query itself
            self.window_size = (self.sliding_window - 1, 0)
        ep = self.expert_model_parallel_size
        if self.flaming_moe != "off" and self.num_moe_experts is None:
            # megatron-core refuses expert parallelism without MoE MLPs; FlamingMoE's banks build
            # their own MoE configs (neon/flaming/bank.py), the model config keeps the EP size.
            self.expert_model_parallel_size = 1
        super().__post_init__()
        self.expert_model_parallel_size = ep
        # megatron's finalize_model_grads sums the grads of parameters marked `pipeline_parallel`
        # over the pipeline stages when the config says it has replicated (conditional)
        # embedders: the global FlamingMoE bank is such a replica on every stage.
        self.has_cond_embedder = self.flaming_moe != "off" and self.flaming_global_functions > 0

    def validate(self) -> None:
        def fail(setting, value, problem, fix):
            raise NeonConfigError(f"{setting}={value!r}: {problem}. Fix: {fix}.")

        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size"):
            if getattr(self, name) <= 0:
                fail(name, getattr(self, name), "must be a positive integer", f"set {name} > 0")
        heads, groups = self.num_attention_heads, self.num_query_groups or self.num_attention_heads
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        head_dim = self.kv_channels or self.hidden_size // heads
        if self.kv_channels is None and self.hidden_size % heads:
            fail("hidden_size", self.hidden_size, f"is not divisible by num_attention_heads={heads}",
                 "choose heads that divide the hidden size, or set kv_channels (the head size)")
        if heads % groups:
            fail("num_query_groups", groups, f"does not divide num_attention_heads={heads}",
                 "use a number of key/value heads that divides the query heads")
        if heads % tp:
            fail("num_attention_heads", heads,
                 f"is not divisible by tensor_model_parallel_size={tp}",
                 "use a tensor-parallel size that divides the number of heads")
        if groups % tp:
            fail("num_query_groups", groups, f"is not divisible by tensor_model_parallel_size={tp}",
                 "use a tensor-parallel size that divides the number of key/value heads")
        if self.num_layers % pp and self.num_layers_in_first_pipeline_stage is None:
            fail("num_layers", self.num_layers,
                 f"is not divisible by pipeline_model_parallel_size={pp}",
                 "use a layer count that is a multiple of the pipeline size")
        if self.vocab_size % tp:
            fail("vocab_size", self.vocab_size, f"is not divisible by tensor_model_parallel_size={tp}",
                 "pad the vocabulary to a multiple of the tensor-parallel size")
        ffn = self.ffn_hidden_size or 4 * self.hidden_size
        if ffn % tp:
            fail("ffn_hidden_size", ffn, f"is not divisible by tensor_model_parallel_size={tp}",
                 "use an MLP width that is a multiple of the tensor-parallel size")
        if self.sliding_window is not None and self.sliding_window < 1:
            fail("sliding_window", self.sliding_window, "must be at least 1 (or None for full "
                 "attention)", "set sliding_window to a positive window length or None")
        if self.diff_attention not in DIFF_ATTENTION_MODES:
            fail("diff_attention", self.diff_attention, "is not a DiffAttention layout",
                 f"use one of {DIFF_ATTENTION_MODES}")
        if self.diff_attention == "matched" and heads % 2:
            fail("num_attention_heads", heads, "must be even for diff_attention='matched' "
                 "(two query heads form one differential head)", "use an even number of heads")
        if self.diff_attention == "matched" and groups % 2:
            fail("num_query_groups", groups, "must be even for diff_attention='matched' (two "
                 "key/value heads form one differential key/value head: K1, K2 and V of width 2d)",
                 "use an even number of key/value heads, or diff_attention='expressive'")
        if self.diff_attention == "matched" and (groups // 2) % tp:
            fail("num_query_groups", groups, f"gives {groups // 2} differential key/value heads, not "
                 f"divisible by tensor_model_parallel_size={tp}",
                 "use 2 * tp * k key/value heads, or diff_attention='expressive'")
        if self.diff_lambda_init is not None and not 0.0 <= self.diff_lambda_init < 1.0:
            fail("diff_lambda_init", self.diff_lambda_init, "must lie in [0, 1) (heads are scaled "
                 "by 1 - lambda_init)", "use e.g. 0.8 or 0.5, or None for the per-layer schedule")
        if self.diff_attention != "off" and self.context_parallel_size > 1:
            fail("context_parallel_size", self.context_parallel_size, "is not supported with "
                 "DiffAttention", "set context_parallel_size=1")
        if self.diff_attention != "off" and head_dim % 2:
            fail("kv_channels", head_dim, "must be even for rotary embeddings with DiffAttention",
                 "use an even head size")
        if self.sequence_parallel and tp == 1:
            fail("sequence_parallel", True, "needs tensor_model_parallel_size > 1",
                 "turn sequence parallelism off or raise the tensor-parallel size")
        self._validate_flaming(fail)
        if self.num_moe_experts is not None and self.add_bias_linear:
            fail("add_bias_linear", True, "is not supported with experts in megatron-core 0.16.1 "
                 "(in-place update of a view in mlp.py)", "set add_bias_linear=False")

        if self.ngpt:
            self._validate_ngpt(fail)

    def _validate_ngpt(self, fail) -> None:
        if self.tie_word_embeddings:
            fail("tie_word_embeddings", True, "nGPT keeps separate input and output embeddings "
                 "(E_in, E_out), each normalised on its own", "set tie_word_embeddings=False")
        if self.add_bias_linear:
            fail("add_bias_linear", True, "nGPT layers have no biases", "set add_bias_linear=False")
        if not self.gated_linear_unit or self.activation_func is not F.silu:
            fail("gated_linear_unit", self.gated_linear_unit, "nGPT's MLP is SwiGLU (scaled u and v)",
                 "set gated_linear_unit=True and activation_func=F.silu")
        if self.qk_layernorm:
            fail("qk_layernorm", True, "nGPT normalises q and k itself (after RoPE)",
                 "set qk_layernorm=False")
        if self.num_moe_experts is not None:
            fail("num_moe_experts", self.num_moe_experts, "nGPT is implemented for the dense MLP "
                 "only", "turn experts off (num_moe_experts=None) or nGPT off")
        if self.multi_latent_attention:
            fail("multi_latent_attention", True, "nGPT needs Neon's self-attention",
                 "set multi_latent_attention=False")

    def _validate_flaming(self, fail) -> None:
        if self.flaming_moe not in FLAMING_PLACEMENTS:
            fail("flaming_moe", self.flaming_moe, "is not a FlamingMoE placement",
                 f"use one of {FLAMING_PLACEMENTS}")
        if self.flaming_moe == "off":
            return
        banks = {"flaming_global_functions": self.flaming_global_functions,
                 "flaming_layer_functions": self.flaming_layer_functions}
        for name, n in banks.items():
            if n < 0:
                fail(name, n, "must be >= 0", f"set {name} to a bank size (0 for no bank)")
        if not any(banks.values()) and not self.flaming_io_functions:
            fail("flaming_layer_functions", 0, "FlamingMoE is on but both banks are empty",
                 "set flaming_global_functions and/or flaming_layer_functions > 0, or flaming_moe='off'")
        ep = self.expert_model_parallel_size
        banks["flaming_layer_functions"] += len(self.flaming_io_functions)  # IO functions join it
        for name, n in banks.items():
            if n and self.flaming_topk > n:
                fail("flaming_topk", self.flaming_topk, f"exceeds {name}={n}",
                     "choose k no larger than the smallest bank")
            if n and n % ep:
                fail(name, n, f"is not divisible by expert_model_parallel_size={ep}",
                     "use a bank size that is a multiple of the expert-parallel size")
        for name in ("flaming_global_kind", "flaming_layer_kind"):
            if getattr(self, name) not in FLAMING_KINDS:
                fail(name, getattr(self, name), "is not a function kind", f"use one of {FLAMING_KINDS}")
        if self.flaming_topk < 1:
            fail("flaming_topk", self.flaming_topk, "must be >= 1", "route each token to k >= 1 functions")
        if self.flaming_router not in FLAMING_ROUTERS:
            fail("flaming_router", self.flaming_router, "is not a FlamingMoE router",
                 f"use one of {FLAMING_ROUTERS}")
        if self.flaming_gumbel_temperature <= 0:
            fail("flaming_gumbel_temperature", self.flaming_gumbel_temperature, "must be > 0",
                 "use a positive temperature such as 1.0")
        if self.flaming_token_dispatcher not in FLAMING_DISPATCHERS:
            fail("flaming_token_dispatcher", self.flaming_token_dispatcher,
                 "is not a megatron-core token dispatcher FlamingMoE supports",
                 f"use one of {FLAMING_DISPATCHERS}")
        if self.flaming_lowrank_rank < 1:
            fail("flaming_lowrank_rank", self.flaming_lowrank_rank, "must be >= 1", "use a rank r >= 1")
        if self.flaming_ffn_hidden_size is not None and self.flaming_ffn_hidden_size < 1:
            fail("flaming_ffn_hidden_size", self.flaming_ffn_hidden_size, "must be >= 1",
                 "use a positive SwiGLU width or None for ffn_hidden_size")
        for name in ("flaming_aux_loss_coeff", "flaming_z_loss_coeff"):
            if getattr(self, name) < 0:
                fail(name, getattr(self, name), "must be >= 0", f"set {name} to 0 (off) or a positive weight")
        self._validate_flaming_io(fail)
        if self.add_bias_linear:
            fail("add_bias_linear", True, "FlamingMoE functions are bias-free (megatron-core 0.16.1 "
                 "experts fail with biases)", "set add_bias_linear=False")
        etp = self.expert_tensor_parallel_size or self.tensor_model_parallel_size
        if etp != 1:
            fail("expert_tensor_parallel_size", etp, "FlamingMoE functions are not split by tensor "
                 "parallelism", "set expert_tensor_parallel_size=1 (functions are sharded over EP; with "
                 "tensor parallelism also start the process groups with expert TP 1)")

    def _validate_flaming_io(self, fail) -> None:
        """IO functions: placement, window, and every source opened now (store files, callable
        import), so a wrong or missing source fails at start naming it."""
        if not self.flaming_io_functions:
            return
        if self.flaming_moe != "between":
            fail("flaming_moe", self.flaming_moe, "IO functions are wired for the 'between' "
                 "placement only", "set flaming_moe='between'")
        if self.ngpt:
            fail("ngpt", True, "IO functions are not wired with nGPT yet", "turn nGPT off")
        if self.flaming_io_context_window < 1:
            fail("flaming_io_context_window", self.flaming_io_context_window, "must be >= 1",
                 "use the number of token ids each context row holds, e.g. 8")
        from neon.flaming.io import IOSourceError, check_io_sources

        try:
            check_io_sources(self)
        except IOSourceError as e:
            raise NeonConfigError(f"flaming_io_functions: {e}") from None

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads
