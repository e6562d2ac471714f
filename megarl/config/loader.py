"""YAML recipes -> frozen dataclass configs, with dotted CLI overrides and strict validation.

    cfg = load_config(TrainConfig, "recipe.yaml", ["algorithm.advantage.gamma=0.99"])
    dump_config(cfg, run_dir / "config.yaml")

Rules (docs/config.md has the full list):
- every key must be a field of the dataclass it lands in; an unknown key is a ValueError naming
  the full dotted key, the allowed keys and the closest match;
- values are checked against the field annotations (bool, int, float, str, Literal, Optional /
  unions, tuple, list, dict, nested dataclasses, Enum) and the error names the key, the expected
  type and the value it got;
- YAML is read with YAML 1.2 core-schema scalars: only true/false are booleans ("on", "off",
  "yes", "no" stay strings) and 1e-6 is a float, not the string PyYAML's 1.1 rules give;
- a key given twice in one mapping is an error (PyYAML silently keeps the last one);
- ValueErrors raised by a config's ``__post_init__`` are re-raised with the dotted key prefixed
  (the field's key when the message starts with a field name, as in "gamma must be in [0, 1]").

Nothing here knows about trainers: any frozen dataclass tree works.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")

_BOOL_TAG = "tag:yaml.org,2002:bool"
_FLOAT_TAG = "tag:yaml.org,2002:float"


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core booleans/floats and duplicate-key detection."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key].line + 1})", mark
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# PyYAML's float pattern needs a dot, so "1e-6" would load as a string.
_Loader.add_implicit_resolver(
    _FLOAT_TAG, re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parses YAML text with the rules above; a syntax error becomes a ValueError naming ``source``."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise ValueError(f"{source}: invalid YAML: {exc}") from None


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """``"a.b.c=value"`` -> (("a", "b", "c"), value), the value parsed as a YAML scalar/flow node.

    ``x=`` sets null; ``x="3"`` keeps the string "3"; ``x=[1, 2]`` gives a list.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override {text!r}: expected KEY=VALUE with a dotted KEY such as algorithm.gamma=0.99")
    parts = tuple(key.split("."))
    if any(not p for p in parts):
        raise ValueError(f"override {text!r}: empty component in the dotted key {key!r}")
    return parts, parse_yaml(raw, source=f"override {text!r}")


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Returns a deep copy of ``data`` with each ``a.b.c=value`` override set (missing levels created)."""
    out = copy.deepcopy(dict(data))
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ValueError(
                    f"override {text!r}: config key '{where}' holds {child!r}, not a mapping, "
                    f"so '{'.'.join(parts)}' cannot be set"
                )
            node = child
        node[parts[-1]] = value
    return out


def load_config(
    cls: type[T],
    source: str | os.PathLike | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Builds and validates a ``cls`` instance from a YAML file, a mapping, or nothing (defaults).

    ``overrides`` are ``dotted.key=value`` strings applied on top of ``source`` before validation,
    so a mistyped override key fails exactly like a mistyped YAML key. Errors are ValueErrors that
    name the file (for a path source) and the full dotted key.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    origin = ""
    if source is None:
        data: Any = {}
    elif isinstance(source, Mapping):
        data = source
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        origin = f"{path}: "
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ValueError(f"config file {path} does not exist") from None
        except OSError as exc:
            raise ValueError(f"config file {path} cannot be read: {exc}") from None
        data = parse_yaml(text, source=str(path))
        if data is None:
            data = {}
    else:
        raise TypeError(f"load_config source must be a path, a mapping or None, got {type(source).__name__}")
    if not isinstance(data, Mapping):
        raise ValueError(f"{origin or 'config: '}the top level must be a mapping of keys, got {_show(data)}")
    data = apply_overrides(data, overrides)
    try:
        return _build(cls, data, "")
    except ValueError as exc:
        if origin:
            raise ValueError(f"{origin}{exc}") from None
        raise


def to_dict(cfg: Any) -> Any:
    """The plain-Python (YAML-safe) form of a config: dataclasses -> dicts, tuples -> lists, Enums -> values.

    ``load_config(type(cfg), to_dict(cfg)) == cfg`` for every config this module can build.
    """
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, enum.Enum):
        return cfg.value
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def config_to_yaml(cfg: Any) -> str:
    """The resolved config as YAML text (fields in declaration order)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def dump_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Writes the resolved config as YAML next to a run: to a temp file, then renamed over ``path``."""
    from megarl.fileio import atomic_write_text

    return atomic_write_text(path, config_to_yaml(cfg))


# ----------------------------------------------------------------------------------------------
# validation


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({'null' if value is None else type(value).__name__})"


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "any value"
    if tp is type(None):
        return "null"
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        if args == ((),) or not args:
            return "a list"
        return f"a list of {len(args)} items ({', '.join(_type_name(a) for a in args)})"
    if origin is list:
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return f"a mapping of str to {_type_name(args[1])}" if args else "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping for {tp.__name__}"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))


def _type_error(key: str, tp: Any, value: Any) -> ValueError:
    return ValueError(f"config key '{key}': expected {_type_name(tp)}, got {_show(value)}")


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _build(cls: type[T], data: Mapping[str, Any], prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if not isinstance(key, str):
            raise ValueError(f"config key {_join(prefix, repr(key))!r}: keys must be strings, got {_show(key)}")
        if key not in fields:
            where = f"under '{prefix}'" if prefix else "at the top level"
            raise ValueError(
                f"unknown config key '{_join(prefix, key)}'{_suggest(key, list(fields))}; "
                f"allowed keys {where}: {', '.join(fields)}"
            )
    kwargs = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"config key '{key}' is required ({_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except ValueError as exc:
        # A __post_init__ message that starts with a field name ("gamma must be ...") is about
        # that field; anything else is about the whole section.
        first = str(exc).split(" ", 1)[0]
        where = _join(prefix, first) if first in fields else (prefix or cls.__name__)
        raise ValueError(f"config key '{where}': {exc}") from None


def _is_scalar(tp: Any) -> bool:
    return tp in (bool, int, float, str) or get_origin(tp) is Literal or (
        isinstance(tp, type) and issubclass(tp, enum.Enum)
    )


def _convert(tp: Any, value: Any, key: str) -> Any:
    if tp is Any:
        return value
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _type_error(key, tp, value)
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and not _is_scalar(options[0]):
            # Containers and dataclasses report the inner key that failed.
            return _convert(options[0], value, key)
        for option in options:
            try:
                return _convert(option, value, key)
            except ValueError:
                continue
        raise _type_error(key, tp, value)
    if value is None:
        raise _type_error(key, tp, value)
    if origin is Literal:
        # type() equality keeps True from matching a Literal[1] and 1 from matching 1.0.
        if any(value == a and type(value) is type(a) for a in args):
            return value
        hint = _suggest(value, [a for a in args if isinstance(a, str)]) if isinstance(value, str) else ""
        raise ValueError(f"config key '{key}': expected {_type_name(tp)}, got {_show(value)}{hint}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return _build(tp, value, key)
        raise _type_error(key, tp, value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _type_error(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, tp, value)
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value)
        if not args or args == ((),):
            if args == ((),) and value:
                raise _type_error(key, tp, value)
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _type_error(key, tp, value)
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value)
        if not args:
            return list(value)
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _type_error(key, tp, value)
        if not args:
            return dict(value)
        out = {}
        for k, v in value.items():
            k = _convert(args[0], k, f"{key} (a key)")
            out[k] = _convert(args[1], v, _join(key, str(k)))
        return out
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        for member in tp:
            if member.value == value and type(member.value) is type(value):
                return member
        raise _type_error(key, tp, value)
    raise TypeError(f"config key '{key}': annotation {tp!r} is not supported by megarl.config")
