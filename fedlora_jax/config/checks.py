"""Field checks of the config sections: each fails with one sentence naming the key, the value and
what is allowed."""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing

from ..core.errors import UserError


def _choice(name, value, allowed):
    if value not in allowed:
        raise UserError(f"{name} = {value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def _positive(name, value, strict=True):
    if value is None or (value <= 0 if strict else value < 0):
        raise UserError(f"{name} must be {'> 0' if strict else '>= 0'}, got {value!r}")


def _at_least(name, value, low):
    if value is not None and value < low:
        raise UserError(f"{name} must be >= {low}, got {value!r}")


def _in_unit(name, value):
    """A decay rate or momentum: [0, 1)."""
    if not 0 <= value < 1:
        raise UserError(f"{name} must be in [0, 1), got {value!r}")


def _strings(name, values, empty_ok=False):
    if not values and not empty_ok:
        raise UserError(f"{name} is empty; give at least one entry")
    for x in values:
        if not isinstance(x, str) or not x:
            raise UserError(f"{name} entries must be non-empty strings, got {x!r}")


def _unwrap(t):
    """(the type inside an optional annotation, whether None is allowed)."""
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(t))
    return t, False


def _check_types(obj, prefix: str) -> None:
    """Every field holds a value of its declared type (finite numbers; ints for int fields), also
    for configs built in Python rather than from YAML."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        t, optional = _unwrap(hints[f.name])
        v, name = getattr(obj, f.name), f"{prefix}{f.name}"
        if v is None:
            if not optional:
                raise UserError(f"{name} needs a value, got none")
            continue
        if t is bool and not isinstance(v, bool):
            raise UserError(f"{name} must be true or false, got {v!r}")
        if t in (int, float):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise UserError(f"{name} must be a number, got {v!r}")
            if not math.isfinite(v):
                raise UserError(f"{name} must be a finite number, got {v!r}")
            if t is int and v != int(v):
                raise UserError(f"{name} must be an integer, got {v!r}")
        if t is str and not isinstance(v, str):
            raise UserError(f"{name} must be a string, got {v!r}")
