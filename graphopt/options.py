"""Typed, documented options shared by passes and targets.

A pass or target declares ``options = (Option(...), ...)``. Values arrive as
Python objects (API, TOML) or strings (pipeline text, ``--target-opt``) and are
validated before anything runs: unknown names, wrong types and out-of-range
values are rejected with the valid choices listed.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from .errors import OptionError

_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "str"}


@dataclass(frozen=True)
class Option:
    """One option: name (snake_case), type, default, help, and optional choices/range."""

    name: str
    type: type
    default: Any
    help: str
    choices: Sequence[Any] | None = None
    min: float | None = None
    max: float | None = None

    def describe(self) -> str:
        extra = ""
        if self.choices:
            extra = " one of " + "|".join(map(str, self.choices))
        elif self.min is not None or self.max is not None:
            lo = "-inf" if self.min is None else self.min
            hi = "inf" if self.max is None else self.max
            extra = f" in [{lo}, {hi}]"
        return f"{self.name}: {_TYPE_NAMES.get(self.type, self.type.__name__)}{extra} = {self.default!r}  {self.help}"

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "type": _TYPE_NAMES.get(self.type, self.type.__name__),
            "default": self.default,
            "help": self.help,
            "choices": list(self.choices) if self.choices else None,
            "min": self.min,
            "max": self.max,
        }

    def coerce(self, value: Any, owner: str) -> Any:
        """Convert ``value`` (possibly a string from pipeline text) and check it."""
        where = f"{owner}: option '{self.name}'"
        t = self.type
        v = value
        if isinstance(value, str) and t is not str:
            s = value.strip()
            try:
                if t is bool:
                    if s.lower() in ("true", "1", "yes", "on"):
                        v = True
                    elif s.lower() in ("false", "0", "no", "off"):
                        v = False
                    else:
                        raise ValueError
                elif t is int:
                    v = int(s, 0)
                elif t is float:
                    v = float(s)
            except ValueError:
                raise OptionError(f"{where} expects {_TYPE_NAMES[t]}, got '{value}'") from None
        elif t is float and isinstance(value, int) and not isinstance(value, bool):
            v = float(value)
        if t is bool and not isinstance(v, bool):
            raise OptionError(f"{where} expects bool (true/false), got {value!r}")
        if t in (int, float) and (isinstance(v, bool) or not isinstance(v, t)):
            raise OptionError(f"{where} expects {_TYPE_NAMES[t]}, got {value!r}")
        if t is str and not isinstance(v, str):
            raise OptionError(f"{where} expects str, got {value!r}")
        if t is float and math.isnan(v):
            # NaN compares False with every bound, so it would slip through min/max.
            raise OptionError(f"{where} expects a number, got NaN")
        if self.choices and v not in self.choices:
            raise OptionError(f"{where} must be one of {', '.join(map(str, self.choices))}; got {v!r}")
        if self.min is not None and v < self.min:
            raise OptionError(f"{where} must be >= {self.min}, got {v!r}")
        if self.max is not None and v > self.max:
            raise OptionError(f"{where} must be <= {self.max}, got {v!r}")
        return v


def resolve_options(owner: str, declared: Iterable[Option], given: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with ``given``, every value validated; unknown names rejected."""
    declared = list(declared)
    by_name = {o.name: o for o in declared}
    values = {o.name: o.default for o in declared}
    for key, value in given.items():
        name = key.replace("-", "_")
        if name not in by_name:
            valid = ", ".join(by_name) or "none"
            raise OptionError(f"{owner}: unknown option '{key}' (valid options: {valid})")
        values[name] = by_name[name].coerce(value, owner)
    return values


def check_tolerance(name: str, value: Any) -> float:
    """A comparison tolerance (``atol``/``rtol``): a finite number >= 0, else :class:`OptionError`.

    NaN would make every comparison pass or fail silently, and a negative
    tolerance can never be met; both are the caller's mistake, refused before
    anything runs.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionError(f"tolerance {name} must be a number >= 0, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise OptionError(f"tolerance {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def format_value(v: Any) -> str:
    """A value as pipeline text writes it (the inverse of the parser)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    s = str(v)
    if s == "" or any(c in s for c in ",()=\"' "):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return s
