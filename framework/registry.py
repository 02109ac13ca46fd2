"""Plugin discovery through Python entry points, one group per interface.

Built-in plugins are registered exactly like third-party ones (in ``pyproject.toml``).
Entry points are read lazily on first use and cached; :func:`reset_registry` clears the cache
(for tests, or after installing a plugin package into a running interpreter).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import operator
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Literal, Union, get_args, get_origin

GROUPS: dict[str, str] = {
    "backbones": "metarec.backbones",
    "algorithms": "metarec.algorithms",
    "policies": "metarec.policies",
    "datasets": "metarec.datasets",
}


SINGULAR = {"backbones": "backbone", "algorithms": "algorithm", "policies": "policy",
            "datasets": "dataset"}


# Arguments the framework passes to plugins of a kind itself (see MetaLearner): never recipe keys.
CONTEXT_ARGS: dict[str, tuple[str, ...]] = {"backbones": ("schema",)}


class PluginError(LookupError):
    """A plugin could not be found, loaded or configured."""


class PluginArgumentError(PluginError, ValueError):
    """A recipe gives a plugin an unknown, missing, mistyped or out-of-range argument."""


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


def describe(kind: str, name: str | type) -> str:
    """``algorithm 'maml' (metarec_plugins.algorithms.maml:MAML)``: how errors name a plugin."""
    cls = resolve(kind, name)
    if isinstance(name, type):
        return f"{SINGULAR[kind]} {name.__name__!r} ({name.__module__}:{name.__qualname__})"
    eps = _entry_points(kind).get(str(name))
    target = eps[0].value if eps else f"{cls.__module__}:{cls.__qualname__}"
    return f"{SINGULAR[kind]} {str(name)!r} ({target})"


def validate_args(kind: str, name: str | type, args: Mapping[str, Any] | None,
                  key: str | None = None) -> None:
    """Check recipe ``args`` against the signature of a plugin, without instantiating it.

    The plugin class is resolved (imported) but not built. Rejected, with one line per problem
    naming ``key.<argument>``, the plugin, the value and the rule: unknown argument names (unless
    the plugin takes ``**kwargs``; the accepted ones are listed), missing required arguments,
    arguments the framework provides itself (:data:`CONTEXT_ARGS`), values of the wrong type
    and values out of the range that a ``jsonargparse.typing`` restricted type in the signature
    declares (``inner_lr: PositiveFloat``, ``inner_steps: NonNegativeInt``, ...).

    Types are checked the way the CLI checks its own arguments (jsonargparse), and only where
    the plugin annotates them; a value is never changed. The constructors keep their own
    checks (for direct Python use, and for rules that span several arguments).

    Raises:
        PluginError: the plugin cannot be resolved.
        PluginArgumentError: the arguments are not valid (every problem is listed).
    """
    key = key or f"{SINGULAR.get(kind, kind)}_args"
    cls = resolve(kind, name)
    plugin = describe(kind, name)
    args = dict(args or {})
    params = dict(inspect.signature(cls).parameters)
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    context = set(CONTEXT_ARGS.get(kind, ()))
    named = {n: p for n, p in params.items() if n not in context and p.kind not in
             (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}
    hints = _hints(cls)
    problems = []
    for arg in args:
        if arg in context:
            problems.append(f"{key}.{arg}: {plugin} gets {arg!r} from the framework; remove it "
                            "from the recipe")
        elif arg not in named and not takes_kwargs:
            problems.append(f"{key}.{arg}: {plugin} has no argument {arg!r}; it accepts "
                            f"{', '.join(named) or 'no arguments'}")
    for arg, param in named.items():
        if param.default is inspect.Parameter.empty and arg not in args:
            problems.append(f"{key}.{arg}: {plugin} requires {arg!r} and the recipe does not "
                            "set it")
    for arg, value in args.items():
        if arg in named and arg in hints:
            # `x: int = None` admits None too (an implicit Optional).
            reason = None if value is None and named[arg].default is None \
                else _check_value(hints[arg], value)
            if reason:
                problems.append(f"{key}.{arg} = {value!r} is invalid for {plugin}: {reason}")
    if problems:
        raise PluginArgumentError("\n".join(problems))


def _hints(cls: type) -> dict[str, Any]:
    """The evaluated parameter annotations of ``cls`` (none where they cannot be evaluated)."""
    try:
        params = inspect.signature(cls, eval_str=True).parameters
    except Exception:  # noqa: BLE001 - e.g. a name imported under TYPE_CHECKING only
        return {}
    return {n: p.annotation for n, p in params.items() if p.annotation is not p.empty}


_SYMBOLS = {operator.gt: ">", operator.ge: ">=", operator.lt: "<", operator.le: "<=",
            operator.eq: "==", operator.ne: "!="}


def _restriction(hint: Any) -> str | None:
    """``int >= 0`` for a jsonargparse restricted number type, else None."""
    restrictions = getattr(hint, "_restrictions", None)
    if not isinstance(hint, type) or restrictions is None:
        return None
    join = f" {getattr(hint, '_join', 'and')} "
    base = getattr(hint, "_type", float).__name__
    return base + " " + join.join(f"{_SYMBOLS.get(op, op)} {ref}" for op, ref in restrictions)


def _relax(hint: Any) -> Any:
    """``hint`` with every restricted number type replaced by its base type."""
    if _restriction(hint) is not None:
        return hint._type
    origin, inner = get_origin(hint), get_args(hint)
    if not inner or origin is Literal:
        return hint
    relaxed = tuple(_relax(a) for a in inner)
    if relaxed == inner:
        return hint
    if origin in (Union, types.UnionType):
        return Union[relaxed]  # noqa: UP007 - built from a tuple
    try:
        return origin[relaxed]
    except TypeError:
        return hint


def _admits_str(hint: Any) -> bool:
    if hint in (str, Any):
        return True
    return get_origin(hint) in (Union, types.UnionType) and any(map(_admits_str, get_args(hint)))


def _admits_none(hint: Any) -> bool:
    if hint in (None, type(None), Any):
        return True
    return get_origin(hint) in (Union, types.UnionType) and any(map(_admits_none, get_args(hint)))


def _type_error(hint: Any, value: Any) -> str | None:
    """Why jsonargparse rejects ``value`` for ``hint`` (None: accepted, or not checkable)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    try:
        parser.add_argument("--value", type=hint)
    except Exception:  # noqa: BLE001 - a type jsonargparse cannot check: leave it to the plugin
        return None
    try:
        parsed = parser.parse_object({"value": value}).value
    except Exception as err:  # noqa: BLE001 - jsonargparse's ArgumentError
        return str(err) or type(err).__name__
    # jsonargparse would read "3" as 3, but the plugin would get the string: a type error.
    if isinstance(value, str) and not isinstance(parsed, str) and not _admits_str(hint):
        return "a string"
    return None


