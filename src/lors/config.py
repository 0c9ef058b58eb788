"""Typed configs: YAML files loaded into nested dataclasses, overridden with ``key=value``.

    cfg = load_config(DetectorConfig, "adamixer_lors_r50_1x", ["decoder.num_queries=300"],
                      kind="detect")

- A name without a slash or suffix resolves to ``KIND/NAME.yaml`` in ``$LORS_CONFIG_DIR`` (your
  own presets), else in the presets shipped inside the package, ``lors/configs/KIND/`` (see
  ``resolve_config``); a path is read as given.
- A YAML file may start from another with a top-level ``base: NAME_OR_PATH``: a preset name of
  the same kind, or a path relative to the file's own folder. The base is loaded (with its own
  base, and so on; a cycle is a ``ValueError`` naming the chain) and the file is merged over it:
  mappings key by key, lists and scalars replaced. So a preset states only what differs from
  its base, and ``save_config`` writes the resolved values, never ``base``.
- Override values are parsed as YAML (``lors.adaptive.groups=[2,2,2,2,2,2]``,
  ``backbone.weights=null``); keys are dotted paths into the dataclasses. Float fields also
  take numbers that YAML 1.1 leaves as strings, such as ``1e-4``.
- An unknown key or a value of the wrong type raises ``ValueError`` naming the key, the
  valid keys or the expected type; one found in a YAML file also names the file.
- A config class may define ``validate()`` (ranges, rules between keys). Every loader builds
  the dataclass once, from the merged files with all overrides applied, and then calls it: a
  preset whose values are only valid together with an override still loads.
- A top-level config whose fields are all sections subclasses ``Sections``: each section gets
  its defaults, and ``validate()`` validates them in field order (``validate_sections``). Rules
  use one vocabulary: ``require``, ``at_least``, ``positive``, ``within``, ``multiple_of`` for a
  key's range, ``check_rule`` for a rule between keys; each names the key and the fix in one line.
- A config built in Python rather than loaded can check its own field types the same way by
  calling ``check_types(self)`` in ``__post_init__`` (and then its ``validate()``).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
import math
import numbers
import os
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

T = TypeVar("T")
CONFIG_DIR_ENV = "LORS_CONFIG_DIR"
BASE_KEY = "base"


class ConfigTypeError(ValueError):
    """A value that does not fit its field's annotation: ``key``, what it ``expected``, ``value``."""

    def __init__(self, key: str, expected: str, value: Any):
        super().__init__(f"config key '{key}' must be {expected}, got {value!r}")
        self.key, self.expected, self.value = key, expected, value


# ---- range checks that config sections' validate() methods share ----

def require(ok: bool, key: str, value: Any, rule: str) -> None:
    """ValueError naming ``key``, its ``value`` and the ``rule`` it breaks, unless ``ok``."""
    if not ok:
        raise ValueError(f"{config_keys(key)} must be {rule}, got {value!r}")


def rule_note(why: str) -> str:
    """The suffix ` (why)` of a rule, or nothing."""
    return f" ({why})" if why else ""


def at_least(key: str, value: int | float, low: int | float, why: str = "") -> None:
    """ValueError unless ``value`` (finite) is >= ``low``; the message names the config key."""
    finite = isinstance(value, int) or math.isfinite(value)
    require(finite and value >= low, key, value, f">= {low}{rule_note(why)}")


def positive(key: str, value: float, why: str = "") -> None:
    """ValueError unless ``value`` is finite and > 0."""
    require(math.isfinite(value) and value > 0, key, value, f"> 0{rule_note(why)}")


def within(key: str, value: float, low: float, high: float, interval: str, why: str = "") -> None:
    """ValueError unless ``low`` ... ``high`` holds ``value``; ``interval`` is "[]", "[)", "(]" or
    "()" (which ends are allowed; NaN never is)."""
    ok = ((low <= value if interval[0] == "[" else low < value)
          and (value <= high if interval[1] == "]" else value < high))
    require(ok, key, value, f"in {interval[0]}{low}, {high}{interval[1]}{rule_note(why)}")


def multiple_of(key: str, value: int, of_key: str, of: int) -> None:
    """ValueError unless ``value`` (config key ``key``) is a multiple of ``of`` (``of_key``)."""
    require(value % of == 0, key, value, f"a multiple of {of_key} ({of})")


