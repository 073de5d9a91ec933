"""NeonConfig: megatron-core's TransformerConfig plus the Mistral settings and the Neon switches.

With every Neon switch off, a NeonConfig describes a Mistral model (RoPE, GQA, SwiGLU, RMSNorm,
optional sliding window). `validate()` runs before megatron-core's own checks, so a bad value
gets an error that names the setting and the fix before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


class NeonConfigError(ValueError):
    """A configuration value Neon cannot build; the message names the setting and the fix."""


DIFF_ATTENTION_MODES = ("off", "matched", "expressive")


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
        if self.sliding_window is not None:
            # megatron/TE window is (left, right) tokens besides the query itself
            self.window_size = (self.sliding_window - 1, 0)
        super().__post_init__()

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
        if self.num_moe_experts is not None and self.add_bias_linear:
            fail("add_bias_linear", True, "is not supported with experts in megatron-core 0.16.1 "
                 "(in-place update of a view in mlp.py)", "set add_bias_linear=False")

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads
