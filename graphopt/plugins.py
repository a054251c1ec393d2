"""Finding and loading plugins through the ``graphopt`` entry-point group.

One :class:`Registry` per process holds the pluggy manager and what each plugin
registered. A plugin that fails to import or raises inside a registration
hook is recorded (``status == "failed"`` with its error) and skipped; the
others keep working. Plugins are switched off by name with the
``GRAPHOPT_DISABLE_PLUGINS`` environment variable (comma separated) or the
CLI's ``--disable-plugin NAME``.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import pluggy

from . import hookspecs
from .errors import OptionError, PluginError

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

    def to_json(self) -> dict:
        return dict(self.__dict__)


def describe_exception(e: BaseException) -> str:
    """``Type: first line of the message`` (errors stay one line)."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


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
        # Built-ins first, so a third-party plugin cannot silently replace one of their names.
        eps = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP),
                     key=lambda e: (not e.name.startswith("graphopt."), e.name))
        seen: set[str] = set()
        for ep in eps:
            if ep.name in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add(ep.name)
            dist = getattr(ep, "dist", None)
            source = f"{ep.value}" + (f" ({dist.name} {dist.version})" if dist else "")
            if ep.name in self.disabled:
                self.plugins[ep.name] = PluginInfo(ep.name, source, status="disabled")
                continue
            try:
                obj = ep.load()
            except Exception as e:  # a broken plugin must not take the others down
                self.plugins[ep.name] = PluginInfo(ep.name, source, "failed", f"import failed: {describe_exception(e)}")
                continue
            self.register(obj, ep.name, source)

    def register(self, plugin: Any, name: str, source: str | None = None) -> PluginInfo:
        """Register a plugin object (module or instance) and collect its passes and targets."""
        info = PluginInfo(name, source or getattr(plugin, "__name__", type(plugin).__name__))
        self.plugins[name] = info
        if name in self.disabled:
            info.status = "disabled"
            return info
        try:
            self.pm.register(plugin, name=name)
        except Exception as e:
            info.status, info.error = "failed", f"registration failed: {describe_exception(e)}"
            return info
        for hook, table, kind in (
            ("graphopt_register_passes", self.passes, "passes"),
            ("graphopt_register_targets", self.targets, "targets"),
        ):
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                if impl.plugin_name != name:
                    continue
                try:
                    classes = list(impl.function() or [])
                except Exception as e:
                    info.status, info.error = "failed", f"{hook} raised {describe_exception(e)}"
                    continue
                for cls in classes:
                    cname = getattr(cls, "name", None)
                    if not cname:
                        info.status, info.error = "failed", f"{hook} returned {cls!r} without a name"
                        continue
                    if cname in table:
                        owner = table[cname].plugin
                        info.warnings.append(
                            f"{'pass' if kind == 'passes' else 'target'} '{cname}' is already provided by "
                            f"plugin '{owner}'; this plugin's version is ignored"
                        )
                        continue
                    cls.plugin = name
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
        """Call an instrument hook on every plugin, naming the plugin that raised."""
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            try:
                impl.function(**{k: kwargs[k] for k in impl.argnames})
            except Exception as e:
                raise PluginError(f"plugin '{impl.plugin_name}' failed in {hook}: {describe_exception(e)}") from e


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
