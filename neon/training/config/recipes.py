"""Feature recipes: the settings a Neon feature brings when it is switched on.

    {feature: recipe}
    feature   the model field that switches it on; it is on when cfg.model.<feature> is not
              None, False or "off"
    recipe    {"section.field": value}, or a callable(Config) -> that dict (for values that
              depend on other settings, e.g. the model's width); the Config it gets holds the
              defaults, the YAML file and the flags

A recipe value applies only where neither the YAML file nor a flag set the field, so the
precedence is: built-in defaults < feature recipe < YAML < command line. The resolved Config
records each one it applied as origin "recipe:<feature>".

This is the one place the recipes are collected (today only nGPT's, from neon/ngpt.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

from neon.ngpt import ngpt_optimizer_defaults

Recipe = Union[dict[str, Any], Callable[[Any], dict[str, Any]]]


def feature_recipes() -> dict[str, Recipe]:
    return {"ngpt": ngpt_optimizer_defaults()}  # weight decay 0, no warmup


def is_on(model_section, feature: str) -> bool:
    return getattr(model_section, feature) not in (None, False, "off")
