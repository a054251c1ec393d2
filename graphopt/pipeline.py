"""Pipelines as text, TOML or Python, printed back in the text syntax.

Text: ``cleanup,fold-batchnorm,prune(pattern=2:4),quantize(mode=static)``. Values are
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

from .errors import GraphoptError, OptionError, PluginError
from .passbase import Pass
from .plugins import Registry, describe_exception, get_registry


#: Largest pipeline TOML file read (a pipeline is a few lines; this only stops abuse).
MAX_PIPELINE_BYTES = 1 << 20


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _toml_type(v: Any) -> str:
    """What a TOML value is, in TOML's words, for messages."""
    import datetime

    kinds = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array",
             dict: "a table", datetime.datetime: "a date-time", datetime.date: "a date", datetime.time: "a time"}
    return next((k for t, k in kinds.items() if isinstance(v, t)), f"a {type(v).__name__}")


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


def _construct(reg: Registry, pass_cls: type, opts: dict[str, Any]) -> Pass:
    """``pass_cls(**opts)``; whatever a plugin's constructor raises (SystemExit too) names the plugin."""
    try:
        return pass_cls(**opts)
    except (GraphoptError, KeyboardInterrupt):
        raise
    except BaseException as e:
        owner = getattr(pass_cls, "plugin", "<unregistered>")
        info = reg.plugins.get(owner)
        if info is not None and info.builtin and isinstance(e, Exception):
            raise  # a bug in graphopt itself
        raise PluginError(f"pass '{pass_cls.name}' from plugin '{owner}' failed to configure: "
                          f"{describe_exception(e)}") from e


class Pipeline:
    """An ordered list of configured passes."""

    def __init__(self, passes: Sequence[Pass] = ()):
        self.passes = list(passes)

    @classmethod
    def from_steps(cls, steps: Iterable[tuple[str, dict[str, Any]]], registry: Registry | None = None) -> "Pipeline":
        reg = registry or get_registry()
        return cls([_construct(reg, reg.get_pass(name), opts) for name, opts in steps])

    @classmethod
    def parse(cls, text: str, registry: Registry | None = None) -> "Pipeline":
        """Build from pipeline text; unknown passes/options raise :class:`OptionError`."""
        return cls.from_steps(parse_pipeline_text(text), registry)

    @classmethod
    def from_toml(cls, path: str | os.PathLike, registry: Registry | None = None) -> "Pipeline":
        """Build from a TOML file (see the module docstring); every mistake is an :class:`OptionError`.

        The file must be a regular file of at most :data:`MAX_PIPELINE_BYTES`
        (a FIFO or device is refused without being opened); ``passes`` must be
        a list of pipeline strings or tables, ``[[pass]]`` tables need a string
        ``name``, and option values must be scalars (bool, int, float, string).
        """
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        from .data import check_regular_file

        path = Path(path)
        size = check_regular_file(path, "pipeline file", OptionError).st_size
        if size > MAX_PIPELINE_BYTES:
            raise OptionError(f"{path}: pipeline file is {size} bytes, over the {MAX_PIPELINE_BYTES} byte cap")
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_PIPELINE_BYTES + 1)
            if len(raw) > MAX_PIPELINE_BYTES:  # grew since the stat
                raise OptionError(f"{path}: pipeline file is over the {MAX_PIPELINE_BYTES} byte cap")
            doc = tomllib.loads(raw.decode("utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise OptionError(f"{path}: cannot read pipeline file: {_first_line(e)}") from None
        except tomllib.TOMLDecodeError as e:
            raise OptionError(f"{path}: invalid TOML: {_first_line(e)}") from None
        except RecursionError:  # deeply nested arrays/tables
            raise OptionError(f"{path}: invalid TOML: nested too deeply") from None
        unknown = set(doc) - {"passes", "pass", "pipeline"}
        if unknown:
            raise OptionError(f"{path}: unknown keys {sorted(unknown)} (expected 'passes' or [[pass]] tables)")
        steps: list[tuple[str, dict[str, Any]]] = []
        if "pipeline" in doc:
            if not isinstance(doc["pipeline"], str):
                raise OptionError(f"{path}: 'pipeline' must be a string of pipeline text, got {_toml_type(doc['pipeline'])}")
            steps += parse_pipeline_text(doc["pipeline"])
        for key in ("passes", "pass"):
            entries = doc.get(key, [])
            if not isinstance(entries, list):
                raise OptionError(f"{path}: '{key}' must be a list of pass names or [[pass]] tables, "
                                  f"got {_toml_type(entries)}")
            for i, entry in enumerate(entries):
                where = f"{path}: {key}[{i}]"
                if isinstance(entry, str):
                    steps += parse_pipeline_text(entry)
                    continue
                if not isinstance(entry, dict):
                    raise OptionError(f"{where}: each pass must be a string or a table with a 'name', "
                                      f"got {_toml_type(entry)}")
                name = entry.get("name")
                if not isinstance(name, str) or not name:
                    raise OptionError(f"{where}: a pass table needs a string 'name', got "
                                      f"{'none' if name is None else _toml_type(name)}")
                opts = {}
                for k, v in entry.items():
                    if k == "name":
                        continue
                    if not isinstance(v, (bool, int, float, str)):
                        raise OptionError(f"{where}: option '{k}' of pass '{name}' must be a bool, number or "
                                          f"string, got {_toml_type(v)}")
                    opts[k] = v
                steps.append((name, opts))
        return cls.from_steps(steps, registry)

    def __str__(self) -> str:
        return ",".join(str(p) for p in self.passes)

    def __iter__(self):
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def __repr__(self) -> str:
        return f"Pipeline('{self}')"
