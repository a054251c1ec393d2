"""Finding and loading plugins through the ``graphopt`` entry-point group.

One :class:`Registry` per process holds the pluggy manager and what each plugin
registered. A plugin that fails to import or raises inside a registration
hook is recorded (``status == "failed"`` with its error) and skipped; the
others keep working. Plugins are switched off by name with the
``GRAPHOPT_DISABLE_PLUGINS`` environment variable (comma separated) or the
CLI's ``--disable-plugin NAME``.

Contracts that hold for plugin code wherever graphopt calls it:

* Anything a plugin raises -- ``SystemExit`` from a stray ``sys.exit(0)``
  included; every ``BaseException`` except the user's ``KeyboardInterrupt`` --
  becomes a failure that names the plugin: at import or registration the
  plugin is marked ``failed``; in a pass, an instrument hook or a target
  method (check, select_params, lower, load_programs) the run stops
  with a :class:`~graphopt.errors.PluginError` (exit 2). A plugin can never
  turn a command into a silent exit 0.
* A plugin cannot shadow a built-in pass or target: providing a name that a
  built-in (the ``graphopt`` distribution's own ``graphopt.passes`` /
  ``graphopt.targets``) already has marks the plugin ``failed`` with an error
  saying so. There is deliberately no override switch: a replacement gets a
  name of its own and users choose it in their pipeline. Between two
  third-party plugins the first (by entry-point name) keeps the name and the
  second gets a warning.
* Instrument hooks are called through pluggy (``pm.hook.graphopt_pass_start``),
  so ``@hookimpl(wrapper=True)`` (and ``tryfirst``/``trylast``) work as pluggy
  documents; each plugin's hook functions are wrapped at registration so that
  an error still names the plugin that raised it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import pluggy

from . import hookspecs
from .errors import GraphoptError, OptionError, PluginError

ENTRY_POINT_GROUP = "graphopt"


@dataclass
class PluginInfo:
    """One plugin: where it came from, whether it loaded, what it added."""

    name: str
    source: str
    status: str = "loaded"  # loaded | failed | disabled
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    passes: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    builtin: bool = False  # shipped in the graphopt distribution itself

    def to_json(self) -> dict:
        return dict(self.__dict__)


def describe_exception(e: BaseException) -> str:
    """``Type: first line of the message`` (errors stay one line)."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, SystemExit):  # sys.exit(0) reads "SystemExit: 0": say what happened
        return f"SystemExit (the plugin called sys.exit({e.code!r}))"
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _plugin_error(plugin: str, hook: str, e: BaseException) -> PluginError:
    return PluginError(f"plugin '{plugin}' failed in {hook}: {describe_exception(e)}")


#: Target methods graphopt calls on a plugin's target class (wrapped like hooks, see Registry.register).
_TARGET_METHODS = ("check", "select_params", "lower", "load_programs")


def _wrap_target_methods(cls, plugin: str) -> None:
    """Make the methods a third-party target defines name the plugin when they fail.

    A target's own :class:`~graphopt.errors.GraphoptError` (an unsupported op,
    a failed compile) is the message meant for the user and passes unchanged;
    anything else, ``SystemExit`` included, becomes a PluginError.
    """
    for meth in _TARGET_METHODS:
        raw = cls.__dict__.get(meth)
        if raw is None or getattr(raw, "_graphopt_wrapped", False):
            continue
        is_cm = isinstance(raw, classmethod)
        fn = raw.__func__ if is_cm else raw
        if not callable(fn):
            continue
        wrapped = _naming_errors(fn, plugin, f"target '{cls.name}' {meth}()", passthrough=(GraphoptError,))
        wrapped._graphopt_wrapped = True
        setattr(cls, meth, classmethod(wrapped) if is_cm else wrapped)


