"""From a command line to a validated Config: Megatron-LM style flags, the YAML file, recipes.

    resolve(argv)   defaults < feature recipes < YAML file (--config) < flags; then validate,
                    derive vocab_size from the tokenizer, check the data files. Nothing is built.

Flags are "--" + the field name with dashes (Megatron-LM's names), plus ALIASES. Booleans:
`--flag` / `--no-flag`, except fields already named `no_*` (`--no-load-optim`), which get one
flag that sets them True. `--help` lists every setting with its section, documentation and
default. Each value is recorded with its origin in Config.provenance.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import os
import typing
from typing import Any, Literal, NamedTuple, Optional

import yaml

from neon.config import NeonConfig
from neon.features import FEATURES
from neon.training.config import data_checks
from neon.training.config.inherited import refusal
from neon.training.config.model_section import MODEL_FIELDS, ModelSection
from neon.training.config.recipes import applies, feature_recipes, is_on
from neon.training.config.sections import SECTIONS, Config, ConfigError, validate
from neon.training.config.serialization import load_yaml
from neon.training.config.values import coerce, is_bool, type_name

# Megatron-LM flag names that differ from "--" + field name with dashes (model section).
ALIASES = {
    "rope_theta": ["--rotary-base"],
    "num_moe_experts": ["--num-experts"],
    "layernorm_epsilon": ["--norm-epsilon"],
    "fp8": ["--fp8-format"],
    "sliding_window": ["--window-size"],
}

CONFIG_FILE, COMMAND_LINE = "config file", "command line"  # origins recorded in Config.provenance


class CommandLine(NamedTuple):
    config: Config
    print_config: bool
    """--print-config: print the resolved YAML and exit before anything is built."""


def resolve(argv: Optional[list[str]] = None, world_size: Optional[int] = None,
            check_files: bool = True) -> Config:
    """The validated Config of a command line (sys.argv[1:] when argv is None)."""
    return resolve_command_line(argv, world_size, check_files).config


def resolve_command_line(argv: Optional[list[str]] = None, world_size: Optional[int] = None,
                         check_files: bool = True) -> CommandLine:
    flags = vars(build_parser().parse_args(argv))
    print_config = flags.pop("print_config", False)
    settings = _yaml_settings(load_yaml(flags.pop("config"))) if "config" in flags else []
    settings += [(*dest.split(".", 1), _flag_value(dest, raw), COMMAND_LINE) for dest, raw in flags.items()]
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", 1))
    cfg = Config(world_size=world_size)
    for section, name, value, origin in settings:
        _apply(cfg, section, name, value, origin)
    _apply_recipes(cfg)
    data_checks.derive_vocab_size(cfg)
    validate(cfg)
    if check_files:
        data_checks.check_data(cfg)
        data_checks.check_eval_tasks(cfg)
    return CommandLine(cfg, print_config)


def _yaml_settings(data: dict) -> list[tuple[str, str, Any, str]]:
    """(section, name, value, origin) of each setting in a loaded YAML file."""
    settings = []
    for section, values in data.items():
        if section not in SECTIONS:
            close = difflib.get_close_matches(str(section), SECTIONS, n=1)
            raise ConfigError(f"config file: unknown section {section!r}. Fix: use "
                              f"{close[0] if close else ' / '.join(SECTIONS)!r}.")
        settings += [(section, name, value, CONFIG_FILE) for name, value in (values or {}).items()]
    return settings


def _flag_value(dest: str, raw):
    """A flag's value as YAML would read it (`--lr 3e-4` -> 0.0003); booleans and lists as given;
    a text setting's value as typed (`--run-dir 1e3` is "1e3", `--wandb-exp-name no` is "no"),
    except `null` for one that may be unset."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, list):  # nargs="+": `--iterations-to-skip 3 7` (or one YAML list, '[3, 7]')
        if dest == "data.data_path" or _item_type(dest) is str:
            return [str(t) for t in raw]
        items = [_yaml_or_text(t) for t in raw]
        return items[0] if len(items) == 1 and isinstance(items[0], list) else items
    alternatives = typing.get_args(tp := annotation(*dest.split(".", 1))) or (tp,)
    if str in alternatives and set(alternatives) <= {str, type(None)}:
        return None if raw == "null" and type(None) in alternatives else raw
    return _yaml_or_text(raw)


def _yaml_or_text(raw: str):
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _list_annotation(tp) -> Optional[Any]:
    """The list type inside an annotation (list[int], Optional[list[int]]), else None."""
    for t in (tp, *typing.get_args(tp)):
        if t is list or typing.get_origin(t) is list:
            return t
    return None


