"""The target contract: lower a Graph into an artifact directory, and run one.

A target is a class with a ``name``, typed ``options`` and three methods:

- :meth:`Target.check` reports everything the target cannot lower, all at
  once, before any work starts (an :class:`~graphopt.errors.UnsupportedOpsError`);
- :meth:`Target.lower` writes its programs into a (temporary) artifact
  directory and returns the manifest entries that describe them;
- :meth:`Target.load_programs` turns a manifest back into callables, refusing
  (with :class:`~graphopt.errors.ArtifactError`) a machine that cannot run them.

The shared parts of every artifact (graph, weights, manifest, hashes, atomic
write) live in :mod:`graphopt.artifact`, so a target only deals with code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from .graph import Graph
from .options import Option, resolve_options

#: A compiled program: takes arrays in the manifest's input order, returns outputs in order.
Program = Callable[[Sequence[np.ndarray]], list[np.ndarray]]


@dataclass
class LowerContext:
    """What lowering gets besides the Graph: weights already laid out, progress, log."""

    params: list[str] = field(default_factory=list)
    progress: Any = None
    native_log: list[str] = field(default_factory=list)


class Target:
    """Base class of every target (built-in or from a plugin)."""

    name: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    plugin: ClassVar[str] = "<unregistered>"

    def __init__(self, **options: Any):
        self.given = {k.replace("-", "_"): v for k, v in options.items()}
        values = resolve_options(f"target '{self.name}'", self.options, self.given)
        self.opts = SimpleNamespace(**values)

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def check(self, graph: Graph) -> None:
        """Raise UnsupportedOpsError naming every op/node this target cannot lower."""

    def select_params(self, graph: Graph) -> list[str]:
        """Initializers kept outside the compiled code as weights (in the artifact's weights file)."""
        return []

    def lower(self, graph: Graph, out_dir: Path, ctx: LowerContext) -> dict:  # pragma: no cover - contract
        """Compile into ``out_dir``; return ``{"target": {...}, "programs": [...]}`` for the manifest."""
        raise NotImplementedError

    @classmethod
    def load_programs(cls, artifact) -> dict[str, Program]:  # pragma: no cover - contract
        """Callables for the artifact's programs, keyed by program name."""
        raise NotImplementedError
