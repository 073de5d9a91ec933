"""The Neon features and their registry: see neon/features/base.py for the contract and
docs/adding_a_feature.md for adding one.

    FEATURES            name -> Feature, in the order their hooks run
    active(config)      the features `config` turns on, in that order
    recipes(config)     [(name, {section: {field: value}})] of the active features' run-config defaults
    register(feature)   add a feature (and its settings' fields to NeonConfig); unregister(name) undoes it
    layer_slots(config) the layer's norm and residual slots (Mistral's and the active features')
"""

from __future__ import annotations

from typing import Any, Optional

from neon.features.base import MISTRAL_NORM_SLOTS, MISTRAL_RESIDUAL_SLOTS, Feature

FEATURES: dict[str, Feature] = {}


def register(feature: Feature, before: Optional[str] = None) -> Feature:
    """Add `feature` to the registry (last, or before the feature named `before`) and its
    settings' fields to NeonConfig (and so to the run config's model section and its flags)."""
    from neon.config import add_settings

    if feature.name in FEATURES:
        raise ValueError(f"a feature named {feature.name!r} is registered already")
    if feature.name not in feature.fields:
        raise ValueError(f"{type(feature).__name__}: its switch {feature.name!r} is not a field of its settings")
    add_settings(feature.settings)
    order = list(FEATURES.items())
    at = next((i for i, (name, _) in enumerate(order) if name == before), len(order))
    order.insert(at, (feature.name, feature))
    FEATURES.clear()
    FEATURES.update(order)
    return feature


def unregister(name: str) -> None:
    """Remove a registered feature and its fields (a feature a test defined, say)."""
    from neon.config import remove_settings

    feature = FEATURES.pop(name)
    remove_settings(feature.settings)


def active(config) -> list[Feature]:
    """The features `config` (a NeonConfig or the run config's model section) turns on."""
    return [f for f in FEATURES.values() if f.enabled(config)]


def recipes(config) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    """(feature name, {section: {field: value}}) for each active feature with run-config defaults.
    `config`: the run config's model section or a NeonConfig."""
    return [(f.name, r) for f in active(config) if (r := f.recipe(config))]


def layer_slots(config) -> tuple[dict[str, str], dict[str, str]]:
    """({norm slot: HF name}, {residual slot: HF short name}) of the layer `config` builds: the
    Mistral layer's and every active feature's (`norm_slots`, `residual_slots`)."""
    norms, residuals = dict(MISTRAL_NORM_SLOTS), dict(MISTRAL_RESIDUAL_SLOTS)
    for feature in active(config):
        norms.update(feature.norm_slots(config))
        residuals.update(feature.residual_slots(config))
    return norms, residuals


def _register_builtin() -> None:
    from neon.features.diff_attention import DiffAttentionFeature
    from neon.features.flaming import FlamingMoEFeature
    from neon.features.ngpt import NGPTFeature

    # nGPT last: it rewrites the layer the others built and normalises every weight (base.py).
    for feature in (DiffAttentionFeature(), FlamingMoEFeature(), NGPTFeature()):
        register(feature)


_register_builtin()

__all__ = ["FEATURES", "Feature", "active", "layer_slots", "recipes", "register", "unregister"]
