"""The Neon features and their registry: see neon/features/base.py for the contract and
docs/adding_a_feature.md for adding one.

    FEATURES            name -> Feature, in the order their hooks run
    active(config)      the features `config` turns on, in that order
    recipes(config)     [(name, {section: {field: value}})] of the active features' run-config defaults
"""

from __future__ import annotations

from typing import Any

from neon.features.base import Feature
from neon.features.diff_attention import DiffAttentionFeature
from neon.features.flaming import FlamingMoEFeature
from neon.features.ngpt import NGPTFeature

# nGPT last: it rewrites the layer the others built and normalises every weight (base.py).
FEATURES: dict[str, Feature] = {f.name: f for f in (DiffAttentionFeature(), FlamingMoEFeature(), NGPTFeature())}


def active(config) -> list[Feature]:
    """The features `config` (a NeonConfig or the run config's model section) turns on."""
    return [f for f in FEATURES.values() if f.enabled(config)]


def recipes(config) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    """(feature name, {section: {field: value}}) for each active feature with run-config defaults.
    `config`: the run config's model section or a NeonConfig."""
    return [(f.name, r) for f in active(config) if (r := f.recipe(config))]


__all__ = ["FEATURES", "Feature", "active", "recipes"]
