"""Type-checking of one setting's value (from YAML or a flag) against its dataclass annotation.

`coerce(where, value, annotation)` returns the value in the annotation's type or raises a
ConfigError naming the setting. YAML 1.1 quirks it undoes: `3e-4` (no dot) is read as a string,
and `off`/`on` as booleans. Annotations it knows: bool, int, float, str, None, Literal[...],
Optional/Union, list[...] and tuple[...] of those (model_section.representable() says which
NeonConfig fields qualify).
"""

from __future__ import annotations

import types
import typing
from typing import Literal, Union

from neon.training.config.sections import ConfigError


def coerce(where: str, value, tp):
    """`value` as annotation `tp`, or ConfigError naming `where` ("section.field")."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return value
    if origin in (Union, types.UnionType):
        for alternative in args:
            try:
                return coerce(where, value, alternative)
            except ConfigError:
                continue
    elif origin is Literal:
        return _choice(where, value, args)
    elif origin in (list, tuple) or tp is list:
        return _sequence(where, value, tp)
    else:
        ok, result = _scalar(value, tp)
        if ok:
            return result
    raise ConfigError(f"{where}={value!r} has the wrong type: expected {type_name(tp)}. "
                      f"Fix: give a value of that type.")


def _choice(where: str, value, choices: tuple):
    if isinstance(value, bool) and {"off", "on"} & set(choices):
        value = "on" if value else "off"  # YAML 1.1: `diff_attention: off` means the choice "off"
    if value in choices:
        return value
    raise ConfigError(f"{where}={value!r} is not a valid choice. Fix: use one of {list(choices)}.")


def _sequence(where: str, value, tp):
    args = typing.get_args(tp)
    if isinstance(value, str) and tp == list[str]:  # YAML `key: one entry` is a one-entry list
        value = [value]
    if isinstance(value, (list, tuple)):
        if typing.get_origin(tp) is tuple:
            if len(value) == len(args):
                return tuple(coerce(f"{where}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
        else:
            inner = args[0] if args else typing.Any
            return [coerce(f"{where}[{i}]", v, inner) for i, v in enumerate(value)]
    raise ConfigError(f"{where}={value!r} has the wrong type: expected {type_name(tp)}. "
                      f"Fix: give a value of that type.")


def _scalar(value, tp) -> tuple[bool, object]:
    """(True, value as tp) when `value` is a `tp` (bool, int, float, str or None), else (False, None)."""
    is_bool = isinstance(value, bool)
    if tp is type(None):
        return value is None, None
    if tp is bool:
        return is_bool, value
    if tp is int:
        return isinstance(value, int) and not is_bool, value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, None
        ok = isinstance(value, (int, float)) and not is_bool
        return ok, float(value) if ok else None
    if tp is str:
        ok = isinstance(value, (str, int, float)) and not is_bool
        return ok, str(value) if ok else None
    return False, None


def type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def is_bool(tp) -> bool:
    """bool or Optional[bool]: the annotations that become on/off flags."""
    if tp is bool:
        return True
    if typing.get_origin(tp) in (Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)] == [bool]
    return False
