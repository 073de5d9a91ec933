"""The configuration as YAML: reading a --config file, writing <run_dir>/config.yaml, and
rebuilding a Config from a saved dict (a checkpoint's record of its run).

dump_yaml() writes one `name: value  # origin` line per setting; the origin comment says where
the value came from (default, recipe:<feature>, config file, command line, tokenizer). The file
loads back with yaml.safe_load to cfg.to_dict(), and from_dict() of that is the same Config.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from neon.training.config.sections import SECTIONS, Config, ConfigError

SAVED_CONFIG = "saved config"  # the origin from_dict() records


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {str(path)!r}: no such file. Fix: give the path of a YAML file "
                          f"(see examples/configs/).")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {str(path)!r}: expected sections {list(SECTIONS)} at the top level")
    return data


def dump_yaml(cfg: Config) -> str:
    """The resolved configuration as YAML, with each value's origin as a trailing comment."""
    lines = ["# Resolved configuration; the comment after each value says where it came from."]
    for section, values in cfg.to_dict().items():
        lines.append(f"{section}:")
        lines += [f"  {name}: {_flow(value)}  # {cfg.origin(f'{section}.{name}')}"
                  for name, value in values.items()]
    return "\n".join(lines) + "\n"


def _flow(value) -> str:
    """`value` as one line of YAML (flow style, quoted where YAML needs it)."""
    text = yaml.safe_dump([value], default_flow_style=True, width=float("inf")).strip()
    return text[1:-1]  # without the brackets of the one-item list


def from_dict(values: dict, world_size: int = 1) -> Config:
    """A Config from a resolved dict (as saved in a checkpoint); unknown keys are ignored.
    Each value it sets is recorded with origin "saved config"."""
    cfg = Config(world_size=world_size)
    for section, cls in SECTIONS.items():
        names = set(cls.__dataclass_fields__)
        for name, value in (values.get(section) or {}).items():
            if name in names:
                cfg.set(f"{section}.{name}", value, SAVED_CONFIG)
    return cfg
