"""Variants: the base config with every Neon feature switched off, plus a small overlay each.

A variant is named on the command line:
- `base`: the config as given, with every registered Neon feature off (the Mistral base; each
  feature's `off()`: its switch at its default);
- a feature by its `ablation_name` (`diff`, `ngpt`, `flaming` today), or several joined by `+`
  (`diff+ngpt`), or `all`: the base with those features on. A feature uses the base config's own
  settings for it where the config has them (e.g. `diff_attention: expressive`, its FlamingMoE
  bank sizes), else its `ablation_settings` (those of examples/configs/cpu_demo.yaml);
- the path of a YAML overlay file (`examples/ablations/*.yaml`): sections `model` and
  `optimizer` like a config file, applied over the base; its name is the file's stem.

An overlay's strings may name environment variables as `${NAME}` (e.g. the directory of a
frozen model, examples/ablations/flaming_model.yaml): the variant's config, written to the work
directory, holds their values; an unset variable is an error naming it, except those the tool
provides itself (`${NEON_TRAIN_DATASTORE}`, the training split's datastore: neon/ablation/datastore.py).

Data, schedule, parallel layout and logging are the base config's for every variant (the same
data, token budget and data order), and the learning rate belongs to the grid; an overlay that
sets them is an error.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from neon.errors import AblationError
from neon.features import FEATURES, Feature


def ablation_features() -> dict[str, Feature]:
    """{ablation name: feature} of the registered features that have built-in variants."""
    return {f.ablation_name: f for f in FEATURES.values() if f.ablation_name}


def features_off() -> dict:
    """The settings that switch every registered feature off (the `base` variant's)."""
    return {k: v for f in FEATURES.values() for k, v in f.off().items()}


def groups() -> dict[str, tuple[str, ...]]:
    return {"all": tuple(ablation_features())}


OVERLAY_SECTIONS = ("model", "optimizer")
GRID_OWNED = ("lr", "min_lr")  # optimizer settings the learning-rate grid sets per run
DEFAULT_VARIANTS = ("base", "diff", "ngpt", "diff+ngpt", "flaming", "all")  # the README's ablation
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")  # ${NAME} in an overlay's strings


@dataclass
class Variant:
    name: str
    source: str  # "built-in" or the overlay file's path
    overlay: dict = field(default_factory=dict)  # {section: {setting: value}}
    variables: frozenset = frozenset()  # the ${NAME}s its overlay names


def _feature_overlay(feature: Feature, base_model: dict) -> dict:
    """The feature's settings: the base config's own where it has them, else its ablation_settings."""
    settings = {}
    for key, default in feature.ablation_settings.items():
        value = base_model.get(key, default)
        if key == feature.name and value in ("off", False, None):
            value = default
        settings[key] = value
    return settings


def _overlay_file(path: Path, env: dict, names: set) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise AblationError(f"overlay {str(path)!r} cannot be read as YAML: {e}. Fix: give a YAML file with "
                            f"sections {' / '.join(OVERLAY_SECTIONS)} (see examples/ablations/).") from None
    if not isinstance(data, dict) or not data:
        raise AblationError(f"overlay {str(path)!r}: expected a mapping of sections {' / '.join(OVERLAY_SECTIONS)}, "
                            f"e.g. `model: {{ngpt: true}}`. Fix: see examples/ablations/.")
    for section, values in data.items():
        if section not in OVERLAY_SECTIONS:
            raise AblationError(
                f"overlay {str(path)!r}: section {section!r} cannot differ between variants (every variant gets "
                f"the base config's data, schedule, layout and logging, so the same data, token budget and "
                f"order). Fix: keep only {' / '.join(OVERLAY_SECTIONS)} in the overlay; set {section} in --config.")
        if not isinstance(values, dict):
            raise AblationError(f"overlay {str(path)!r}: section {section!r} must be a mapping of settings, "
                                f"got {values!r}. Fix: e.g. `{section}: {{name: value}}`.")
    owned = [k for k in data.get("optimizer", {}) if k in GRID_OWNED]
    if owned:
        raise AblationError(f"overlay {str(path)!r}: optimizer.{owned[0]} is set by the learning-rate grid. "
                            f"Fix: remove it from the overlay; give the grid with --lrs.")
    return {section: _expand_env(values, path, env, names) for section, values in data.items()}


def _expand_env(value, path: Path, env: dict, names: set):
    """Every `${NAME}` in the overlay's strings replaced by env[NAME]; the names go to `names`."""
    if isinstance(value, dict):
        return {k: _expand_env(v, path, env, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, path, env, names) for v in value]
    if not isinstance(value, str):
        return value

    def lookup(match: re.Match) -> str:
        name = match[1]
        names.add(name)
        if name not in env:
            raise AblationError(f"overlay {str(path)!r}: {value!r} refers to the environment variable {name}, "
                                f"which is not set. Fix: export {name}=<its value> (see the overlay's comments) "
                                f"and run the command again.")
        return env[name]

    return ENV_REFERENCE.sub(lookup, value)


def parse_variant(spec: str, base_model: dict, provided: dict | None = None) -> Variant:
    """A variant from its command-line name (see the module docstring); `provided`: values of
    ${NAME}s that the environment does not set."""
    path = Path(spec)
    if spec.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise AblationError(f"variant {spec!r}: overlay file not found. Fix: give the path of a YAML overlay "
                                f"(see examples/ablations/) or a built-in variant name.")
        name = path.stem
        if name in DEFAULT_VARIANTS or name in ablation_features() or name in groups():
            raise AblationError(f"overlay {spec!r}: its name {name!r} is a built-in variant's. Fix: rename the file.")
        names: set = set()
        overlay = _overlay_file(path, {**(provided or {}), **os.environ}, names)
        return Variant(name, str(path), overlay, frozenset(names))
    if spec == "base":
        return Variant("base", "built-in")
    by_name, named_groups = ablation_features(), groups()
    features: list[str] = []
    for part in spec.split("+"):
        if part not in by_name and part not in named_groups:
            known = ", ".join(["base", *by_name, *named_groups])
            raise AblationError(f"unknown variant {spec!r} ({part!r} is not a feature). Fix: use one of {known}, "
                                f"features joined by '+' (e.g. diff+ngpt), or the path of a YAML overlay file.")
        features += named_groups.get(part, (part,))
    model = {}
    for name in dict.fromkeys(features):
        model.update(_feature_overlay(by_name[name], base_model))
    return Variant(spec, "built-in", {"model": model})


def parse_variants(specs: list[str], base_yaml: dict, provided: dict | None = None) -> list[Variant]:
    base_model = base_yaml.get("model") or {}
    variants = [parse_variant(s, base_model, provided) for s in specs]
    names = [v.name for v in variants]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise AblationError(f"variant {duplicate!r} is given twice. Fix: name each variant once.")
    if "base" not in names:
        variants.insert(0, Variant("base", "built-in"))  # the reference of the table
    return variants


def variant_config(base_yaml: dict, variant: Variant) -> dict:
    """The base config with every feature off, then the variant's overlay."""
    config = copy.deepcopy(base_yaml)
    model = config.setdefault("model", {}) or {}
    config["model"] = model
    model.update(features_off())
    for section, values in variant.overlay.items():
        config.setdefault(section, {})
        config[section] = {**(config[section] or {}), **values}
    return config
