"""`--set section.field=value`: text assigned to a field of a frozen dataclass, nested ones by dotted paths.
The text takes the type of the field's present value (int, float, bool, str, tuple of numbers), a dataclass-typed
field a JSON object (or `none` where it may be None); every mistake raises a one-line `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from typing import Any

from dsv3_jax.config.errors import ConfigError

_NONE_WORDS = ("none", "null")


def parse_value(text: str, current: Any, field_name: str, nullable: bool = True):
    """Parse `text` into the type of `current` (the field's present value)."""
    lowered = text.strip().lower()
    if lowered in _NONE_WORDS:
        if not nullable:
            raise ConfigError(f"{field_name} cannot be None")
        return None
    if isinstance(current, bool):
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{field_name} expects true or false, got {text!r}")
    try:
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
    except ValueError:
        raise ConfigError(f"{field_name} expects a {type(current).__name__}, got {text!r}") from None
    if isinstance(current, str):
        return text
    if isinstance(current, tuple):
        items = json.loads(text) if text.strip().startswith("[") else [t for t in text.split(",") if t.strip()]
        try:
            return tuple(float(t) for t in items)
        except (TypeError, ValueError):
            raise ConfigError(f"{field_name} expects comma-separated numbers, got {text!r}") from None
    try:  # None or nested values: accept JSON, fall back to the raw string
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(obj, assignments, prefix: str):
    """Return `obj` (a frozen dataclass, possibly nested) with `field[.sub]=value` assignments applied."""
    for assignment in assignments:
        if "=" not in assignment:
            raise ConfigError(f"--set {prefix + '.' if prefix else ''}{assignment}: expected field=value")
        key, text = assignment.split("=", 1)
        name = f"{prefix}.{key.strip()}" if prefix else key.strip()
        obj = _set_path(obj, key.strip().split("."), text, name)
    return obj


def _set_path(obj, path: list[str], text: str, full_name: str):
    fields = {f.name: f for f in dataclasses.fields(obj)}
    head = path[0]
    if head not in fields:
        raise ConfigError(f"--set {full_name}: unknown field {head!r}; known: {', '.join(sorted(fields))}")
    current = getattr(obj, head)
    section = _dataclass_type(type(obj), head)
    if len(path) > 1:
        if current is None and section is not None:
            current = section()
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"{full_name}: {head!r} has no sub-fields")
        return dataclasses.replace(obj, **{head: _set_path(current, path[1:], text, full_name)})
    nullable = current is None or type(None) in typing.get_args(_field_types(type(obj)).get(head))
    if section is not None:
        value = _parse_section(section, text, full_name, nullable)
    else:
        value = parse_value(text, current, full_name, nullable)
    return dataclasses.replace(obj, **{head: value})


def _parse_section(section: type, text: str, full_name: str, nullable: bool):
    """A whole dataclass-typed field: `none` (or `off`) where it may be None, else a JSON object of its fields."""
    if text.strip().lower() in _NONE_WORDS + ("off",):
        if not nullable:
            raise ConfigError(f"{full_name} cannot be None")
        return None
    try:
        return section(**json.loads(text))
    except (json.JSONDecodeError, TypeError) as e:
        raise ConfigError(f"{full_name} expects a JSON object of {section.__name__} fields"
                          f"{' or none' if nullable else ''}, got {text!r} ({e})") from None


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_type(cls: type, name: str) -> type | None:
    """The dataclass that field `name` of `cls` holds (`YarnConfig` for `YarnConfig | None`), or None."""
    hint = _field_types(cls).get(name)
    for option in (hint, *typing.get_args(hint)):
        if isinstance(option, type) and dataclasses.is_dataclass(option):
            return option
    return None
