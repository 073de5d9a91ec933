"""The contract of a Neon feature: every hook a feature can provide, in one class.

A feature (DiffAttention, nGPT, FlamingMoE, ...) is a `Feature` subclass in one file under
`neon/features/`, registered in `neon.features` (`FEATURES`, or `register()` at run time). Neon's
generic code never names a feature: it asks the registry for the features a config turns on
(`active(config)`, in registry order) and calls their hooks. Every hook has a default that does
nothing, so a feature implements only what it changes. The walk-through for a new feature is
docs/adding_a_feature.md.

Hooks, by where they are called:

| hook                                     | called by                                          |
|------------------------------------------|----------------------------------------------------|
| `settings` (its fields), `name`          | neon/config.py `add_settings`, the model section   |
| `validate`, `needs`, `lacks`             | neon/config.py `NeonConfig.validate`               |
| `configure`                              | neon/config.py `NeonConfig.__post_init__`          |
| `layer_spec`, `block_spec`               | neon/layer_spec.py                                 |
| `norm_slots`, `residual_slots`           | `neon.features.layer_slots` (nGPT, the HF mapping) |
| `prepare`, `model_class`, `attach`       | neon/model.py `build_model`                        |
| `hf_fields`                              | state_dict_adapter.neon_hf_config, the HF import   |
| `hf_layer_tensors`, `hf_global_tensors`  | neon/state_dict_adapter.py                         |
| `hf_dropped`, `qkv_split`                | neon/state_dict_adapter.py                         |
| `layer_to_megatron`, `layer_to_hf`       | neon/state_dict_adapter.py                         |
| `model_to_megatron`, `model_to_hf`       | neon/state_dict_adapter.py                         |
| `hf_config_extra`, `hf_code`             | neon/conversion/convert.py (export)                |
| `flops_terms`, `forward_only_flops`      | neon/flops.py `training_flops_per_token`           |
| `recipe`                                 | `neon.features.recipes` (run-config defaults)      |
| `run_fields`, `architecture_value`       | neon/training/model_match.py (what a resume keeps) |
| `uses_expert_parallelism`                | neon/training/config/sections.py (EP > 1)          |
| `wrap_optimizer`                         | neon/training/optim.py `build_optimizer`           |
| `before_step`                            | neon/training/step.py `train_step`                 |
| `after_step`                             | neon/training/step.py `after_step` (the Trainer)   |
| `step_report`                            | neon/training/aux_losses.py (the step's log line)  |
| `off`, `ablation_name`, `ablation_settings` | neon/ablation/variants.py                       |

Registering the built-in features is part of importing neon.config (their settings become
NeonConfig's fields), so a feature file imports at its top only what does not import neon.config;
its own modules that do (they annotate with NeonConfig) are imported inside the hooks.

`hf_reference` is documentation that a test checks (tests/neon/test_features.py: the names
resolve in neon/hf/modeling_neon.py): the HF files are copied next to exported models and import
nothing from neon, so they branch on the hf_fields themselves.

Registry order is the order hooks run in: a later feature sees the layer spec (and the built
model) as the earlier ones left it. nGPT comes last because it rewrites whatever layer the others
built (every norm and residual slot, q/k, the MLP) and normalises every weight that its module
declares on the sphere. The HF weight mapping does not depend on the order: the tensors every
active feature adds are collected first, then those any active feature drops are removed
(`hf_dropped`).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any, Optional

# One-to-one HF <-> megatron tensor of a layer: (HF name within `model.layers.<i>.`, megatron name
# within `decoder.layers.<j>.`, dim split under tensor parallelism or None for replicated).
# An HF name may be a tuple of names: the megatron tensor is their concatenation along dim 0 on
# every TP rank, each part split along `dim` (megatron's linear_fc1 = [gate; up]).
LayerEntry = tuple  # (str | tuple[str, ...], str, Optional[int])
# A model-level tensor: (HF name, megatron name, TP split dim or None, "pre" or "post": which
# pipeline stage holds it, the first (embedding side) or the last (output side)).
GlobalEntry = tuple  # (str, str, Optional[int], str)
# fail(setting, value, problem, fix) raises neon.errors.ConfigError with one paragraph naming all four.
Fail = Callable[[str, Any, str, str], None]

# The Mistral layer's slots (megatron's TransformerLayer submodule -> its HF name in a layer).
MISTRAL_NORM_SLOTS = {"input_layernorm": "input_layernorm", "pre_mlp_layernorm": "post_attention_layernorm"}
MISTRAL_RESIDUAL_SLOTS = {"self_attn_bda": "attn", "mlp_bda": "mlp"}


def choices(settings: type, name: str) -> tuple:
    """The values a `Literal[...]` field of a settings dataclass allows (its type is the one source)."""
    return typing.get_args(typing.get_type_hints(settings)[name])


class Feature:
    """One Neon feature. Subclass it, override the hooks the feature needs, register it."""

    name: str = ""
    """The NeonConfig field that switches the feature on; its default is the value that switches
    it off (False or "off")."""
    settings: type = type(None)
    """A dataclass of every NeonConfig field the feature owns, with its type (Literal[...] for a
    choice: the one source of the choices), default and docstring (`--help` prints it)."""
    hf_fields: tuple[str, ...] = ()
    """The owned fields NeonHFConfig (neon/hf/configuration_neon.py) carries: copied from the
    NeonConfig on export and back on import, under the same names."""
    hf_reference: tuple[str, ...] = ()
    """Where neon/hf/modeling_neon.py computes the feature from its equations (`Class` or
    `Class.method`)."""
    run_fields: tuple[str, ...] = ()
    """Owned fields that say how the model is trained or run, not what it computes: a resume may
    change them (neon/training/model_match.py); every other owned field must match the checkpoint."""
    ablation_name: str = ""
    """Its short name in `tools/ablate.py --variants` (e.g. `diff`); "" keeps it out of the
    built-in variants (the `base` variant still switches it off)."""
    ablation_settings: dict[str, Any] = {}
    """The settings its ablation variant turns it on with where the base config has none."""
    needs: tuple[str, ...] = ()
    """Capabilities the feature needs from every other active feature's modules (nGPT:
    "unit_sphere", every weight and update defined on the sphere); see `lacks`."""

    @property
    def fields(self) -> tuple[str, ...]:
        """Every NeonConfig field the feature owns (its settings' fields)."""
        return tuple(f.name for f in dataclasses.fields(self.settings))

    # --- config -----------------------------------------------------------------------------
    def enabled(self, config) -> bool:
        """Whether `config` (a NeonConfig or the run config's model section) turns it on."""
        return getattr(config, self.name) not in (False, None, "off")

    def off(self) -> dict[str, Any]:
        """The settings that switch it off: its switch at its default."""
        return {self.name: self.settings.__dataclass_fields__[self.name].default}

    def validate(self, config, fail: Fail) -> None:
        """Reject values the feature cannot build; called for every config, on or off. Pure:
        no file is opened (sources are checked when the model is built)."""

    def lacks(self, config) -> dict[str, str]:
        """{capability: why} of the capabilities its modules do not provide under `config`;
        NeonConfig.validate refuses it next to a feature that `needs` one of them."""
        return {}

    def configure(self, config) -> dict[str, Any]:
        """Adjust derived NeonConfig fields before megatron-core's own checks (its
        __post_init__); return {field: value} to set after them."""
        return {}

    def uses_expert_parallelism(self, config) -> bool:
        """Whether the feature has routed layers whose functions expert parallelism shards."""
        return False

    # --- model --------------------------------------------------------------------------------
    def layer_spec(self, spec, config, use_te: bool):
        """The layer's ModuleSpec with the feature's modules in place (spec: as the Mistral layer
        and the earlier features left it)."""
        return spec

    def block_spec(self, block, config):
        """The TransformerBlockSubmodules (layer specs, final norm) with the feature's changes."""
        return block

    def norm_slots(self, config) -> dict[str, str]:
        """Norm submodules the feature adds to the layer: {megatron slot: HF name within a layer}."""
        return {}

    def residual_slots(self, config) -> dict[str, str]:
        """Residual updates (bias-dropout-add slots) the feature adds to the layer: {megatron slot:
        its HF short name} (Mistral's: self_attn_bda 'attn', mlp_bda 'mlp')."""
        return {}

    def prepare(self, config) -> None:
        """Open what the model will read from outside (files, services, other models) before it is
        built, so a bad source fails first with a NeonError naming it; config validation stays pure."""

    def model_class(self, config) -> Optional[type]:
        """The GPTModel subclass the feature needs for a pipeline stage, or None (megatron's
        GPTModel). At most one active feature may ask for one."""
        return None

    def attach(self, model, config, post_process: bool) -> None:
        """Change one built pipeline stage (megatron's GPTModel) in place; `post_process`: this
        stage holds the output layer."""

    # --- Hugging Face weight mapping (neon/state_dict_adapter.py) ------------------------------
    def hf_layer_tensors(self, config) -> list[LayerEntry]:
        """One-to-one tensors the feature adds to every layer."""
        return []

    def hf_global_tensors(self, config) -> list[GlobalEntry]:
        """One-to-one model-level tensors the feature adds."""
        return []

    def hf_dropped(self, config) -> tuple[str, ...]:
        """HF name prefixes (within a layer, or model-level) of tensors the feature removes,
        whichever feature (or the Mistral layer) added them."""
        return ()

    def qkv_split(self, config) -> Optional[tuple[int, list[int]]]:
        """(key/value groups, [q rows, k rows, v rows] of one group) of linear_qkv when the
        feature changes the attention layout; None keeps Mistral's."""
        return None

    def layer_to_megatron(self, hf: dict, config, src: str, dst: str, ep_rank: int, ep_size: int,
                          out: dict) -> None:
        """Tensors of one layer that are not one-to-one: HF `src` prefix -> megatron `dst`."""

    def layer_to_hf(self, first: dict, expert_shards: list[dict], config, src: str, dst: str,
                    out: dict) -> None:
        """Inverse of layer_to_megatron (first: TP rank 0's shard; expert_shards: per EP rank)."""

    def model_to_megatron(self, hf: dict, config, ep_rank: int, ep_size: int, out: dict) -> None:
        """Model-level tensors that are not one-to-one (present on every pipeline stage)."""

    def model_to_hf(self, expert_shards: list[dict], config, out: dict) -> None:
        """Inverse of model_to_megatron."""

    def hf_config_extra(self, model, config) -> dict[str, Any]:
        """Entries the exported HF config carries besides the hf_fields, read from the built
        model (FlamingMoE: the identity of each IO function's source)."""
        return {}

    def hf_code(self, config) -> dict[str, str]:
        """Files the exported modeling code carries besides modeling_neon.py and what it imports:
        {file name: Python source} (FlamingMoE: the modules of the IO kinds the model uses, and their
        registry). neon/conversion/hf_dir.py makes their neon imports relative."""
        return {}

    # --- metrics and training -----------------------------------------------------------------
    def flops_terms(self, config, keys: float, terms: dict[str, float]) -> dict[str, float]:
        """Multiply-adds per token of each term of training_flops_per_token, as the feature
        changes them: matmuls only; every term is per layer except "logits" (Mistral's:
        "attn_proj", "attn_scores", "mlp"; a feature may add its own). `keys`: the keys one
        query attends to on average, under the run's causal convention (neon/flops.py)."""
        return terms

    def forward_only_flops(self, config, seq_length: int, causal: str) -> float:
        """Multiply-adds per token of work that runs forward only, once per micro-batch per model
        chunk (pipeline stage), not per layer and never in the backward pass or a recompute
        (e.g. FlamingMoE's frozen models). `causal`: the run's attention convention."""
        return 0.0

    def recipe(self, config) -> dict[str, dict[str, Any]]:
        """Run-config defaults the feature brings when on: {section: {field: value}}, applied
        below the YAML file and the flags (each one can be overridden)."""
        return {}

    def architecture_value(self, name: str, value):
        """An owned field's value as the resume check compares it (FlamingMoE compares its IO
        entries without their `source=`, which each function's checkpoint state checks itself)."""
        return value

    def wrap_optimizer(self, optimizer, config):
        """megatron's optimizer with the feature's post-step work (nGPT: the weights back on the
        unit sphere after every step)."""
        return optimizer

    def before_step(self, config, num_microbatches: int) -> None:
        """Called on every rank before a training step's forward-backward passes."""

    def after_step(self, chunks: list, config, iteration: int) -> list[str]:
        """Called on every rank after optimizer step `iteration` (an index to rebuild from the
        updated weights); returns lines for the log."""
        return []

    def step_report(self, chunks: list, config, *, step_time_s: float, num_microbatches: int) -> dict[str, float]:
        """Values to log for the step just taken ({name: value}, e.g. router losses). Called on
        every rank after each step, collectively: every rank must make the same collective calls."""
        return {}
