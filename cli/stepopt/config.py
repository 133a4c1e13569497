"""Method configurations: dataclasses filled from a YAML file and ``--set KEY=VALUE`` overrides.

Unknown keys and values of the wrong type are errors that list the valid keys. A field whose type
is itself a dataclass (e.g. ``teacher: TeacherConfig``) is a nested section: a mapping in the file
(``teacher: {steps: 200}``), a dotted key on the command line (``--set teacher.steps=200``), or,
for files written before the nesting, the flat key ``teacher_steps``. Sections merge key by key
into the field's default (a section whose default differs from its class's defaults keeps it). A
config class may rename old flat keys (``RENAMED_KEYS``, e.g. ``teacher_substeps`` ->
``teacher.steps``).

**Presets.** A config class with a ``preset`` field and a ``PRESETS`` mapping (preset name -> option
values, sections as nested mappings) resolves in the order defaults <- the chosen preset's values
<- the config file <- ``--set`` items <- explicit overrides: every key given explicitly wins over
the preset, key by key inside a section (``--set preset=paper --set teacher.steps=40`` keeps the
preset's other teacher keys). The preset is chosen by the ``preset`` key from any of those sources.
The built config holds the resolved values and the preset's name, so recording it records both.
Presets are applied here, by name: ``Cls(preset=...)`` built directly records the name only.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from stepopt import safeyaml
from stepopt.errors import ConfigError

T = TypeVar("T")


def _parse_set(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"`sets` '{item}': expected KEY=VALUE, e.g. `p=2`")
    try:
        value = safeyaml.load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _check_type(cls_name: str, key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(cls_name, key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{cls_name}: '{key}' has an invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"'{key}' = {value!r}: expected one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' = {value!r}: expected a list")
        inner = args[0] if args else Any
        vals = [_check_type(cls_name, f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
        return tuple(vals) if origin is tuple else vals
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}' = {value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{key}' = {value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}' = {value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{key}' = {value!r}: expected a string")
        return value
    return value


def resolve_config(
    cls: type[T],
    file: str | os.PathLike[str] | None = None,
    sets: Iterable[str] = (),
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Defaults <- config file <- ``--set`` items <- explicit overrides (command-line flags)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    values: dict[str, Any] = {}
    if file is not None:
        p = Path(file)
        try:
            data = safeyaml.load(safeyaml.read_text(p))
        except safeyaml.InputFileError as e:
            raise ConfigError(f"`config` {p}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"`config` {p}: not valid YAML ({' '.join(str(e).split())})") from None
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"`config` {p}: expected a mapping of option: value")
        values.update(data)
    for item in sets:
        k, v = _parse_set(item)
        values[k] = v
    for k, v in (overrides or {}).items():
        if v is not None:
            values[k] = v
    return _build(cls, _with_preset(cls, values), "")


def _with_preset(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` laid over the values of the preset they name (or the class's default preset)."""
    presets: Mapping[str, Mapping[str, Any]] | None = getattr(cls, "PRESETS", None)
    if presets is None:
        return values
    default = next((f.default for f in dataclasses.fields(cls) if f.name == "preset"), None)  # type: ignore[arg-type]
    name = values.get("preset", default)
    if not isinstance(name, str) or name not in presets:
        raise ConfigError(f"'preset' = {name!r}: expected one of {', '.join(map(repr, presets))}")
    merged: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in presets[name].items()}
    for k, v in values.items():
        if isinstance(v, Mapping) and isinstance(merged.get(k), Mapping):
            merged[k] = {**merged[k], **v}  # a section given as a mapping overrides the preset's key by key
        else:
            merged[k] = v
    return merged


def _nested(tp: Any) -> type | None:
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _build(cls: type[T], values: Mapping[str, Any], prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
    sections = {n: sub for n in names if (sub := _nested(hints[n])) is not None}
    renamed: Mapping[str, str] = getattr(cls, "RENAMED_KEYS", {})
    flat: dict[str, Any] = {}
    parts: dict[str, dict[str, Any]] = {}
    for key, v in values.items():
        key = renamed.get(key, key)
        head, dot, rest = key.partition(".")
        legacy = next((n for n in sections if key.startswith(n + "_") and key not in names), None)
        if dot and head in sections:
            parts.setdefault(head, {})[rest] = v
        elif legacy is not None:  # e.g. teacher_steps -> teacher.steps (files from before the nesting)
            parts.setdefault(legacy, {})[key[len(legacy) + 1 :]] = v
        elif key in sections and isinstance(v, Mapping):
            parts.setdefault(key, {}).update(v)
        else:
            flat[key] = v
    out: dict[str, Any] = {}
    for k, v in flat.items():
        if k not in names:
            raise ConfigError(f"unknown option '{prefix}{k}' for {cls.__name__}; valid options: {', '.join(names)}")
        if k in sections and not isinstance(v, sections[k]):
            raise ConfigError(f"'{prefix}{k}' = {v!r}: expected a mapping of {sections[k].__name__} options")
        out[k] = v if k in sections else _check_type(cls.__name__, prefix + k, v, hints[k])
    for k, sub_values in parts.items():
        out[k] = _build(sections[k], {**_section_default(cls, k), **sub_values}, f"{prefix}{k}.")
    try:
        return cls(**out)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None


def _section_default(cls: type, name: str) -> dict[str, Any]:
    """The field ``name``'s default section as plain values (empty when it has none)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)  # type: ignore[arg-type]
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return dataclasses.asdict(default) if dataclasses.is_dataclass(default) and not isinstance(default, type) else {}


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The full resolved configuration as plain data (lists for tuples)."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