def _element_error(message: str) -> str:
    """`` (str expected, got 0)`` from jsonargparse's message about a container's content."""
    for line in message.splitlines():
        found = re.search(r"Expected (.+?)\.? Got value: (.*)$", line.strip())
        if found:
            expected = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", found.group(1))
            return f" ({expected.removeprefix('a ')} expected, got {found.group(2)})"
    return ""


def _type_name(hint: Any) -> str:
    """``int | None``, ``tuple[float, float]``: a type hint as a recipe writer reads it."""
    origin, inner = get_origin(hint), get_args(hint)
    if hint is type(None):
        return "None"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in inner)
    if isinstance(hint, type) and not inner:
        return hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "")


def _check_value(hint: Any, value: Any) -> str | None:
    """None if ``value`` satisfies ``hint``, else the rule it breaks, in words."""
    relaxed = _relax(hint)
    error = _type_error(relaxed, value)
    if value is None and not _admits_none(relaxed):
        error = "null"  # jsonargparse lets None through for any type
    if error is not None:
        got = ("null" if value is None else "a string" if isinstance(value, str)
               else type(value).__name__)
        detail = _element_error(error) if isinstance(value, (list, tuple, dict)) else ""
        return f"expected {_type_name(relaxed)}, got {got}{detail}"
    if relaxed is hint or _type_error(hint, value) is None:
        return None
    rules = [_restriction(h) for h in (hint, *get_args(hint)) if _restriction(h)]
    nullable = type(None) in get_args(hint)
    if len(rules) == 1:
        return f"must be {'an' if rules[0].startswith('int') else 'a'} {rules[0]}" + \
            (" (or null)" if nullable else "")
    return f"out of range for {_type_name(hint)}"


