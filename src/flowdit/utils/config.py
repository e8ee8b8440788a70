"""Typed configuration: nested ``@dataclass`` trees built from YAML plus ``key=value`` overrides.

The module knows nothing about any particular config; it works for any dataclass tree.
Typical use::

    cfg = load_config(TrainConfig, "configs/digits.yaml", ["train.lr=1e-4", "model.depth=4"])
    save_config(cfg, run_dir / "config.yaml")

Values are checked against the field annotations (``int``, ``float``, ``bool``, ``str``,
``Optional[X]``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``, ``Literal[...]``,
nested dataclasses, ``pathlib.Path``, ``Any``). A ``float`` field takes finite values
only: ``nan`` and ``inf`` are refused with the key's name (no setting of a training run
means anything at infinity, and a NaN would pass every ``<`` / ``>`` check unnoticed).
After building, every dataclass in the tree that defines ``validate(self)`` is validated,
children before parents, so a parent may rely on its children being valid.

A field's one-line help is its ``metadata["help"]`` (``field(default=..., metadata={"help": ...})``);
:func:`describe_keys` lists every key with its type, default and help.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import pathlib
import types
import typing
from typing import Any, Literal, Union

import yaml

from flowdit.errors import ConfigError
from flowdit.utils.files import atomic_write_text

__all__ = [
    "apply_overrides",
    "config_diff",
    "describe_keys",
    "from_dict",
    "load_config",
    "merge_dicts",
    "parse_override",
    "read_yaml",
    "save_config",
    "to_dict",
    "validate_config",
]

T = typing.TypeVar("T")

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


# --------------------------------------------------------------------------- building


def from_dict(cls: type[T], data: dict | None, path: str = "") -> T:
    """Build the dataclass ``cls`` from a plain (nested) dict, then validate it.

    Unknown keys, missing required keys and values of the wrong type raise
    :class:`ConfigError` naming the full dotted key (prefixed by ``path``). Values are
    coerced where that is unambiguous: ``"1e-4"`` or ``3`` for a ``float`` field,
    ``"true"`` for a ``bool``, a list for a ``tuple``. Each dataclass's ``validate()``
    (if any) is called once the whole tree is built, children first.
    """
    cfg = _build_dataclass(cls, data, path)
    validate_config(cfg, path)
    return cfg


def validate_config(cfg: Any, path: str = "") -> None:
    """Call ``validate()`` on every dataclass in the tree ``cfg``, children before parents.

    A :class:`ConfigError` raised by a nested ``validate()`` is prefixed with the dotted
    path of that dataclass, unless its message already names it.
    """
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        return
    for f in dataclasses.fields(cfg):
        for key, child in _children(getattr(cfg, f.name), _join(path, f.name)):
            validate_config(child, key)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as e:
            msg = str(e)
            if path and not msg.startswith((path + ".", path + ":", path + " ")):
                raise ConfigError(f"{path}: {msg}") from None
            raise


def _children(value: Any, key: str):
    """Yield ``(dotted_key, dataclass)`` for dataclasses held directly or in containers."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        yield key, value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _children(item, f"{key}[{i}]")
    elif isinstance(value, dict):
        for k, item in value.items():
            yield from _children(item, _join(key, str(k)))


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict[str, Any]:
    # get_type_hints resolves string annotations (``from __future__ import annotations``)
    # in the class's module; classes defined inside a function cannot be resolved.
    try:
        return typing.get_type_hints(cls)
    except NameError as e:
        raise TypeError(
            f"cannot resolve the annotations of {cls.__qualname__} ({e}); "
            "define config dataclasses at module level"
        ) from None


