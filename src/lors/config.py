"""Typed configs: YAML files loaded into nested dataclasses, overridden with ``key=value``.

    cfg = load_config(DetectorConfig, "adamixer_lors_r50_1x", ["decoder.num_queries=300"],
                      kind="detect")

- A name without a slash or suffix resolves to ``configs/KIND/NAME.yaml`` (see
  ``resolve_config``); a path is read as given.
- Override values are parsed as YAML (``lors.adaptive.groups=[2,2,2,2,2,2]``,
  ``backbone.weights=null``); keys are dotted paths into the dataclasses. Float fields also
  take numbers that YAML 1.1 leaves as strings, such as ``1e-4``.
- An unknown key or a value of the wrong type raises ``ValueError`` naming the key, the
  valid keys or the expected type.
- A config class may define ``validate()`` (ranges, rules between keys); ``apply_overrides``,
  and so every loader, calls it on the final config, after all overrides.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

T = TypeVar("T")
CONFIG_DIR_ENV = "LORS_CONFIG_DIR"


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _check(value: Any, tp: Any, key: str) -> Any:
    """``value`` converted to ``tp`` (ints are accepted for floats), else ValueError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ValueError(f"config key '{key}' is a section ({tp.__name__}); got {value!r}, "
                             f"expected a mapping of its keys")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return _check(value, option, key)
            except ValueError:
                continue
        raise ValueError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"config key '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key '{key}' expects a list ({_type_name(tp)}), got {value!r}")
        item = args[0] if args else Any
        return [_check(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key '{key}' expects true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key '{key}' expects an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key '{key}' expects a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"config key '{key}' expects a string, got {value!r}")
        return value
    raise TypeError(f"config key '{key}': unsupported annotation {tp!r}")


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def from_dict(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping; missing keys keep their defaults."""
    fields = _fields(cls)
    values = {}
    for key, value in (data or {}).items():
        if key not in fields:
            raise ValueError(f"unknown config key '{prefix}{key}'; valid keys here: "
                             f"{', '.join(prefix + k for k in fields)}")
        values[key] = _check(value, fields[key], f"{prefix}{key}")
    return cls(**values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain nested dicts and lists (for YAML, JSON and checkpoints)."""
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=VALUE"`` -> ``("a.b", yaml.safe_load(VALUE))``."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override {text!r} must look like key=value (dotted keys for sections, "
                         f"e.g. decoder.num_queries=300)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ValueError(f"override {text!r}: the value is not valid YAML ({err})") from err
    return key, value


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    """A copy of ``cfg`` with dotted ``key=value`` overrides applied, type-checked and, if ``cfg``
    has a ``validate()`` method, validated."""
    data = to_dict(cfg)
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        node, cls, where = data, type(cfg), ""
        for i, part in enumerate(parts):
            fields = _fields(cls)
            if part not in fields:
                raise ValueError(f"unknown config key '{where}{part}'; valid keys here: "
                                 f"{', '.join(where + k for k in fields)}")
            if i == len(parts) - 1:
                node[part] = value
            else:
                sub = fields[part]
                if not dataclasses.is_dataclass(sub):
                    raise ValueError(f"config key '{where}{part}' is a value, not a section; "
                                     f"cannot set '{key}'")
                node, cls, where = node[part], sub, f"{where}{part}."
    cfg = from_dict(type(cfg), data)
    if callable(getattr(cfg, "validate", None)):
        cfg.validate()  # ranges are checked once the overrides are in: they may fix each other
    return cfg


def repo_root() -> Path:
    """The checkout that holds this package: ``src/lors/config.py`` -> the repository root."""
    return Path(__file__).resolve().parents[2]


def config_dirs(kind: str) -> list[Path]:
    """Where presets of ``kind`` are looked for: ``$LORS_CONFIG_DIR/KIND``, then the
    repository's ``configs/KIND``."""
    dirs = []
    if os.environ.get(CONFIG_DIR_ENV):
        dirs.append(Path(os.environ[CONFIG_DIR_ENV]).expanduser() / kind)
    dirs.append(repo_root() / "configs" / kind)
    return dirs


def available_configs(kind: str) -> list[str]:
    names = set()
    for d in config_dirs(kind):
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def resolve_config(name_or_path: str | Path, kind: str) -> Path:
    """A preset name (``adamixer_r50_1x``) or a path to a YAML file -> the file's path."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    text = str(name_or_path)
    if "/" not in text and "\\" not in text and path.suffix not in (".yaml", ".yml"):
        for d in config_dirs(kind):
            candidate = d / f"{text}.yaml"
            if candidate.is_file():
                return candidate
        names = available_configs(kind)
        where = " or ".join(str(d) for d in config_dirs(kind))
        if names:
            raise ValueError(f"no {kind} config named {text!r} in {where}; presets: {', '.join(names)}")
        raise ValueError(f"no {kind} config named {text!r}: no presets found in {where} (an installed "
                         f"package has no configs/ folder); pass a YAML file's path, or set "
                         f"{CONFIG_DIR_ENV} to a folder holding {kind}/{text}.yaml")
    raise ValueError(f"config file {str(path)!r} does not exist")


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read config {path}: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a YAML mapping of sections, got {type(data).__name__}")
    return data


def load_config(cls: type[T], source: str | Path | Mapping[str, Any] | None = None,
                overrides: Sequence[str] = (), kind: str = "") -> T:
    """Load ``cls`` from a preset name, a YAML path or a mapping (``None``: the defaults),
    then apply ``key=value`` overrides."""
    if source is None:
        cfg = cls()
    elif isinstance(source, Mapping):
        cfg = from_dict(cls, source)
    else:
        path = resolve_config(source, kind)
        try:
            cfg = from_dict(cls, load_yaml(path))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    return apply_overrides(cfg, overrides)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