def _plain(value: Any) -> Any:
    """``value`` as plain YAML data (tuples as lists), or ``_NOT_PLAIN``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items) else items
    if isinstance(value, Mapping):
        items = {k: _plain(v) for k, v in value.items()}
        ok = all(isinstance(k, str) for k in items) and _NOT_PLAIN not in items.values()
        return items if ok else _NOT_PLAIN
    return _NOT_PLAIN


_NOT_PLAIN = object()


def _arguments(kind: str, cls: Any) -> dict[str, inspect.Parameter]:
    params = inspect.signature(cls).parameters
    context = set(CONTEXT_ARGS.get(kind, ()))
    return {n: p for n, p in params.items() if n not in context and p.kind not in
            (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}


def resolved_args(kind: str, name: str | type, args: Mapping[str, Any] | None) -> dict[str, Any]:
    """``args`` with every argument it leaves out set to the plugin's default, in signature
    order (arguments without a default, and defaults that are not plain data, are left out):
    the values the plugin is built with, as a recipe would write them."""
    cls = resolve(kind, name)
    args = dict(args or {})
    out: dict[str, Any] = {}
    for arg, param in _arguments(kind, cls).items():
        if arg in args:
            out[arg] = args.pop(arg)
        elif param.default is not inspect.Parameter.empty:
            default = _plain(param.default)
            if default is not _NOT_PLAIN:
                out[arg] = default
    out.update(args)  # **kwargs plugins: the rest as given
    return out


def plugin_help(kind: str, name: str | type) -> str:
    """What ``metarec plugins NAME`` prints: the plugin, its arguments (type, default, the
    range rule a restricted type declares) and its docstring."""
    cls = resolve(kind, name)
    hints = _hints(cls)
    eps = _entry_points(kind).get(str(name)) if not isinstance(name, type) else None
    where = f"{eps[0].value}, {' '.join(_dist(eps[0]))}" if eps else \
        f"{cls.__module__}:{cls.__qualname__}"
    key = {"backbones": "model.backbone_args", "algorithms": "model.algorithm_args",
           "policies": "model.policy_args", "datasets": "data.dataset_args"}.get(kind, "args")
    alias = name if isinstance(name, str) else f"{cls.__module__}.{cls.__qualname__}"
    lines = [f"{SINGULAR[kind]} {alias}  ({where})",
             f"  in a recipe: {key.removesuffix('_args')}: {alias}, arguments under {key}"]
    rows = []
    for arg, param in _arguments(kind, cls).items():
        hint = hints.get(arg)
        rule = " or ".join(r for r in (_restriction(h) for h in (hint, *get_args(hint))) if r) \
            if hint is not None else ""
        type_name = _type_name(_relax(hint)) if hint is not None else ""
        default = "(required)" if param.default is inspect.Parameter.empty else \
            repr(_plain(param.default)) if _plain(param.default) is not _NOT_PLAIN \
            else repr(param.default)
        rows.append((arg, type_name, default.replace("None", "null").replace("True", "true")
                     .replace("False", "false"), rule))
    context = [a for a in CONTEXT_ARGS.get(kind, ()) if a in inspect.signature(cls).parameters]
    if rows:
        widths = [max(len(r[i]) for r in rows + [("argument", "type", "default", "rule")])
                  for i in range(4)]
        lines.append("")
        for row in [("argument", "type", "default", "rule"), *rows]:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    else:
        lines += ["", "  (no arguments)"]
    if context:
        lines.append(f"  (given by metarec itself: {', '.join(context)})")
    if any(p.kind is inspect.Parameter.VAR_KEYWORD
           for p in inspect.signature(cls).parameters.values()):
        lines.append("  (also takes any other keyword argument)")
    doc = inspect.getdoc(cls)
    if doc:
        lines += [""] + ["  " + line if line else "" for line in doc.splitlines()]
    return "\n".join(lines)