def config_keys(keys: str | Sequence[str]) -> str:
    """``config key 'a'``, or ``config keys 'a', 'b' and 'c'``: how messages name config keys."""
    if isinstance(keys, str):
        return f"config key '{keys}'"
    quoted = [f"'{k}'" for k in keys]
    return f"config keys {', '.join(quoted[:-1])} and {quoted[-1]}" if len(quoted) > 1 else f"config key {quoted[0]}"


def check_rule(ok: bool, keys: str | Sequence[str], broken: str) -> None:
    """ValueError unless ``ok``: a rule between config keys, or one that "must be RULE, got VALUE"
    (`require`) cannot say. The message names the key(s) (`config_keys`) and goes on with
    ``broken``, what is wrong and how to fix it: a clause (``"is 0, but ..."``, ``"are both false,
    ...: set one of them to true"``) or, starting with a colon, a sentence about the key."""
    if not ok:
        raise ValueError(f"{config_keys(keys)}{'' if broken.startswith(':') else ' '}{broken}")


class LayerCount(int):
    """The number of layers that a config's per-layer lists must have, and the config ``key``
    that sets it (``model.depth``), so that a message names the key of the config at hand."""
    key: str

    def __new__(cls, value: int, key: str) -> "LayerCount":
        count = super().__new__(cls, value)
        count.key = key
        return count


def validate_sections(cfg: Any, **arguments: Any) -> None:
    """Call ``validate()`` of every section of the config ``cfg``, in field order; a section
    named in ``arguments`` gets that value (``lors=depth``: the LORS section checks per-layer
    lists against the number of layers)."""
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if f.name in arguments:
            section.validate(arguments[f.name])
        elif hasattr(section, "validate"):
            section.validate()


# tells type checkers that a subclass of Sections is a dataclass (typing has it from Python 3.11)
_dataclass_transform = getattr(typing, "dataclass_transform", lambda **_: lambda cls: cls)


