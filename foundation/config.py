"""Typed configs: YAML files loaded into dataclasses, overridable with ``key.sub=value``.

A config file is the record of a run: every run writes back the resolved config it used
(``config_to_dict``), and unknown keys or wrong types are errors that name the key and the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the source."""


def resolve_config_path(path: str | Path) -> Path:
    """Finds a config file as given, or relative to the project's ``configs/`` folder."""
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (CONFIG_ROOT / p, CONFIG_ROOT.parent / p):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {path} (looked here and in {CONFIG_ROOT})")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML mapping, with an error naming the file when it is not one."""
    p = resolve_config_path(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


class Replace(dict):
    """A mapping given whole on the command line (``key={a: 1}``): it replaces the value, never merges."""


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turns ``["a.b=1", "c=[1, 2]"]`` into a nested dict; values are parsed as YAML scalars/lists.

    A dotted key merges into its section (``backbone.timm_kwargs.depth=2``); a mapping value replaces
    the whole entry (``backbone.head_offsets={1: 1, 0: 11}``).
    """
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. model.bottleneck=192)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts: list[Any] = [int(p) if p.lstrip("+-").isdigit() else p for p in key.split(".")]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is both a value and a section")
        node[parts[-1]] = Replace(value) if isinstance(value, dict) else value
    return nested


# Keys that must agree across a command's configs (the dataset's and the model's frame count): a bare one is
# set in every config that has it, so ``num_frames=16`` means the same on every command.
SHARED_KEYS = ("num_frames",)


def route_overrides(
    overrides: Sequence[str], sections: Mapping[str, type], shared: Sequence[str] = SHARED_KEYS
) -> dict[str, list[str]]:
    """Sends each ``key=value`` to the config it names: ``{section: [prefix-free overrides]}``.

    ``sections`` maps a prefix (``data``, ``model``, ``train``) to the config dataclass it routes to. A
    prefixed key (``model.bottleneck=8``) goes to its section; a bare key goes to the one section whose
    dataclass has that top-level field (or to all that have it, for ``shared`` keys). An ambiguous or
    unknown bare key, or a prefix the command lacks, is a ``ConfigError`` naming it and the prefixes.
    """
    routed: dict[str, list[str]] = {name: [] for name in sections}
    fields = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in sections.items()}
    prefixes = ", ".join(f"{name}." for name in sections)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. model.bottleneck=192)")
        key, value = item.split("=", 1)
        key = key.strip()
        head, dot, rest = key.partition(".")
        if dot and rest and head in sections:
            routed[head].append(f"{rest}={value}")
            continue
        owners = [name for name in sections if head in fields[name]]
        if len(owners) == 1 or (owners and head in shared):
            for name in owners:
                routed[name].append(f"{key}={value}")
            continue
        if owners:
            choices = " or ".join(f"{name}.{key}={value}" for name in owners)
            raise ConfigError(
                f"override {item!r}: key '{head}' is in the {' and '.join(owners)} configs; write {choices}"
            )
        known = [f"{name}.{f}" for name in sections for f in sorted(fields[name])]
        close = difflib.get_close_matches(head, [k.split(".", 1)[1] for k in known], n=1)
        hint = f"; did you mean {next(k for k in known if k.endswith('.' + close[0]))}?" if close else ""
        raise ConfigError(
            f"override {item!r}: no config of this command has the key '{head}' (prefixes: {prefixes}){hint}"
        )
    return routed


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Returns ``base`` with ``update`` merged in recursively (update wins)."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and not isinstance(v, Replace) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def merge_into(cls: type, base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``deep_merge(base, update)`` for a config of class ``cls``, where an ``update`` that changes the
    ``type`` of a tagged section (e.g. ``heads.type=transformer`` over an LSTM file) first drops the base
    keys the new type does not have: they described the old type, not an error of the user's."""
    hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
    base = dict(base)
    for name, value in update.items():
        tp, old = hints.get(name), base.get(name)
        if tp is None or not isinstance(value, Mapping) or not isinstance(old, Mapping):
            continue
        if isinstance(value, Replace):
            continue
        args = typing.get_args(tp)
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            new_cls = _tagged_choice({**old, **value}, args, name, "<merge>")
            if new_cls is not None and value.get("type", old.get("type")) != old.get("type"):
                known = {f.name for f in dataclasses.fields(new_cls)}
                old = {k: v for k, v in old.items() if k in known}
            base[name] = merge_into(new_cls, old, value) if new_cls is not None else old
        elif dataclasses.is_dataclass(tp):
            base[name] = merge_into(tp, old, value)
    return deep_merge(base, update)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Checks ``value`` against the annotation ``tp`` (ints are accepted as floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        tagged = _tagged_choice(value, args, key, source)
        if tagged is not None:
            return _build(tagged, value, source, prefix=f"{key}.")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{source}: key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{source}: key '{key}': expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: key '{key}': expected a section (mapping), got {value!r}")
        return _build(tp, value, source, prefix=f"{key}.")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: key '{key}': expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{source}: key '{key}': expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: key '{key}': expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {
            _coerce(k, kt, f"{key}.{k}", source): _coerce(v, vt, f"{key}.{k}", source)
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{source}: key '{key}': unsupported annotation {tp!r}")
    raise ConfigError(f"{source}: key '{key}': expected {_type_name(tp)}, got {value!r}")


def _tag_of(cls: Any) -> Any:
    """The ``type`` literal of a tagged config dataclass (its default), or None for other types."""
    if not dataclasses.is_dataclass(cls):
        return None
    field = next((f for f in dataclasses.fields(cls) if f.name == "type"), None)
    return None if field is None else field.default


def _tagged_choice(value: Any, args: tuple[Any, ...], key: str, source: str) -> type | None:
    """For a union of dataclasses told apart by their ``type`` field: the class ``value['type']`` names.

    The first class is the default when ``type`` is absent; None when the union is not of that kind.
    """
    classes = [a for a in args if a is not type(None)]
    tags = [_tag_of(c) for c in classes]
    if not classes or None in tags or not isinstance(value, Mapping):
        return None
    tag = value.get("type", tags[0])
    if tag not in tags:
        raise ConfigError(f"{source}: key '{key}.type': expected one of {tags}, got {tag!r}")
    return classes[tags.index(tag)]


def _build(cls: type[T], data: Mapping[str, Any], source: str, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}' (known keys in '{prefix or 'top level'}': "
            f"{', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{prefix}{name}", source)
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{source}: section '{prefix or 'top level'}': {e}") from e
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from e
    return obj


def build_config(cls: type[T], data: Mapping[str, Any], source: str = "<config>") -> T:
    """Builds a dataclass config from a mapping, checking every key and type."""
    return _build(cls, data, source)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Loads ``path`` (YAML) into ``cls``, then applies ``key.sub=value`` overrides."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        data = read_yaml(path)
        source = str(resolve_config_path(path))
    cfg = _build(cls, data, source)
    if overrides:
        merged = merge_into(cls, config_to_dict(cfg), parse_overrides(overrides))
        cfg = _build(cls, merged, f"{source} (with overrides {' '.join(overrides)})")
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain YAML-able data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def dump_config(cfg: Any, path: str | Path) -> None:
    """Writes the resolved config as YAML (atomically: never half-written)."""
    from foundation.atomic import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
