"""Build a block policy from a spec string: ``name`` or ``name:key=val,key=val``.

    build_policy("taylorseer:interval=4,order=2")
    build_policy("ras:ratio=0.25,full_every=4,cfg=split")
    build_policy("cache:gate=fbcache,reuse=taylor,threshold=0.1,order=1")

Values are parsed as int, then float, then kept as text; every policy takes
``cfg=batched|split``. Unknown names or keys and bad values raise ``ConfigError``
naming what is allowed.

``POLICIES`` holds the named policies; the caches among them are named combinations of
a gate and a reuse (``flowdit.accel.cache``). ``cache:gate=NAME,reuse=NAME,...`` (the
name in ``GENERIC``) builds any other pairing from ``gates.GATES`` and ``reuses.REUSES``.
"""

from __future__ import annotations

import inspect
from typing import Any

from flowdit.errors import ConfigError

from .base import BlockPolicyBase, FullCompute
from .cache import Cache
from .ddt_share import DDTShare
from .delta_dit import DeltaDiT
from .first_block_cache import FirstBlockCache, TeaCache
from .fora import FORA
from .gated_taylor import GatedTaylor
from .grouped_attention import GroupedAttention
from .ras import RAS
from .taylorseer import TaylorSeer
from .gates import GATES
from .reuses import REUSES
from .tome import ToMe

__all__ = ["POLICIES", "GENERIC", "build_policy", "parse_spec", "policy_keys"]

POLICIES: dict[str, type[BlockPolicyBase]] = {
    cls.name: cls
    for cls in (FullCompute, FORA, DeltaDiT, TaylorSeer, GatedTaylor, FirstBlockCache, TeaCache, RAS, ToMe,
                GroupedAttention, DDTShare)
}


GENERIC = {Cache.name: Cache}
"""Spec names beside ``POLICIES``: ``cache``, any gate with any reuse."""


def policy_keys(name: str) -> list[str]:
    """The parameter names a policy accepts (for ``cache``: those of every gate and reuse;
    a given pairing takes only its own, see ``cache.cache_keys``)."""
    if name in GENERIC:
        keys = ["gate", "reuse"]
        for part in (*GATES.values(), *REUSES.values()):
            keys += [k for k in part.spec if k not in keys]
        return keys + ["cfg"]
    return [p for p in inspect.signature(POLICIES[name].__init__).parameters if p != "self"]


def _value(text: str) -> Any:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"name:key=val,key=val"`` into the name and a dict of parsed values."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"accel spec must be a non-empty string like 'taylorseer:interval=4', got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower().replace("-", "_")
    if name not in POLICIES and name not in GENERIC:
        raise ConfigError(f"unknown accel policy {name!r}; valid: {', '.join([*POLICIES, *GENERIC])}")
    kwargs: dict[str, Any] = {}
    valid = policy_keys(name)
    for item in (p for p in rest.split(",") if p.strip()):
        key, eq, val = item.partition("=")
        key = key.strip()
        if not eq or not key or not val.strip():
            raise ConfigError(f"accel spec {spec!r}: expected key=value, got {item!r}")
        if key not in valid:
            raise ConfigError(f"accel policy {name!r} has no parameter {key!r}; valid: {', '.join(valid)}")
        if key in kwargs:
            raise ConfigError(f"accel spec {spec!r}: {key!r} given twice")
        kwargs[key] = _value(val.strip())
    return name, kwargs


def build_policy(spec: str | BlockPolicyBase | None) -> BlockPolicyBase | None:
    """A policy instance from a spec string (``None``/``""`` -> ``None``; an instance passes through)."""
    if spec is None or isinstance(spec, BlockPolicyBase):
        return spec
    if isinstance(spec, str) and not spec.strip():
        return None
    name, kwargs = parse_spec(spec)
    try:
        return (POLICIES.get(name) or GENERIC[name])(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"accel spec {spec!r}: {exc}") from None