def _naming_errors(fn, plugin: str, hook: str, passthrough: tuple = (PluginError,)):
    """``fn`` wrapped so that whatever it raises (but Ctrl-C) becomes a PluginError naming ``plugin``.

    Exceptions of the ``passthrough`` types are re-raised unchanged.
    Generator functions (pluggy hook wrappers) get a generator that forwards
    every ``send``/``throw``: an exception pluggy throws in (another plugin's
    error) and the wrapper lets through passes unchanged; one the wrapper
    itself raises is renamed.
    """
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                gen = fn(*args, **kwargs)
                value = next(gen)
            except StopIteration:
                raise PluginError(f"plugin '{plugin}': hook wrapper {hook} did not yield") from None
            except KeyboardInterrupt:
                raise
            except BaseException as e:
                if isinstance(e, passthrough):
                    raise
                raise _plugin_error(plugin, hook, e) from e
            while True:
                try:
                    sent = yield value
                except BaseException as thrown:  # forwarded, Ctrl-C too, so the wrapper can clean up
                    try:
                        value = gen.throw(thrown)
                    except StopIteration as stop:
                        return stop.value
                    except KeyboardInterrupt:
                        raise
                    except BaseException as e:
                        if e is thrown:
                            raise
                        if isinstance(e, passthrough):
                            raise
                        raise _plugin_error(plugin, hook, e) from e
                else:
                    try:
                        value = gen.send(sent)
                    except StopIteration as stop:
                        return stop.value
                    except KeyboardInterrupt:
                        raise
                    except BaseException as e:
                        if isinstance(e, passthrough):
                            raise
                        raise _plugin_error(plugin, hook, e) from e

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            raise
        except BaseException as e:
            if isinstance(e, passthrough):
                raise
            raise _plugin_error(plugin, hook, e) from e

    return wrapper


class Registry:
    """Passes and targets by name, and the plugins that provided them."""

    def __init__(self, disabled: Iterable[str] = ()):
        self.pm = pluggy.PluginManager("graphopt")
        self.pm.add_hookspecs(hookspecs)
        self.disabled = {d.strip() for d in disabled if d.strip()}
        self.env_disabled: set[str] = set()
        self.plugins: dict[str, PluginInfo] = {}
        self.passes: dict[str, type] = {}
        self.targets: dict[str, type] = {}

    # ---------------------------------------------------------------- loading
    def load_entry_points(self) -> None:
        # Built-ins first, so their names are taken before any third-party plugin registers.
        eps = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP),
                     key=lambda e: (not _is_builtin(e), e.name))
        seen: set[str] = set()
        for ep in eps:
            if ep.name in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add(ep.name)
            dist = getattr(ep, "dist", None)
            source = f"{ep.value}" + (f" ({dist.name} {dist.version})" if dist else "")
            builtin = _is_builtin(ep)
            if ep.name in self.disabled:
                self.plugins[ep.name] = PluginInfo(ep.name, source, status="disabled", builtin=builtin)
                continue
            try:
                obj = ep.load()
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # a broken plugin (even one calling sys.exit) must not take the others down
                self.plugins[ep.name] = PluginInfo(ep.name, source, "failed", f"import failed: {describe_exception(e)}",
                                                   builtin=builtin)
                continue
            self.register(obj, ep.name, source, builtin=builtin)

    def register(self, plugin: Any, name: str, source: str | None = None, *, builtin: bool = False) -> PluginInfo:
        """Register a plugin object (module or instance) and collect its passes and targets.

        ``builtin`` marks graphopt's own passes/targets, whose names no other
        plugin may take (see the module docstring). A plugin that fails in
        any way provides nothing: it is unregistered again, status ``failed``.
        """
        info = PluginInfo(name, source or getattr(plugin, "__name__", type(plugin).__name__), builtin=builtin)
        self.plugins[name] = info
        if name in self.disabled:
            info.status = "disabled"
            return info
        try:
            self.pm.register(plugin, name=name)
        except KeyboardInterrupt:
            raise
        except BaseException as e:
            info.status, info.error = "failed", f"registration failed: {describe_exception(e)}"
            return info
        # Every hook function of this plugin reports its own errors by plugin name,
        # whether graphopt calls it directly or pluggy calls it inside a hook call.
        for caller in self.pm.get_hookcallers(plugin) or []:
            for impl in caller.get_hookimpls():
                if impl.plugin_name == name and not getattr(impl.function, "_graphopt_wrapped", False):
                    impl.function = _naming_errors(impl.function, name, caller.name)
                    impl.function._graphopt_wrapped = True
        for hook, table, kind in (
            ("graphopt_register_passes", self.passes, "passes"),
            ("graphopt_register_targets", self.targets, "targets"),
        ):
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                if impl.plugin_name != name:
                    continue
                if impl.wrapper or impl.hookwrapper:
                    info.status, info.error = "failed", f"{hook} cannot be a hook wrapper"
                    continue
                try:
                    classes = list(impl.function() or [])
                except PluginError as e:
                    cause = e.__cause__ or e
                    info.status, info.error = "failed", f"{hook} raised {describe_exception(cause)}"
                    continue
                except KeyboardInterrupt:
                    raise
                except BaseException as e:  # list() over a bad return value
                    info.status, info.error = "failed", f"{hook} returned something unusable: {describe_exception(e)}"
                    continue
                for cls in classes:
                    cname = getattr(cls, "name", None)
                    if not cname or not isinstance(cname, str):
                        info.status, info.error = "failed", f"{hook} returned {cls!r} without a name"
                        continue
                    label = "pass" if kind == "passes" else "target"
                    if cname in table:
                        owner = table[cname].plugin
                        if self.plugins.get(owner) is not None and self.plugins[owner].builtin and not builtin:
                            info.status, info.error = "failed", (
                                f"{label} '{cname}' would shadow graphopt's built-in {label} of that name; "
                                f"a plugin must give its {label} a name of its own"
                            )
                            continue
                        info.warnings.append(
                            f"{label} '{cname}' is already provided by plugin '{owner}'; this plugin's version is ignored"
                        )
                        continue
                    cls.plugin = name
                    if kind == "targets" and not builtin and isinstance(cls, type):
                        _wrap_target_methods(cls, name)
                    table[cname] = cls
                    getattr(info, kind).append(cname)
        if info.status == "failed":
            # A failed plugin provides nothing, not even what it registered before failing.
            self.pm.unregister(name=name)
            for table, names in ((self.passes, info.passes), (self.targets, info.targets)):
                for n in names:
                    table.pop(n, None)
            info.passes, info.targets = [], []
        return info

    # ---------------------------------------------------------------- lookups
    def failures(self) -> list[PluginInfo]:
        return [p for p in self.plugins.values() if p.status == "failed"]

    def _unknown(self, kind: str, name: str, table: dict) -> OptionError:
        hint = ""
        broken = [p.name for p in self.failures()]
        if broken:
            hint = f"; plugins that failed to load: {', '.join(broken)} (see `graphopt plugins`)"
        return OptionError(f"unknown {kind} '{name}' (available: {', '.join(sorted(table)) or 'none'}){hint}")

    def get_pass(self, name: str) -> type:
        if name not in self.passes:
            raise self._unknown("pass", name, self.passes)
        return self.passes[name]

    def get_target(self, name: str) -> type:
        if name not in self.targets:
            raise self._unknown("target", name, self.targets)
        return self.targets[name]

    def call_instrument(self, hook: str, **kwargs) -> None:
        """Call an instrument hook through pluggy (so hook wrappers work), naming the plugin that raised.

        Each plugin's hook functions were wrapped at registration to raise a
        :class:`PluginError` with their plugin's name; anything else escaping
        pluggy itself (a malformed hook wrapper) is reported as a PluginError too.
        """
        try:
            getattr(self.pm.hook, hook)(**kwargs)
        except (PluginError, KeyboardInterrupt):
            raise
        except Exception as e:
            raise PluginError(f"a plugin failed in {hook}: {describe_exception(e)}") from e


