"""The `model` section: every NeonConfig field that YAML or a flag can express.

It is generated from NeonConfig (Mistral's settings, every registered feature's settings,
megatron-core's TransformerConfig) and follows it when a feature is registered later, so a
feature's fields are configurable without touching this package. Left out, because another
section owns them or the run derives them:

    parallelism section      tensor/pipeline/expert model-parallel size, sequence_parallel
    derived by the run       virtual pipeline size, context / expert-tensor parallel size,
                             params/pipeline dtype (from bf16/fp16), window_size (from sliding_window)
    not representable        fields whose type is a callable, a torch dtype, a class ...
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import field
from typing import Any, Literal, Union

from neon.config import NeonConfig, extend_dataclass, on_fields_changed

PARALLELISM_OWNED_FIELDS = {"tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                            "expert_model_parallel_size", "sequence_parallel"}
DERIVED_MODEL_FIELDS = {"virtual_pipeline_model_parallel_size",
                        "expert_tensor_parallel_size", "params_dtype", "pipeline_dtype",
                        "window_size"}
# Sizes megatron-core leaves at 0 (they must be set) get a tiny model's; every example config sets them.
REQUIRED_MODEL_DEFAULTS = {"num_layers": 2, "hidden_size": 128, "num_attention_heads": 4}

_SCALARS = (bool, int, float, str)


def representable(tp) -> bool:
    """Can a value of this annotation be written in YAML and on a command line?"""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _SCALARS or tp is type(None):
        return True
    if origin is Literal:
        return all(isinstance(a, _SCALARS) for a in args)
    if origin in (Union, types.UnionType):
        return all(representable(a) for a in args)
    if origin in (list, tuple):
        return all(representable(a) for a in args if a is not Ellipsis)
    return False


def _default(f: dataclasses.Field):
    if f.name in REQUIRED_MODEL_DEFAULTS:
        return REQUIRED_MODEL_DEFAULTS[f.name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _model_fields() -> dict[str, tuple[Any, Any]]:
    """{name: (annotation, default)}: NeonConfig's own fields first (in its order), then megatron-core's."""
    hints = typing.get_type_hints(NeonConfig)
    skipped = PARALLELISM_OWNED_FIELDS | DERIVED_MODEL_FIELDS
    fields = [f for f in dataclasses.fields(NeonConfig)
              if f.init and f.name not in skipped and representable(hints[f.name])
              and _default(f) is not dataclasses.MISSING]
    own = list(NeonConfig.__annotations__)
    fields.sort(key=lambda f: own.index(f.name) if f.name in own else len(own))
    return {f.name: (hints[f.name], _default(f)) for f in fields}


def _spec(default) -> dataclasses.Field:
    return field(default_factory=lambda d=default: copy.copy(d))


MODEL_FIELDS = _model_fields()

ModelSection = dataclasses.make_dataclass(
    "ModelSection", [(name, tp, _spec(default)) for name, (tp, default) in MODEL_FIELDS.items()])
ModelSection.__doc__ = "Every NeonConfig field that a YAML file or a flag can express."


def _follow_neon_config() -> None:
    """Give ModelSection (in place) and MODEL_FIELDS the fields NeonConfig has now."""
    now = _model_fields()
    extend_dataclass(ModelSection, add=[(n, tp, _spec(d)) for n, (tp, d) in now.items() if n not in MODEL_FIELDS],
                     remove=[n for n in MODEL_FIELDS if n not in now])
    MODEL_FIELDS.clear()
    MODEL_FIELDS.update(now)


on_fields_changed(_follow_neon_config)
