"""Typed configuration: dataclasses filled from TOML tables and `--section.field value` overrides.

Every config in lmscale is a dataclass whose fields carry defaults and a docstring-style comment.
This module only moves values into them, converting strings from the command line to the field's
type and naming the option the user typed when a value does not fit.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from lmscale.errors import LmscaleError


def from_dict(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from `values`, rejecting unknown keys.

    Args:
        cls: the dataclass type.
        values: field name to value; nested dataclass fields take nested dicts.
        where: the dotted prefix used in error messages (e.g. "train.").
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise LmscaleError(f"unknown option '{where}{key}' (known: {known})")
        kwargs[key] = _coerce(value, _field_type(cls, key), f"{where}{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise LmscaleError(f"{where.rstrip('.') or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as plain TOML-able values (None fields are dropped: TOML has no null)."""
    return _drop_none(dataclasses.asdict(obj))


def _drop_none(table: dict[str, Any]) -> dict[str, Any]:
    return {
        k: _drop_none(v) if isinstance(v, dict) else v for k, v in table.items() if v is not None
    }


def to_toml(sections: dict[str, dict[str, Any]]) -> str:
    """Write `{section: {key: value}}` as TOML (flat tables of scalars and lists)."""
    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        for key, value in table.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, turning a missing or malformed file into a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise LmscaleError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise LmscaleError(f"{path}: invalid TOML: {e}") from None


def read_json_object(path: str | Path) -> dict[str, Any]:
    """Read a JSON file that must hold an object; an unreadable or other file is a one-line error."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LmscaleError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise LmscaleError(f"{path} does not hold a JSON object")
    return data


def parse_overrides(args: list[str]) -> dict[str, dict[str, str]]:
    """Turn `["--train.max_steps", "10", "--data.path=x"]` into `{"train": {"max_steps": "10"}, ...}`."""
    out: dict[str, dict[str, str]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise LmscaleError(
                f"unexpected argument '{arg}' (overrides look like --section.field VALUE)"
            )
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise LmscaleError(f"option '{arg}' needs a value")
            key, value = arg[2:], args[i + 1]
            i += 2
        section, field = key.split(".", 1)
        out.setdefault(section.replace("-", "_"), {})[field.replace("-", "_")] = value
    return out


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, tp: Any, option: str) -> Any:
    """Convert `value` (from TOML or a command-line string) to type `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], option)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise LmscaleError(
                f"option '{option}' must be one of {', '.join(map(str, choices))}, got '{value}'"
            )
        return value
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1]
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        return [_coerce(v, item, option) for v in value]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise LmscaleError(f"option '{option}' must be a table")
        return from_dict(tp, value, f"{option}.")
    try:
        if tp is bool:
            return _to_bool(value)
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if tp in (int, float, str):
            return tp(value)
    except (TypeError, ValueError):
        raise LmscaleError(f"option '{option}' must be {tp.__name__}, got '{value}'") from None
    return value


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass `cls` (the string literal after it).

    Python keeps no attribute docstrings at run time, so they are read from the class's source.
    """
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for field_node, doc_node in zip(body, body[1:], strict=False):
        is_doc = isinstance(doc_node, ast.Expr) and isinstance(doc_node.value, ast.Constant)
        if isinstance(field_node, ast.AnnAssign) and is_doc:
            docs[field_node.target.id] = " ".join(str(doc_node.value.value).split())
    return docs


def describe_options(section: str, cls: type, defaults: Any) -> list[str]:
    """One help line per field: `--section.field (default X): docstring`."""
    docs = field_docs(cls)
    lines = []
    for f in dataclasses.fields(cls):
        default = getattr(defaults, f.name)
        lines.append(f"  --{section}.{f.name} (default {default}): {docs.get(f.name, '')}".rstrip())
    return lines