def _is_builtin(ep) -> bool:
    """Whether an entry point belongs to graphopt itself (its own distribution)."""
    dist = getattr(ep, "dist", None)
    if dist is not None:
        return (dist.name or "").lower() == "graphopt"
    return ep.value.split(":")[0] in ("graphopt.passes", "graphopt.targets")


_REGISTRY: Registry | None = None


def get_registry(disable: Iterable[str] | None = None, *, reload: bool = False) -> Registry:
    """The process-wide registry, loading entry points on first use.

    Plugins named in ``GRAPHOPT_DISABLE_PLUGINS`` and in ``disable`` are not
    loaded. Without ``disable`` the existing registry is returned as it is
    (so a CLI's ``--disable-plugin`` holds for the whole run); a different
    ``disable`` set or ``reload=True`` builds a fresh one.
    """
    global _REGISTRY
    env = {d.strip() for d in os.environ.get("GRAPHOPT_DISABLE_PLUGINS", "").split(",") if d.strip()}
    if disable is None:
        # Keep what an earlier caller (the CLI's --disable-plugin) switched off.
        extra = _REGISTRY.disabled - _REGISTRY.env_disabled if _REGISTRY is not None else set()
    else:
        extra = {d.strip() for d in disable if d.strip()}
    disabled = env | extra
    if _REGISTRY is None or reload or disabled != _REGISTRY.disabled:
        reg = Registry(disabled)
        reg.env_disabled = env
        reg.load_entry_points()
        _REGISTRY = reg
    return _REGISTRY