def _item_type(dest: str):
    lst = _list_annotation(annotation(*dest.split(".", 1)))
    args = typing.get_args(lst) if lst is not None else ()
    return args[0] if args else Any


def _apply(cfg: Config, section: str, name: str, value, origin: str) -> None:
    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {section}.{close[0]}?" if close else f"see `pretrain_neon.py --help` ({section})"
        where = "--" + name.replace("_", "-") if origin == COMMAND_LINE else origin
        raise ConfigError(f"{where}: unknown setting {section}.{name}. Fix: {hint}")
    key = f"{section}.{name}"
    cfg.set(key, coerce(key, value, annotation(section, name)), origin)


def _apply_recipes(cfg: Config) -> None:
    """Each switched-on feature's recipe, where the YAML file and the flags left the value."""
    for feature, recipe in feature_recipes().items():
        if not is_on(cfg.model, feature):
            continue
        for key, value in (recipe(cfg) if callable(recipe) else recipe).items():
            if applies(cfg, key):
                _apply(cfg, *key.split(".", 1), value, f"recipe:{feature}")


def annotation(section: str, name: str):
    if section == "model":
        return MODEL_FIELDS[name][0]
    return typing.get_type_hints(SECTIONS[section])[name]


# --- the argparse parser ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from neon.errors import STATUSES

    parser = argparse.ArgumentParser(
        prog="pretrain_neon.py",
        usage="torchrun [...] pretrain_neon.py [--config FILE.yaml] [--flag VALUE ...]",
        description="Pretrain a Neon model with megatron-core. Settings come from --config (YAML, "
                    "sections as below) and these flags (Megatron-LM names); flags win.",
        epilog="exit status:\n" + STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML file with sections " + ", ".join(SECTIONS))
    parser.add_argument("--print-config", action="store_true",
                        help="Print the resolved configuration (YAML, each value's origin as a comment) "
                             "and exit 0 before anything is built.")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section, (cls.__doc__ or "").strip().split("\n")[0])
        docs = model_field_docs() if cls is ModelSection else field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = f"{docs.get(f.name, '')} [{section}.{f.name}, default: {default!r}]".strip()
            if cls is ModelSection and refusal(f.name) is not None:
                help_text = argparse.SUPPRESS  # accepted, so that setting it gets its reason (inherited.py)
            _add_flag(group, section, f.name, help_text)
    return parser


def flag_names(section: str, name: str) -> list[str]:
    return ["--" + name.replace("_", "-")] + (ALIASES.get(name, []) if section == "model" else [])


def _add_flag(group, section: str, name: str, help_text: str) -> None:
    tp, flags, dest = annotation(section, name), flag_names(section, name), f"{section}.{name}"
    if is_bool(tp) and name.startswith("no_"):
        # BooleanOptionalAction would read `--no-load-optim` as "load_optim off" = False
        group.add_argument(*flags, dest=dest, action="store_true", help=help_text)
    elif is_bool(tp):
        group.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, help=help_text)
    elif section == "data" and name == "data_path":
        group.add_argument(*flags, dest=dest, nargs="+", metavar="[WEIGHT] PREFIX", help=help_text)
    elif _list_annotation(tp) is not None:
        item = typing.get_args(_list_annotation(tp))
        group.add_argument(*flags, dest=dest, nargs="+", metavar=type_name(item[0]).upper() if item else "VALUE",
                           help=help_text)
    else:
        choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else None
        group.add_argument(*flags, dest=dest, metavar=_metavar(tp), choices=choices, help=help_text)


def _metavar(tp) -> str:
    base = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    return type_name(base[0]).upper() if len(base) == 1 else "VALUE"


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (the string literal after each field) of a dataclass and its bases,
    read from their source, as Sphinx and tyro read them."""
    docs = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(inspect.getsource(klass))
        except (OSError, TypeError, SyntaxError, IndentationError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for prev, node in zip(body, body[1:]):
            if (isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name)
                    and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                    and isinstance(node.value.value, str)):
                docs[prev.target.id] = " ".join(node.value.value.split()).replace("%", "%%")
    return docs


def model_field_docs() -> dict[str, str]:
    """The model section's field docs: NeonConfig's (and megatron's) and each registered feature's settings'."""
    docs = dict(field_docs(NeonConfig))
    for feature in FEATURES.values():
        docs.update(field_docs(feature.settings))
    return docs
