"""Reading configuration data: YAML files, bundled configs and `key=value` overrides into strict dataclasses.

Generic over frozen dataclass trees (`cqf.config` holds the schema): unknown keys and wrong types are one-line
ConfigErrors naming the key; PyYAML (YAML 1.1) reads `3e-4` as a string, so floats are coerced explicitly.
"""

from __future__ import annotations

import dataclasses
import typing
from importlib import resources
from pathlib import Path

import yaml

from .errors import ConfigError

__all__ = ["bundled_configs", "from_dict", "merge", "parse_override", "read_yaml", "to_dict"]


def _coerce(value, hint, where: str):
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args, strict=True))
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)  # PyYAML (YAML 1.1) reads "3e-4" as a string
        except ValueError:
            pass
    elif hint in (int, bool, str) and type(value) is hint:  # exact: True is not an int here
        return value
    raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a (partial) nested dict; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!s}; valid keys here: {', '.join(names)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def merge(base: dict, update: dict) -> dict:
    """`base` updated by `update`, recursively for nested mappings (neither is changed)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def bundled_configs() -> dict[str, str]:
    """Name -> first comment line (the description) of every config shipped with cqf."""
    found = {}
    for entry in sorted(resources.files("cqf.configs").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            first = entry.read_text().splitlines()[0] if entry.read_text() else ""
            found[entry.name[: -len(".yaml")]] = first.lstrip("# ").strip()
    return found


def read_yaml(source: str | Path) -> dict:
    """The mapping in a YAML file, or in the bundled config of that name (`bundled_configs`)."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        text = path.read_text()
    else:
        name = str(source)
        if name not in bundled_configs():
            raise ConfigError(f"unknown config {name!r}; bundled configs: {', '.join(bundled_configs())}")
        text = resources.files("cqf.configs").joinpath(name + ".yaml").read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {source} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {source} must be a mapping of sections (data, model, train, seed)")
    return data


def parse_override(text: str) -> dict:
    """'train.lr=3e-4' -> {'train': {'lr': 3e-4}} (the value is parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not KEY=VALUE (e.g. --set train.lr=3e-4)")
    value = yaml.safe_load(raw) if raw else ""
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists) for YAML, JSON and checkpoints."""

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))
