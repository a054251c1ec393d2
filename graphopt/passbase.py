"""The pass contract.

A pass is a class with a kebab-case ``name``, typed ``options``, a
``lossless`` flag and a ``run(graph, ctx) -> Graph`` method that returns a new
Graph and never changes the one it was given (the manager hands it a private
copy anyway). The :class:`~graphopt.manager.PassManager` enforces the rest:
lossless passes are checked numerically against their input, lossy ones get
their error measured, and every pass gets a :class:`PassRecord`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, ClassVar

from .data import DataSource
from .graph import Graph
from .options import Option, format_value, resolve_options


def needs_calibration_data(data: DataSource, who: str):
    """The error for ``who`` (a pass) run on generated inputs when it learns from real ones."""
    from .errors import DataError

    how = f"{data.option} FILE.npz" if data.option else "data=graphopt.DataSource('FILE.npz')"
    return DataError(f"{who} needs calibration data (real inputs of the model): give {how}, one array per "
                     "input name; generated inputs would calibrate it to noise")


def first_reasons(reasons: dict, shown: int = 3) -> str:
    """``reasons`` (``{layer: why}``) as one line for a pass's summary: the first ``shown``, then how many more
    the report lists."""
    text = "; ".join(f"{k}: {why}" for k, why in list(reasons.items())[:shown])
    return text + (f"; and {len(reasons) - shown} more (see the report)" if len(reasons) > shown else "")


@dataclass
class PassContext:
    """What a whole run shares: data, seed, tolerances, where to write dumps.

    ``data`` feeds passes that need inputs (calibration, distillation) and the
    verification of lossless passes. ``verify`` turns the numerical check of
    lossless passes on or off. ``dump_after`` names passes whose output Graph
    is written to ``dump_dir``.
    """

    data: DataSource = field(default_factory=DataSource)
    seed: int = 0
    verify: bool = True
    atol: float = 1e-4
    rtol: float = 1e-3
    dump_after: tuple[str, ...] = ()
    dump_dir: str = "."
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("graphopt"))
    progress: Any = None
    #: Labelled evaluation data (``--eval``; :class:`~graphopt.accuracy.EvalSet`), None when not given.
    eval: Any = None
    #: Largest drop of the task metric (points) lossy passes may cost (``--budget``), None for no bound.
    budget: float | None = None

    def calibration(self, graph: Graph, who: str) -> list:
        """The calibration feeds for ``graph``; a :class:`DataError` when the data are generated.

        Generated inputs are noise: a pass that learns ranges or Hessians from
        them would calibrate the model to noise, so it is refused, naming ``who``.
        """
        from .errors import DataError

        if self.data.generated:
            raise needs_calibration_data(self.data, who)
        feeds = self.data.samples(graph)
        if not feeds:
            raise DataError(f"{who}: the calibration data {self.data.describe()} hold no samples")
        for f in feeds:
            if any(v.ndim and v.shape[0] == 0 for v in f.values()):
                raise DataError(f"{who}: the calibration data {self.data.describe()} hold an empty batch")
        return feeds

    def activations(self, graph: Graph, who: str):
        """Intermediate values of ``graph`` on the calibration feeds (see :mod:`graphopt.activations`)."""
        from .activations import Activations

        return Activations(graph, self.calibration(graph, who))


@dataclass
class PassRecord:
    """What one pass did; the unit of the JSON report a build step gates on."""

    name: str
    pipeline: str
    plugin: str
    lossless: bool
    seconds: float = 0.0
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    verification: dict | None = None
    details: dict = field(default_factory=dict)
    #: Lossy passes: error against the float model (``vs_float``) and the task metric before/after (with eval data).
    accuracy: dict | None = None

    def to_json(self) -> dict:
        return dict(self.__dict__)


class Pass:
    """Base class of every pass (built-in or from a plugin).

    Subclasses set ``name``, ``options``, ``lossless`` and implement
    :meth:`run`. Options are validated in ``__init__`` and available as
    ``self.opts.<name>``. Record what the pass changed with
    ``self.note(key, value)``; it reaches the pass's record.
    """

    name: ClassVar[str] = ""
    lossless: ClassVar[bool] = True
    needs_data: ClassVar[bool] = False
    options: ClassVar[tuple[Option, ...]] = ()
    plugin: ClassVar[str] = "<unregistered>"

    def __init__(self, **options: Any):
        self.given = {k.replace("-", "_"): v for k, v in options.items()}
        values = resolve_options(f"pass '{self.name}'", self.options, self.given)
        self.given = {k: values[k] for k in self.given}
        self.opts = SimpleNamespace(**values)
        self.notes: dict[str, Any] = {}

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def requires_data(self) -> bool:
        """Whether this configured pass needs real calibration data (refused before any pass runs if generated).

        Defaults to the class's ``needs_data``; passes whose need depends on
        their options override it.
        """
        return self.needs_data

    def note(self, key: str, value: Any) -> None:
        self.notes[key] = value

    def run(self, graph: Graph, ctx: PassContext) -> Graph:  # pragma: no cover - contract
        raise NotImplementedError(f"pass '{self.name}' does not implement run()")

    def __str__(self) -> str:
        """The pass as pipeline text, with the options that differ from their defaults."""
        defaults = {o.name: o.default for o in self.options}
        args = [f"{k}={format_value(v)}" for k, v in self.given.items() if v != defaults.get(k)]
        return f"{self.name}({','.join(args)})" if args else self.name

    def __repr__(self) -> str:
        return f"<pass {self}>"
