"""Pipelines as text, TOML or Python, printed back in the text syntax.

Text: ``cleanup,fold-batchnorm,prune(sparsity=0.5,pattern=2:4)``. Values are
bare words, numbers, ``true``/``false`` or quoted strings. TOML::

    passes = ["cleanup", "fold-batchnorm"]        # text entries, or tables:
    [[pass]]
    name = "prune"
    sparsity = 0.5

Every pass name and option is resolved and validated when the pipeline is
built, before any pass runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import OptionError
from .passbase import Pass
from .plugins import Registry, get_registry


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside parentheses and quotes."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "\"'":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise OptionError(f"pipeline '{text}': unbalanced ')'")
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if quote or depth:
        raise OptionError(f"pipeline '{text}': unclosed {'quote' if quote else '('}")
    parts.append("".join(cur))
    return parts


def _unquote(v: str) -> str:
    v = v.strip()
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
        return v[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return v


def parse_pipeline_text(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``"a,b(x=1)"`` -> ``[("a", {}), ("b", {"x": "1"})]`` (values stay strings)."""
    steps: list[tuple[str, dict[str, Any]]] = []
    if not text.strip():
        return steps
    for part in _split_top(text, ","):
        part = part.strip()
        if not part:
            raise OptionError(f"pipeline '{text}': empty pass name (stray comma?)")
        name, paren, rest = part.partition("(")
        name = name.strip()
        opts: dict[str, Any] = {}
        if paren:
            if not rest.endswith(")"):
                raise OptionError(f"pipeline '{text}': '{part}' is missing its closing ')'")
            body = rest[:-1]
            for item in _split_top(body, ",") if body.strip() else []:
                key, eq, value = item.partition("=")
                if not eq or not key.strip():
                    raise OptionError(f"pipeline '{text}': option '{item.strip()}' of '{name}' must be key=value")
                opts[key.strip()] = _unquote(value)
        if not name.replace("-", "").replace("_", "").isalnum():
            raise OptionError(f"pipeline '{text}': '{name}' is not a pass name")
        steps.append((name, opts))
    return steps


class Pipeline:
    """An ordered list of configured passes."""

    def __init__(self, passes: Sequence[Pass] = ()):
        self.passes = list(passes)

    @classmethod
    def from_steps(cls, steps: Iterable[tuple[str, dict[str, Any]]], registry: Registry | None = None) -> "Pipeline":
        reg = registry or get_registry()
        return cls([reg.get_pass(name)(**opts) for name, opts in steps])

    @classmethod
    def parse(cls, text: str, registry: Registry | None = None) -> "Pipeline":
        """Build from pipeline text; unknown passes/options raise :class:`OptionError`."""
        return cls.from_steps(parse_pipeline_text(text), registry)

    @classmethod
    def from_toml(cls, path: str | os.PathLike, registry: Registry | None = None) -> "Pipeline":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        path = Path(path)
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise OptionError(f"{path}: pipeline file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise OptionError(f"{path}: cannot read pipeline file: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise OptionError(f"{path}: invalid TOML: {e}") from None
        unknown = set(doc) - {"passes", "pass", "pipeline"}
        if unknown:
            raise OptionError(f"{path}: unknown keys {sorted(unknown)} (expected 'passes' or [[pass]] tables)")
        steps: list[tuple[str, dict[str, Any]]] = []
        if isinstance(doc.get("pipeline"), str):
            steps += parse_pipeline_text(doc["pipeline"])
        for entry in doc.get("passes", []) + doc.get("pass", []):
            if isinstance(entry, str):
                steps += parse_pipeline_text(entry)
            elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
                opts = {k: v for k, v in entry.items() if k != "name"}
                steps.append((entry["name"], opts))
            else:
                raise OptionError(f"{path}: each pass must be a string or a table with a 'name', got {entry!r}")
        return cls.from_steps(steps, registry)

    def __str__(self) -> str:
        return ",".join(str(p) for p in self.passes)

    def __iter__(self):
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def __repr__(self) -> str:
        return f"Pipeline('{self}')"