@_dataclass_transform(field_specifiers=(dataclasses.field,))
class Sections:
    """The base of a top-level config (`DetectorConfig`, `LMConfig`, `VitConfig`), whose fields
    are all sections: a subclass is made a dataclass (no ``@dataclass`` needed) in which a field
    annotated with a section class and given no default gets that section's defaults
    (``field(default_factory=SECTION)``). Its ``validate()`` calls every section's, in field
    order (`validate_sections`), passing the ``lors`` section the value at the dotted key named
    by the class keyword ``lors_layers``, the number of layers its per-layer lists must have::

        class VitConfig(Sections, lors_layers="model.depth"):
            model: VitModelConfig
            lors: LorsSection

    A subclass with rules between sections extends ``validate`` (``super().validate()`` first).
    The section classes must be defined, at module level, before the config class.
    """
    lors_layers: typing.ClassVar[str | None] = None

    def __init_subclass__(cls, lors_layers: str | None = None, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if lors_layers is not None:
            cls.lors_layers = lors_layers
        hints = typing.get_type_hints(cls)
        for name in cls.__dict__.get("__annotations__", {}):
            if name not in cls.__dict__ and dataclasses.is_dataclass(hints[name]):
                setattr(cls, name, dataclasses.field(default_factory=hints[name]))
        dataclasses.dataclass(cls)  # in place: the class keeps its identity (and pickles by name)

    def validate(self) -> None:
        """ValueError naming the first key out of its range; the loader calls this."""
        arguments = {}
        if self.lors_layers is not None:
            arguments["lors"] = LayerCount(functools.reduce(getattr, self.lors_layers.split("."), self), self.lors_layers)
        validate_sections(self, **arguments)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


# what typing.get_origin gives for list[int], tuple[int, ...] and Sequence[int] (collections.abc's)
LIST_ORIGINS = (list, tuple, collections.abc.Sequence)


def _check(value: Any, tp: Any, key: str) -> Any:
    """``value`` converted to ``tp`` (ints are accepted for floats), else ValueError. A section
    (a dataclass annotation) comes back as a checked dict, not yet built."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ValueError(f"config key '{key}' is a section ({tp.__name__}); got {value!r}, "
                             f"expected a mapping of its keys")
        return _checked(tp, value, prefix=f"{key}.")
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
        raise ConfigTypeError(key, _type_name(tp), value)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigTypeError(key, f"one of {list(args)}", value)
        return value
    if origin in LIST_ORIGINS:
        if not isinstance(value, (list, tuple)):
            raise ConfigTypeError(key, f"a list ({_type_name(tp)})", value)
        item = args[0] if args else Any
        return [_check(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigTypeError(key, "true or false", value)
        return value
    if tp is int:  # numbers.Integral: numpy ints too
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigTypeError(key, "an integer", value)
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigTypeError(key, "a number", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigTypeError(key, "a string", value)
        return value
    raise TypeError(f"config key '{key}': unsupported annotation {tp!r}")


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(key: str, prefix: str, fields: Mapping[str, Any]) -> ValueError:
    return ValueError(f"unknown config key '{prefix}{key}'; valid keys here: "
                      f"{', '.join(prefix + k for k in fields)}")


def _checked(cls: type, data: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """``data``, a (partial, nested) mapping of ``cls``'s keys, with every key checked and
    every value converted to its field's type; sections stay dicts."""
    fields = _fields(cls)
    out = {}
    for key, value in (data or {}).items():
        if key not in fields:
            raise _unknown(key, prefix, fields)
        out[key] = _check(value, fields[key], f"{prefix}{key}")
    return out


def _build(cls: type[T], data: Mapping[str, Any]) -> T:
    """Dataclass ``cls`` from a mapping that ``_checked`` returned; missing keys keep their
    defaults. Sections, and lists of sections (``list[Row]``), are built too."""
    fields = _fields(cls)

    def value(tp: Any, v: Any) -> Any:
        if dataclasses.is_dataclass(tp):
            return _build(tp, v)
        args = typing.get_args(tp)
        if typing.get_origin(tp) in LIST_ORIGINS and args and dataclasses.is_dataclass(args[0]):
            return [_build(args[0], item) for item in v]
        return v
    return cls(**{k: value(fields[k], v) for k, v in data.items()})


def from_dict(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping; missing keys keep their defaults."""
    return _build(cls, _checked(cls, data, prefix))


def check_types(cfg: Any) -> None:
    """Check the fields of a dataclass built in Python against their annotations, as a loaded
    config's are; ints become floats for float fields (numpy ints become ints). Call it from
    ``__post_init__`` (frozen classes too). ValueError naming the class, field and type.

    Sections (dataclass fields holding an instance) are left to check themselves.
    """
    cls = type(cfg)
    hints = _fields(cls)
    for f in dataclasses.fields(cls):
        tp, value = hints[f.name], getattr(cfg, f.name)
        if dataclasses.is_dataclass(tp) and isinstance(value, tp):
            continue
        try:
            checked = _check(value, tp, f.name)
        except ConfigTypeError as err:
            example = "" if f.default is dataclasses.MISSING else f": pass e.g. {f.name}={f.default!r}"
            raise ValueError(f"{cls.__name__}.{err.key} must be {err.expected}, got {err.value!r} "
                             f"({type(err.value).__name__}){example}") from None
        if checked is not value:
            object.__setattr__(cfg, f.name, checked)  # 3 -> 3.0 for a float field


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain nested dicts and lists (for YAML, JSON and checkpoints)."""
    return dataclasses.asdict(cfg)


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base``: mappings key by key (recursively); lists and scalars replace."""
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = merge(out[key], value) if both else value
    return out


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


def _set_override(cls: type, data: dict[str, Any], text: str) -> None:
    """Set override ``text`` (``a.b=VALUE``) in the nested mapping ``data`` of ``cls``'s keys."""
    key, value = parse_override(text)
    parts = key.split(".")
    node, where = data, ""
    for i, part in enumerate(parts):
        fields = _fields(cls)
        if part not in fields:
            raise _unknown(part, where, fields)
        if i == len(parts) - 1:
            node[part] = value
        else:
            cls = fields[part]
            if not dataclasses.is_dataclass(cls):
                raise ValueError(f"config key '{where}{part}' is a value, not a section; cannot set '{key}'")
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node, where = node[part], f"{where}{part}."


def _finish(cls: type[T], data: Mapping[str, Any], overrides: Sequence[str]) -> T:
    """``cls`` built once from ``data`` with ``overrides`` applied, then validated."""
    data = merge({}, data)  # a copy of every mapping level, which the overrides write into
    for text in overrides:
        _set_override(cls, data, text)
    cfg = from_dict(cls, data)
    if callable(getattr(cfg, "validate", None)):
        cfg.validate()  # ranges are checked once the overrides are in: they may fix each other
    return cfg


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    """A copy of ``cfg`` with dotted ``key=value`` overrides applied, type-checked and, if ``cfg``
    has a ``validate()`` method, validated."""
    return _finish(type(cfg), to_dict(cfg), overrides)


def packaged_configs() -> Path:
    """The folder of the presets shipped with the package (``lors/configs``, package data found
    through ``importlib.resources``, so a wheel install has them as a checkout does)."""
    return Path(str(resources.files("lors") / "configs"))  # installed packages are unzipped folders


def config_dirs(kind: str) -> list[Path]:
    """Where presets of ``kind`` are looked for: ``$LORS_CONFIG_DIR/KIND``, then the package's
    ``lors/configs/KIND``."""
    dirs = []
    if os.environ.get(CONFIG_DIR_ENV):
        dirs.append(Path(os.environ[CONFIG_DIR_ENV]).expanduser() / kind)
    dirs.append(packaged_configs() / kind)
    return dirs


def available_configs(kind: str) -> list[str]:
    names = set()
    for d in config_dirs(kind):
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def _is_preset_name(text: str) -> bool:
    return "/" not in text and "\\" not in text and Path(text).suffix not in (".yaml", ".yml")


def _find_preset(name: str, kind: str) -> Path:
    for d in config_dirs(kind):
        candidate = d / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    names = available_configs(kind)
    where = " or ".join(str(d) for d in config_dirs(kind))
    if names:
        raise ValueError(f"no {kind} config named {name!r} in {where}; presets: {', '.join(names)}")
    raise ValueError(f"no {kind} config named {name!r}: no presets found in {where}; pass a YAML "
                     f"file's path, or set {CONFIG_DIR_ENV} to a folder holding {kind}/{name}.yaml")


def resolve_config(name_or_path: str | Path, kind: str) -> Path:
    """A preset name (``adamixer_r50_1x``) or a path to a YAML file -> the file's path."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if _is_preset_name(str(name_or_path)):
        return _find_preset(str(name_or_path), kind)
    raise ValueError(f"config file {str(path)!r} does not exist")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in one YAML file, as written (a ``base`` key included)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"config {path} is not a UTF-8 text file (byte {err.start} does not decode): pass a "
                         "YAML file") from None
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read config {path}: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a YAML mapping of sections, got {type(data).__name__}")
    return data


def _base_path(base: Any, path: Path, kind: str) -> Path:
    """The file that ``base: BASE`` in ``path`` names: a preset of ``kind``, or a path relative
    to ``path``'s folder."""
    if not isinstance(base, str) or not base.strip():
        raise ValueError(f"{path}: '{BASE_KEY}' must be a preset name or a YAML path relative to "
                         f"{path.parent}, got {base!r}")
    try:
        if _is_preset_name(base):
            return _find_preset(base, kind)
        found = path.parent / Path(base).expanduser()
        if not found.is_file():
            raise ValueError(f"{found} does not exist")
        return found
    except ValueError as err:
        raise ValueError(f"{path}: {BASE_KEY} {base!r}: {err}") from None


def _load_file(cls: type, path: str | Path, kind: str, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The checked mapping of ``cls``'s keys in YAML file ``path``, merged over its ``base``
    chain (no ``base`` key left); ``chain`` holds the files that named it as their base.
    Errors name the file that holds the problem."""
    path = Path(path).resolve()
    if path in chain:
        names = " -> ".join(str(p) for p in (*chain, path))
        raise ValueError(f"{chain[0]}: the '{BASE_KEY}' chain is a cycle ({names}): remove one of "
                         f"these '{BASE_KEY}' keys")
    data = load_yaml(path)
    has_base, base = BASE_KEY in data, data.pop(BASE_KEY, None)
    try:
        own = _checked(cls, data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if not has_base:
        return own
    return merge(_load_file(cls, _base_path(base, path, kind), kind, (*chain, path)), own)


def load_config(cls: type[T], source: str | Path | Mapping[str, Any] | None = None,
                overrides: Sequence[str] = (), kind: str = "") -> T:
    """Load ``cls`` from a preset name, a YAML path (with its ``base`` chain) or a mapping
    (``None``: the defaults), apply ``key=value`` overrides, build it once and validate it."""
    if source is None:
        data = {}
    elif isinstance(source, Mapping):
        data = _checked(cls, source)
    else:
        data = _load_file(cls, resolve_config(source, kind), kind)
    return _finish(cls, data, overrides)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg``'s resolved values (every key, no ``base``) as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
