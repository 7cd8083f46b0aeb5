"""Typed job configs: one dataclass per job, loaded from YAML and ``--set KEY=VALUE``.

:class:`ConfigFile` gives a config dataclass its loading and printing (unknown keys refused by name, values
coerced to each field's type); the job's own class adds its fields, defaults and ``validate``. Imports nothing
of adps, so any layer may use it.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

ConfigT = TypeVar("ConfigT", bound="ConfigFile")


class ConfigFile:
    """Mixin for config dataclasses: ``from_dict``, ``from_yaml``, ``replace``, ``to_dict``, ``to_yaml``.

    A subclass may name ``RENAMED_KEYS`` (old name -> new name: the old one is read as the new)
    and ``RETIRED_KEYS`` (old name -> why it went: refused with that message)."""

    @classmethod
    def from_dict(cls: type[ConfigT], values: Mapping[str, Any]) -> ConfigT:
        """Build a config from a mapping, coercing YAML / command-line values to each field's type; raises
        ValueError for an unknown key (named, with the known ones) or a value of the wrong type."""
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        values = dict(values)
        for old, new in getattr(cls, "RENAMED_KEYS", {}).items():
            if old in values:  # a key's older name: read as the new one (configs written before the rename)
                if new in values:
                    raise ValueError(f"config keys {old!r} and {new!r} are the same key (its old and new name); give one")
                values[new] = values.pop(old)
        unknown = sorted(set(values) - known)
        renamed = getattr(cls, "RETIRED_KEYS", {})
        for key in unknown:
            if key in renamed:  # a key an older adps knew: say what replaced it
                raise ValueError(f"config key {key!r} is no longer used: {renamed[key]}")
        if unknown:
            raise ValueError(f"unknown config key {unknown[0]!r} (known keys: {', '.join(sorted(known))})")
        hints = typing.get_type_hints(cls)
        return cls(**{key: coerce_value(key, value, hints[key]) for key, value in values.items()})

    @classmethod
    def from_yaml(cls: type[ConfigT], path: str | Path, overrides: Mapping[str, Any] | None = None) -> ConfigT:
        """Load a YAML mapping of config keys, then apply ``overrides`` (e.g. ``--set`` values)."""
        text = Path(path).read_text()
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
        return cls.from_dict({**values, **(overrides or {})})

    def replace(self: ConfigT, **changes: Any) -> ConfigT:
        """A copy with ``changes`` applied (coerced and checked like :meth:`from_dict`)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def absolute_paths(self: ConfigT, *keys: str) -> ConfigT:
        """A copy whose local paths among ``keys`` (set, no ``scheme://``) are absolute: Ray
        workers and tasks run in other folders than the driver."""
        absolute = {key: str(Path(value).resolve()) for key in keys
                    if (value := getattr(self, key)) and "://" not in value}
        return self.replace(**absolute) if absolute else self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples as lists), as recorded in manifests and checkpoints."""
        items = dataclasses.asdict(self).items()  # type: ignore[call-overload]
        return {key: list(value) if isinstance(value, tuple) else value for key, value in items}

    def to_yaml(self) -> str:
        """The config as YAML, in field order (printed at the start of a job)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


def from_preset(presets: Mapping[str, Any], preset: str, kind: str, **overrides: Any) -> Any:
    """``presets[preset]`` (a dataclass) with ``overrides`` set; an unknown preset or field is
    refused by name (``kind`` names the presets in the message: ``network``, ``MoDL``)."""
    if preset not in presets:
        raise ValueError(f"unknown {kind} preset {preset!r}; choose one of {sorted(presets)}")
    config = presets[preset]
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(config)})
    if unknown:
        raise ValueError(f"unknown {type(config).__name__} field(s) {unknown} in overrides for preset {preset!r}")
    return dataclasses.replace(config, **overrides)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["n_volumes=100", "l1=true", "crop=64,48"]`` -> a mapping for :meth:`ConfigFile.from_dict`.

    Values are read as YAML scalars or lists (``true``, ``4``, ``[2, 4]``); ``from_dict`` then
    coerces them to each field's type, so ``accelerations=4,8`` works too.
    """
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        # A path or URI stays text even where YAML would read it otherwise.
        overrides[key.strip()] = raw if isinstance(value, dict) else value
    return overrides


def coerce_value(key: str, value: Any, hint: Any) -> Any:
    """Coerce a YAML or ``--set`` value to the type of config field ``key``."""
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[]() ").split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ValueError(f"config key {key!r}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce_value(key, v, args[0]) for v in value)
        if len(value) != len(args):
            raise ValueError(f"config key {key!r}: expected {len(args)} values, got {len(value)}: {list(value)}")
        return tuple(coerce_value(key, v, t) for v, t in zip(value, args, strict=True))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
        raise ValueError(f"config key {key!r}: expected true or false, got {value!r}")
    if hint is int:
        try:
            number = None if isinstance(value, bool) or not isinstance(value, int | str | float) else float(value)
        except ValueError:
            number = None
        if number is None or not number.is_integer():
            raise ValueError(f"config key {key!r}: expected an integer, got {value!r}")
        return int(number)
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"config key {key!r}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"config key {key!r}: expected a number, got {value!r}") from None
        # Integral values stay ints, so that the recorded config reads "R: 4", not "4.0",
        # and a YAML "4" and a "--set 4.0" compare equal in the resume check.
        return int(number) if number.is_integer() else number
    if hint is str:
        if isinstance(value, str | Path):
            return str(value)
        raise ValueError(f"config key {key!r}: expected a string, got {value!r}")
    raise TypeError(f"config key {key!r}: unsupported field type {hint!r}")  # a bug here, not user input
