"""Feature recipes: the settings a Neon feature brings when it is switched on.

    {feature: recipe}
    feature   the model field that switches it on; it is on when cfg.model.<feature> is not
              None, False or "off"
    recipe    {"section.field": value}, or a callable(Config) -> that dict (for values that
              depend on other settings, e.g. the model's width); the Config it gets holds the
              defaults, the YAML file and the flags

A recipe value applies only where neither the YAML file nor a flag set the field, so the
precedence is: built-in defaults < feature recipe < YAML < command line. A field of FOLLOWS
applies only together with the field it follows: a recipe's min_lr is for its own lr, so where
the YAML file or a flag set lr, the recipe leaves min_lr too. The resolved Config records each
value it applied as origin "recipe:<feature>".

The recipes come from the feature contract (`Feature.recipe`, neon/features/); this is the one
place the run config reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

from neon.features import FEATURES

Recipe = Union[dict[str, Any], Callable[[Any], dict[str, Any]]]
FOLLOWS = {"optimizer.min_lr": "optimizer.lr"}


def feature_recipes() -> dict[str, Recipe]:
    """{feature: callable(Config) -> {"section.field": value}} for every registered feature."""
    return {name: (lambda cfg, f=feature: _flat(f.recipe(cfg.model))) for name, feature in FEATURES.items()}


def _flat(recipe: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {f"{section}.{name}": value for section, values in (recipe or {}).items() for name, value in values.items()}


def applies(cfg, key: str) -> bool:
    """May a recipe set `key` ("section.field") in this Config? Only where neither the YAML file
    nor a flag set it, nor, for a key of FOLLOWS, the key it follows (a recipe may have)."""
    followed = cfg.origin(FOLLOWS.get(key, key))
    return cfg.origin(key) == "default" and (followed == "default" or followed.startswith("recipe:"))


def is_on(model_section, feature: str) -> bool:
    return getattr(model_section, feature) not in (None, False, "off")
