"""NeonConfig: megatron-core's TransformerConfig plus the Mistral settings and the Neon switches.

With every Neon switch off, a NeonConfig describes a Mistral model (RoPE, GQA, SwiGLU, RMSNorm,
optional sliding window). `validate()` runs before megatron-core's own checks, so a bad value
gets an error that names the setting and the fix before anything is built. The fields of each
feature are declared here; their checks and derived settings are the feature's own
(neon/features/, docs/adding_a_feature.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


class NeonConfigError(ValueError):
    """A configuration value Neon cannot build; the message names the setting and the fix."""


@dataclass
class NeonConfig(TransformerConfig):
    # --- Mistral -----------------------------------------------------------------------
    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    sliding_window: Optional[int] = None
    """Each token sees itself and the sliding_window - 1 tokens before it (HF semantics)."""
    tie_word_embeddings: bool = False

    # --- Neon features: the fields each one owns (validated by neon/features/<feature>.py) --
    # --- DiffAttention (neon/diff_attention.py) ----------------------------------------------
    diff_attention: Literal["off", "matched", "expressive", "v2"] = "off"
    """DiffAttention layout, one of 'off', 'matched', 'expressive', 'v2': 'matched' keeps the
    Mistral parameter count, 'expressive' doubles Q/K, 'v2' (DiffAttention V2) doubles the query
    heads over the same key/value heads (docs/diff_attention.md)."""
    diff_lambda_init: Optional[float] = None
    """A constant lambda_init; None uses 0.8 - 0.6 * exp(-0.3 * (l - 1)) for 1-based layer l."""
    # --- nGPT (neon/ngpt.py) -----------------------------------------------------------------
    ngpt: bool = False
    """nGPT: hidden states and weights on the unit hypersphere."""
    ngpt_alpha_sz_scale: Literal["inv_sqrt_d", "inv_d"] = "inv_sqrt_d"
    """The stored scale of alpha_A, alpha_M (and FlamingMoE's alpha_F) and s_z, which sets how far
    Adam moves them per step: 'inv_sqrt_d' (1/sqrt(d_model), the paper's, and every checkpoint's
    before this setting existed) or 'inv_d' (1/d_model: sqrt(d_model) times the step, nGPT's recipe
    for new runs, docs/ngpt.md). s_qk stays at 1/sqrt(d_model), s_u and s_v at 1."""

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

    # Not a field: megatron's finalize_model_grads sums the grads of parameters marked
    # `pipeline_parallel` over the pipeline stages when this is set (replicated embedders on
    # every stage); a feature that has them sets it in its `configure` (FlamingMoE's global bank).
    has_cond_embedder = False

    def __post_init__(self):
        self.validate()
        if self.sliding_window is not None:
            # megatron/TE window is (left, right) tokens besides the query itself
            self.window_size = (self.sliding_window - 1, 0)
        after = {}
        for feature in _features().active(self):
            after.update(feature.configure(self))
        super().__post_init__()
        for name, value in after.items():  # what the features set past megatron-core's checks
            setattr(self, name, value)

    def validate(self) -> None:
        """Neon's checks, then every feature's (neon/features/), before megatron-core's own."""
        def fail(setting, value, problem, fix):
            raise NeonConfigError(f"{setting}={value!r}: {problem}. Fix: {fix}.")

        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size"):
            if getattr(self, name) <= 0:
                fail(name, getattr(self, name), "must be a positive integer", f"set {name} > 0")
        heads, groups = self.num_attention_heads, self.num_query_groups or self.num_attention_heads
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
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
        if self.sequence_parallel and tp == 1:
            fail("sequence_parallel", True, "needs tensor_model_parallel_size > 1",
                 "turn sequence parallelism off or raise the tensor-parallel size")
        if self.num_moe_experts is not None and self.add_bias_linear:
            fail("add_bias_linear", True, "is not supported with experts in megatron-core 0.16.1 "
                 "(in-place update of a view in mlp.py)", "set add_bias_linear=False")
        for feature in _features().FEATURES.values():
            feature.validate(self, fail)

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


def _features():
    """The registry (neon/features/); imported on use because the features import this module."""
    import neon.features

    return neon.features
