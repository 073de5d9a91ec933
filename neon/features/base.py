"""The contract of a Neon feature: every hook a feature can provide, in one class.

A feature (DiffAttention, nGPT, FlamingMoE, ...) is a `Feature` subclass in `neon/features/`,
listed in `neon.features.FEATURES`. Neon's generic code never names a feature: it asks the
registry for the features a config turns on (`active(config)`, in registry order) and calls
their hooks. Every hook has a default that does nothing, so a feature implements only what it
changes. The walk-through for a new feature is docs/adding_a_feature.md.

Hooks, by where they are called:

| hook                                  | called by                                            |
|---------------------------------------|------------------------------------------------------|
| `name`, `fields`, `validate`          | neon/config.py `NeonConfig.validate`                 |
| `configure`                           | neon/config.py `NeonConfig.__post_init__`            |
| `layer_spec`, `block_spec`            | neon/layer_spec.py                                   |
| `attach`                              | neon/model.py `build_model` (after GPTModel)         |
| `hf_fields`, `hf_reference`           | state_dict_adapter.neon_hf_config, conversion import |
| `hf_layer_tensors`, `hf_global_tensors`, `hf_dropped`, `qkv_split` | neon/state_dict_adapter.py |
| `layer_to_megatron`, `layer_to_hf`, `model_to_megatron`, `model_to_hf` | neon/state_dict_adapter.py |
| `flops_terms`, `forward_only_flops`   | neon/training/flops.py `training_flops_per_token`    |
| `recipe`                              | `neon.features.recipes` (the run config's feature defaults) |

Registry order is the order hooks run in: a later feature sees the layer spec (and the built
model) as the earlier ones left it. nGPT comes last because it rewrites whatever layer the others
built (normalised residuals, q/k, MLP) and normalises every weight, FlamingMoE's included.
The HF weight mapping does not depend on the order: the tensors every active feature adds are
collected first, then those any active feature drops are removed (`hf_dropped`).
"""

from __future__ import annotations

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
# fail(setting, value, problem, fix) raises NeonConfigError with one paragraph naming all four.
Fail = Callable[[str, Any, str, str], None]


class Feature:
    """One Neon feature. Subclass it, override the hooks the feature needs, add it to FEATURES."""

    name: str = ""
    """The NeonConfig field that switches the feature on (False / "off" mean off)."""
    fields: tuple[str, ...] = ()
    """Every NeonConfig field the feature owns (declared in NeonConfig's section for it)."""
    hf_fields: tuple[str, ...] = ()
    """The owned fields NeonHFConfig (neon/hf/configuration_neon.py) carries: copied from the
    NeonConfig on export and back on import, under the same names."""
    hf_reference: tuple[str, ...] = ()
    """Where neon/hf/modeling_neon.py computes the feature from its equations (`Class` or
    `Class.method`). The HF files are copied next to exported models and import nothing from
    neon, so they cannot read this registry: they branch on the hf_fields themselves."""

    # --- config -----------------------------------------------------------------------------
    def enabled(self, config) -> bool:
        """Whether `config` (a NeonConfig or the run config's model section) turns it on."""
        return getattr(config, self.name) not in (False, None, "off")

    def validate(self, config, fail: Fail) -> None:
        """Reject values the feature cannot build; called for every config, on or off."""

    def configure(self, config) -> dict[str, Any]:
        """Adjust derived NeonConfig fields before megatron-core's own checks (its
        __post_init__); return {field: value} to set after them."""
        return {}

    # --- model --------------------------------------------------------------------------------
    def layer_spec(self, spec, config, use_te: bool):
        """The layer's ModuleSpec with the feature's modules in place (spec: as the Mistral layer
        and the earlier features left it)."""
        return spec

    def block_spec(self, block, config):
        """The TransformerBlockSubmodules (layer specs, final norm) with the feature's changes."""
        return block

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

    # --- metrics and training -----------------------------------------------------------------
    def flops_terms(self, config, keys: float, terms: dict[str, float]) -> dict[str, float]:
        """Multiply-adds per token of each term of training_flops_per_token, as the feature
        changes them: matmuls only; every term is per layer except "logits" (Mistral's:
        "attn_proj", "attn_scores", "mlp"; a feature may add its own). `keys`: the keys one
        query attends to on average, under the run's causal convention (neon/training/flops.py)."""
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
