"""Config data in: YAML files read with errors that name the line, and mappings built into the
frozen dataclasses (values coerced to each field's type, unknown keys named)."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import yaml

from ..core.errors import UserError
from .checks import _unwrap


def _build(cls, data, prefix: str):
    where = prefix[:-1] or "the config"
    if data is None:
        raise UserError(f"{where} is empty; give its keys (e.g. {prefix}KEY: VALUE) or leave it out")
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping of keys to values, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kw = {}
    for k, v in data.items():
        if k not in fields:
            raise UserError(f"unknown config key {prefix + str(k)!r}; allowed: {', '.join(fields)}")
        t = hints[k]
        if dataclasses.is_dataclass(t):
            kw[k] = _build(t, v, f"{prefix}{k}.")
        else:
            kw[k] = _coerce(v, t, f"{prefix}{k}")
    return cls(**kw)


def _number(v, target, name):
    if isinstance(v, str):
        try:  # YAML 1.1 reads 3e-2 (no dot) as a string
            v = float(v)
        except ValueError:
            raise UserError(f"{name} must be a number, got {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"{name} must be a number, got {v!r}")
    if not math.isfinite(v):
        raise UserError(f"{name} must be a finite number, got {v!r}")
    if target is int:
        if v != int(v):
            raise UserError(f"{name} must be an integer, got {v!r}")
        return int(v)
    return float(v)


def _coerce(v, t, name):
    """A YAML value as the field's type, or a UserError naming the key."""
    target, optional = _unwrap(t)
    if v is None:
        if optional:
            return None
        raise UserError(f"{name} needs a value, got an empty one")
    origin = typing.get_origin(target) or target
    if target is bool:
        if not isinstance(v, bool):
            raise UserError(f"{name} must be true or false, got {v!r}")
        return v
    if target in (int, float):
        return _number(v, target, name)
    if target is str:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return str(v)  # name: 2024
        if not isinstance(v, str):
            raise UserError(f"{name} must be a string, got {v!r}")
        return v
    if origin is tuple:
        item = (typing.get_args(target) or (str,))[0]
        if isinstance(v, str):  # q_proj,v_proj
            v = [s.strip() for s in v.split(",") if s.strip()]
        elif not isinstance(v, (list, tuple)):
            if isinstance(v, dict):
                raise UserError(f"{name} must be a list, got {v!r}")
            v = [v]
        return tuple(_coerce(x, item, f"{name} entry") for x in v)
    if origin is dict:
        if not isinstance(v, dict):
            raise UserError(f"{name} must be a mapping, got {v!r}")
        return {k: _coerce(x, str, f"{name}.{k}") for k, x in v.items()}
    return v


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in a few words on one line, with its line and column when known."""
    mark, what = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    ctx, ctx_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if what is None:
        what, mark, ctx = ctx or str(e), ctx_mark, None
    text = (f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else "") + str(what)
    if ctx and ctx_mark is not None:
        text += f" ({ctx} started at line {ctx_mark.line + 1}, column {ctx_mark.column + 1})"
    return " ".join(text.split())


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key given twice (PyYAML keeps the last without a word)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: the constructor says so
                    continue
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"key {key!r} is given twice (first at line {first.line + 1}); keep one",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path, label: str):
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{label} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read {label}: {e.strerror or e}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506  (a SafeLoader)
    except yaml.YAMLError as e:
        raise UserError(f"{label} is not valid YAML ({_yaml_problem(e)})") from None
    except RecursionError:
        raise UserError(f"{label} nests too deeply to be a config") from None
