"""NeonConfig: megatron-core's TransformerConfig plus the Mistral settings and the Neon switches.

With every Neon switch off, a NeonConfig describes a Mistral model (RoPE, GQA, SwiGLU, RMSNorm,
optional sliding window). `validate()` runs before megatron-core's own checks, so a bad value
gets an error that names the setting and the fix before anything is built.

The fields of each Neon feature are the feature's own: its `settings` dataclass in its file under
neon/features/, added to NeonConfig when the feature is registered (`add_settings`, called by
`neon.features.register`; the built-in features register when this module is imported). Their
checks and derived settings are the feature's too (docs/adding_a_feature.md).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from neon.errors import ConfigError


@dataclass
class NeonConfig(TransformerConfig):
    # --- Mistral -----------------------------------------------------------------------
    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    sliding_window: Optional[int] = None
    """Each token sees itself and the sliding_window - 1 tokens before it (HF semantics)."""
    tie_word_embeddings: bool = False

    # --- Neon features: each one's fields are added here by `add_settings` (its `settings`) --

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
            raise ConfigError(f"{setting}={value!r}: {problem}. Fix: {fix}.")

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
        on = _features().active(self)
        for feature in on:
            for other in (o for o in on if o is not feature):
                missing = {c: why for c, why in other.lacks(self).items() if c in feature.needs}
                for capability, why in missing.items():
                    fail(feature.name, getattr(self, feature.name), f"needs {capability!r} of every other feature; "
                         f"{other.name}={getattr(self, other.name)!r} does not provide it ({why})",
                         f"turn off {feature.name} or {other.name}, or change {other.name}")

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


def _features():
    """The registry (neon/features/); imported on use because the features import this module."""

    return neon.features


# --- feature settings: fields that a registered feature adds to NeonConfig -------------------------

_listeners: list[Callable[[], None]] = []  # called after NeonConfig's fields change (the model section)


def on_fields_changed(listener: Callable[[], None]) -> None:
    """Call `listener()` after every add_settings / remove_settings (the run config's model
    section follows NeonConfig's fields this way)."""
    _listeners.append(listener)


def add_settings(settings: type) -> None:
    """Add the fields of a feature's `settings` dataclass (with their types and defaults) to
    NeonConfig, in place: every NeonConfig built from now on has them."""
    hints = typing.get_type_hints(settings)
    clash = [f.name for f in dataclasses.fields(settings) if f.name in NeonConfig.__dataclass_fields__]
    if clash:
        raise ValueError(f"{settings.__name__}: NeonConfig already has the fields {clash}")
    extend_dataclass(NeonConfig, add=[(f.name, hints[f.name], _copy_field(f)) for f in dataclasses.fields(settings)])
    for listener in _listeners:
        listener()


def remove_settings(settings: type) -> None:
    """Undo add_settings (unregistering a feature, e.g. one a test defined)."""
    extend_dataclass(NeonConfig, remove=[f.name for f in dataclasses.fields(settings)])
    for listener in _listeners:
        listener()


def _copy_field(f: dataclasses.Field) -> dataclasses.Field:
    return dataclasses.field(default=f.default, default_factory=f.default_factory, init=f.init, repr=f.repr,
                             compare=f.compare, metadata=f.metadata)


def extend_dataclass(cls: type, add: list = (), remove: list = ()) -> None:
    """Add fields [(name, type, dataclasses.field(...))] to the dataclass `cls`, or remove its own
    fields by name, in place: the class object stays the same (so every module that imported it
    sees the change) and dataclasses regenerates __init__, __repr__ and __eq__ from the new set."""
    own = cls.__dict__.get("__annotations__", {})
    known = cls.__dataclass_fields__
    for name in list(own):  # dataclass() replaced each own field's Field by its default: put it back
        if name in remove:
            del own[name]
            if name in cls.__dict__:
                delattr(cls, name)
        elif name in known:
            setattr(cls, name, known[name])
    for name, tp, spec in add:
        own[name] = tp
        setattr(cls, name, spec)
    for generated in ("__init__", "__repr__", "__eq__", "__match_args__", "__hash__"):
        if generated in cls.__dict__:
            delattr(cls, generated)
    cls.__annotations__ = own
    dataclasses.dataclass(cls)


import neon.features  # noqa: E402,F401  (registers the built-in features, adding their settings above)