def _build_dataclass(cls: type[T], data: Any, path: str) -> T:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path or '<root>'}: expected a mapping for {cls.__name__}, got {_show(data)}"
        )
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = str(unknown[0])
        hint = difflib.get_close_matches(key, list(fields), n=1)
        did_you_mean = f" (did you mean '{_join(path, hint[0])}'?)" if hint else ""
        where = f"'{path}'" if path else "top level"
        raise ConfigError(
            f"unknown key '{_join(path, key)}'{did_you_mean}; "
            f"valid keys at {where}: {', '.join(fields)}"
        )
    kwargs = {}
    for name, f in fields.items():
        key = _join(path, name)
        if name in data:
            kwargs[name] = _coerce(hints.get(name, Any), data[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it, converted if needed."""
    if tp is Any or tp is object:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        return _build_dataclass(tp, value, key)

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        return _coerce_union(tp, args, value, key)
    if origin is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):
                return choice
        raise ConfigError(
            f"{key}: expected one of {', '.join(repr(a) for a in args)}, got {_show(value)}"
        )
    if origin in (list, tuple) or tp in (list, tuple):
        return _coerce_sequence(tp, origin or tp, args, value, key)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_show(value)}")
        if not args:
            return dict(value)
        kt, vt = args
        return {
            _coerce(kt, k, _join(key, str(k))): _coerce(vt, v, _join(key, str(k)))
            for k, v in value.items()
        }
    if tp is bool:
        return _coerce_bool(value, key)
    if tp is int:
        return _coerce_int(value, key)
    if tp is float:
        return _coerce_float(value, key)
    if tp is str:
        # YAML turns an unquoted `name=2024` into an int; a number is still a fine name.
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected str, got {_show(value)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {_show(value)}")
    if isinstance(tp, type) and issubclass(tp, pathlib.PurePath):
        if isinstance(value, (str, pathlib.PurePath)):
            return tp(value)
        raise ConfigError(f"{key}: expected a path, got {_show(value)}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{key}: expected {tp.__name__}, got {_show(value)}")
    raise TypeError(f"{key}: unsupported annotation {tp!r}")


def _coerce_union(tp: Any, args: tuple, value: Any, key: str) -> Any:
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got null")
    options = [a for a in args if a is not type(None)]
    # An exact type match wins, so that `int | str` keeps 3 as an int.
    for a in options:
        if isinstance(a, type) and type(value) is a:
            return value
    errors = []
    for a in options:
        try:
            return _coerce(a, value, key)
        except ConfigError as e:
            errors.append(e)
    if len(options) == 1:
        raise errors[0]
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")


def _coerce_sequence(tp: Any, origin: type, args: tuple, value: Any, key: str) -> Any:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")
    if not args:
        items = list(value)
    elif origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            raise ConfigError(
                f"{key}: expected {len(args)} items, got {len(value)} ({_show(value)})"
            )
        items = [_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
    else:
        items = [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _coerce_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    raise ConfigError(f"{key}: expected bool, got {_show(value)}")


def _coerce_int(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
        try:
            f = float(value)
        except ValueError:
            f = None
        # `steps=1e5` reaches us as the string "1e5": accept it when it is a whole number.
        if f is not None and f.is_integer():
            return int(f)
    raise ConfigError(f"{key}: expected int, got {_show(value)}")


def _coerce_float(value: Any, key: str) -> float:
    out = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out = float(value)
    elif isinstance(value, str):
        # YAML 1.1 reads `1e-4` (no dot) as a string; float() reads it as intended.
        try:
            out = float(value.strip())
        except ValueError:
            pass
    if out is None:
        raise ConfigError(f"{key}: expected float, got {_show(value)}")
    if not math.isfinite(out):
        raise ConfigError(f"{key}: expected a finite number, got {_show(value)}")
    return out


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --------------------------------------------------------------------------- overrides


def parse_override(s: str) -> tuple[str, Any]:
    """Split ``"key.sub=value"`` into ``("key.sub", value)``, the value parsed as YAML.

    ``yaml.safe_load`` makes ``true``, ``3``, ``0.5``, ``[1, 2]`` and ``null`` typed
    values; anything else stays a string (``1e-4`` too: :func:`from_dict` coerces it).
    An empty value (``key=``) is ``None``.
    """
    key, sep, raw = s.partition("=")
    key = key.strip()
    if not sep:
        raise ConfigError(f"override {s!r}: expected key=value")
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {s!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override {s!r}: value is not valid YAML ({problem})") from None
    return key, value


def apply_overrides(data: dict | None, overrides: list[str] | None) -> dict:
    """Return a copy of ``data`` with each ``key.sub=value`` override set, in order.

    Missing intermediate mappings are created; setting below a key that holds a
    non-mapping value raises :class:`ConfigError`. Later overrides win.
    """
    out = copy.deepcopy(data) if data else {}
    for s in overrides or ():
        key, value = parse_override(s)
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                prefix = ".".join(parts[: i + 1])
                raise ConfigError(
                    f"override {s!r}: '{prefix}' is {_show(child)}, not a mapping"
                )
            node = child
        node[parts[-1]] = value
    return out


# --------------------------------------------------------------------------- files


def load_config(
    cls: type[T], yaml_path: str | os.PathLike | None, overrides: list[str] | None = None,
    base: dict | None = None,
) -> T:
    """Read ``yaml_path`` (or start from ``{}`` when it is ``None``), apply the
    ``key=value`` overrides, and build and validate ``cls``.

    ``base``: a plain dict (e.g. a saved, resolved config) that the file's keys and then
    the overrides are laid over; keys the file does not name keep ``base``'s value.

    A missing file, a YAML syntax error, or a top level that is not a mapping raises
    :class:`ConfigError` naming the file.
    """
    data = read_yaml(yaml_path)
    if base is not None:
        data = merge_dicts(base, data)
    return from_dict(cls, apply_overrides(data, overrides))


def merge_dicts(base: dict, top: dict) -> dict:
    """A copy of ``base`` with ``top`` laid over it: nested mappings are merged key by
    key, any other value of ``top`` replaces ``base``'s."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_yaml(yaml_path: str | os.PathLike | None) -> dict:
    """The mapping in a YAML config file (``{}`` for ``None`` or an empty file); a missing
    file, a syntax error or a top level that is not a mapping raises :class:`ConfigError`."""
    data: Any = {}
    if yaml_path is not None:
        p = pathlib.Path(yaml_path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found") from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot read config file ({e.strerror or e})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML ({_yaml_problem(e)})") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"{p}: top level must be a mapping, got {type(data).__name__}"
            )
    return data


def _yaml_problem(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return problem or str(e).splitlines()[0]


def to_dict(cfg: Any) -> Any:
    """Convert a dataclass tree to plain YAML-serialisable data.

    Tuples become lists and paths strings, so that ``from_dict(type(cfg), to_dict(cfg))``
    gives back an equal config. Fields with ``init=False`` are left out (they are derived).
    """
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, pathlib.PurePath):
        return str(cfg)
    return cfg


def save_config(cfg: Any, path: str | os.PathLike, header: str = "") -> pathlib.Path:
    """Write ``to_dict(cfg)`` as YAML to ``path`` atomically (``flowdit.utils.files.atomic_write``, synced).

    ``header``: lines written first as YAML comments (``# ...``). Parent directories are
    created. Returns the path written.
    """
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
    if header:
        text = "".join(f"# {line}\n" for line in header.splitlines()) + text
    # Synced: a run's config is what a resume after a power cut starts from.
    atomic_write_text(p, text, fsync=True)
    return p


# --------------------------------------------------------------------------- introspection


def describe_keys(cls: type, path: str = "") -> list[dict[str, Any]]:
    """Every leaf key of the dataclass tree ``cls``, in declaration order, as
    ``{"key": dotted name, "type": annotation as text, "default": value, "help": text}``.

    The help is the field's ``metadata["help"]`` (``""`` when it has none).
    """
    rows = []
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = _join(path, f.name)
        tp = hints.get(f.name, Any)
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            rows.extend(describe_keys(tp, key))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        rows.append({"key": key, "type": _type_name(tp).replace("NoneType", "None"),
                     "default": to_dict(default), "help": f.metadata.get("help", "")})
    return rows


def config_diff(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every leaf where two plain config dicts
    (as :func:`to_dict` writes them) differ; a key present on one side only counts as a
    difference against ``None``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in list(old) + [k for k in new if k not in old]:
            out.extend(config_diff(old.get(k), new.get(k), _join(path, str(k))))
        return out
    return [] if old == new else [(path, old, new)]
