"""Plugin discovery through Python entry points, one group per interface.

Built-in plugins are registered exactly like third-party ones (in ``pyproject.toml``).
Entry points are read lazily on first use and cached; :func:`reset_registry` clears the cache
(for tests, or after installing a plugin package into a running interpreter).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

GROUPS: dict[str, str] = {
    "backbones": "metarec.backbones",
    "algorithms": "metarec.algorithms",
    "policies": "metarec.policies",
    "datasets": "metarec.datasets",
}


SINGULAR = {"backbones": "backbone", "algorithms": "algorithm", "policies": "policy",
            "datasets": "dataset"}


class PluginError(LookupError):
    """A plugin could not be found, loaded or configured."""


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin: its alias, target ``module:attr`` and providing distribution."""

    kind: str
    alias: str
    target: str
    distribution: str
    version: str


def _group(kind: str) -> str:
    if kind not in GROUPS:
        raise PluginError(f"unknown plugin kind {kind!r}; kinds are {sorted(GROUPS)}")
    return GROUPS[kind]


@functools.cache
def _entry_points(kind: str) -> dict[str, list[EntryPoint]]:
    found: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=_group(kind)):
        found.setdefault(ep.name, [])
        if all(e.value != ep.value for e in found[ep.name]):
            found[ep.name].append(ep)
    return found


def reset_registry() -> None:
    """Forget discovered entry points and loaded plugins (they are re-read on next use)."""
    _entry_points.cache_clear()
    _load.cache_clear()


def _dist(ep: EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    return (dist.name, dist.version) if dist is not None else ("<unknown>", "?")


def available(kind: str) -> list[PluginInfo]:
    """Every plugin registered for ``kind``, sorted by alias (nothing is imported)."""
    infos = []
    for alias, eps in sorted(_entry_points(kind).items()):
        for ep in eps:
            infos.append(PluginInfo(kind, alias, ep.value, *_dist(ep)))
    return infos


@functools.cache
def _load(kind: str, name: str) -> Any:
    eps = _entry_points(kind).get(name)
    if eps:
        if len(eps) > 1:
            owners = ", ".join(f"{ep.value} ({_dist(ep)[0]})" for ep in eps)
            raise PluginError(f"{SINGULAR[kind]} alias {name!r} is registered more than once: {owners}")
        ep = eps[0]
        try:
            return ep.load()
        except Exception as err:  # noqa: BLE001 - any import failure is reported with its source
            dist, version = _dist(ep)
            raise PluginError(
                f"{SINGULAR[kind]} plugin {name!r} ({ep.value}) from distribution {dist} {version} "
                f"failed to load: {type(err).__name__}: {err}") from err
    if "." in name or ":" in name:
        module, _, attr = name.replace(":", ".").rpartition(".")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise PluginError(f"{SINGULAR[kind]} class path {name!r} cannot be imported: {err}") from err
    known = ", ".join(sorted(_entry_points(kind))) or "(none registered)"
    raise PluginError(f"unknown {SINGULAR[kind]} {name!r}; registered {kind}: {known}")


def resolve(kind: str, name: str | type) -> Any:
    """The plugin class for an alias (``"maml"``) or class path (``"pkg.mod.Class"``)."""
    if isinstance(name, type):
        return name
    return _load(kind, str(name))


def build(kind: str, name: str | type, args: dict[str, Any] | None = None, **context: Any) -> Any:
    """Instantiate a plugin with recipe ``args`` plus framework-provided ``context`` arguments.

    Unknown argument names are rejected with the list the plugin accepts; ``context`` entries
    the plugin does not declare are not passed.
    """
    cls = resolve(kind, name)
    args = dict(args or {})
    params = inspect.signature(cls).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = [p for p in params if p not in context and params[p].kind not in
                (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
    unknown = [a for a in args if a not in params and not takes_kwargs]
    if unknown:
        raise PluginError(f"{SINGULAR[kind]} {name!r} got unknown argument(s) {unknown}; "
                          f"it accepts {accepted}")
    context = {k: v for k, v in context.items() if k in params or takes_kwargs}
    try:
        return cls(**args, **context)
    except (TypeError, ValueError) as err:
        raise PluginError(f"{SINGULAR[kind]} {name!r}: {err}") from err
