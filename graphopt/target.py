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
    #: The manifest's weight index of ``params`` as written to ``weights.bin`` (name, dtype, shape, offset, nbytes).
    #: A target may return a longer ``"weights"`` list (see :func:`graphopt.artifact.append_weights`).
    weights: list[dict] = field(default_factory=list)
    progress: Any = None
    native_log: list[str] = field(default_factory=list)
    #: Threads the compiled code may use (>= 1): ``threads=`` / ``--threads``, else the
    #: ``GRAPHOPT_THREADS`` environment variable, else every core this process may run on.
    threads: int = 1
    #: Tuning trials to spend (0: no tuning, default schedules only) and the tuning database folder.
    tune_trials: int = 0
    tuning_db: Path | None = None


THREADS_ENV = "GRAPHOPT_THREADS"


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one, else the CPU count)."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int | None = None) -> int:
    """The thread count to build and run with: ``threads``, else ``$GRAPHOPT_THREADS``, else every core.

    Raises :class:`~graphopt.errors.OptionError` for a count below 1 or an
    environment value that is not an integer. A count above the available
    cores is kept (the user asked for it) — callers may warn.
    """
    import os

    from .errors import OptionError

    if threads is None:
        env = os.environ.get(THREADS_ENV, "").strip()
        if not env:
            return available_cores()
        try:
            threads = int(env)
        except ValueError:
            raise OptionError(f"environment variable {THREADS_ENV}={env!r} is not an integer; set it to a thread count such as 2") from None
        if threads < 1:
            raise OptionError(f"environment variable {THREADS_ENV}={threads} must be at least 1")
        return threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise OptionError(f"threads = {threads!r} must be an integer of at least 1")
    return threads


class Target:
    """Base class of every target (built-in or from a plugin)."""

    name: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    plugin: ClassVar[str] = "<unregistered>"
    #: ONNX ops the target lowers itself that TVM's importer has no converter for (the CPU target's LSTM,
    #: GRU, RNN); the default lower pipeline rewrites the recurrent ones for a target without them.
    native_ops: ClassVar[tuple[str, ...]] = ()
    #: Whether timing the artifact's programs on a machine that runs them measures the target (False for a
    #: simulated accelerator: `lower` then does not time lossy passes' payoff).
    wall_clock_timing: ClassVar[bool] = True

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

    # -- The Relax pipeline hook of TVM targets (graphopt.relax.build_pipeline runs these) -----------------

    def relax_passes(self, tvm_target) -> list:
        """Relax passes this target runs on high-level ops, before legalization (layout choices, rewrites
        into its own kernels). Default: none."""
        return []

    def schedule_rules(self, tvm_target) -> list:
        """The dlight schedule rules, most specific first, offered every fused TIR function (the first rule
        that claims a function schedules it). Default: none (functions compile as TVM legalized them)."""
        return []

    def compile_pipeline(self, tvm_target, *, before_legalize=(), after_fusion=()):
        """The Relax pipeline this target compiles with: :func:`graphopt.relax.build_pipeline` for
        ``tvm_target`` with ``before_legalize`` passes, then after fusion the ``after_fusion`` passes (a
        tuner's, which mark what they schedule) and :meth:`schedule_rules` applied to what is left."""
        from tvm.s_tir import dlight

        from .relax import build_pipeline

        rules = self.schedule_rules(tvm_target)
        return build_pipeline(tvm_target, before_legalize=before_legalize,
                              after_fusion=[*after_fusion, *([dlight.ApplyDefaultSchedule(*rules)] if rules else [])])

    def lower(self, graph: Graph, out_dir: Path, ctx: LowerContext) -> dict:  # pragma: no cover - contract
        """Compile into ``out_dir``; return ``{"target": {...}, "programs": [...]}`` for the manifest."""
        raise NotImplementedError

    @classmethod
    def load_programs(cls, artifact) -> dict[str, Program]:  # pragma: no cover - contract
        """Callables for the artifact's programs, keyed by program name, on ``artifact.device`` (None: the
        device kind each program declares). Raise ArtifactError for a machine that cannot run them."""
        raise NotImplementedError

    def cannot_run_here(self) -> str | None:
        """Why this machine will not be able to run what this target (with these options) builds, when that
        is known before lowering (a GPU target on a machine without the GPU); None: no known reason. Lets
        ``lower --verify`` refuse before minutes of compilation instead of after."""
        return None

    @classmethod
    def cannot_run(cls, manifest: dict) -> str | None:
        """Why this machine cannot run an artifact with ``manifest`` (one line saying what to do), or None.

        Asked without loading anything (``graphopt inspect``); ``load_programs`` refuses with the same
        reason. Default: None (the target knows of no reason)."""
        return None

    @classmethod
    def modelled_seconds(cls, artifact, feed) -> float | None:
        """For a target whose wall-clock time means nothing (``wall_clock_timing = False``): the time its
        model of the hardware gives for running ``feed`` through ``artifact`` (the tpu target: the array's
        cycles at its clock); None: the target has no such model (the default)."""
        return None

    @classmethod
    def run_report(cls, artifact) -> dict | None:
        """What the target measured while ``artifact``'s programs ran in this process (JSON), for
        ``graphopt run``'s report; None: nothing to report (the default)."""
        return None

    @classmethod
    def report_lines(cls, report: dict) -> list[str]:
        """:meth:`run_report`'s document as lines for a terminal."""
        return []
