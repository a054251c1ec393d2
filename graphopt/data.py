"""Model inputs: read from files the user gives, or generated from a seed.

A data source yields *feeds* (``{input name: array}``) for verification,
calibration and benchmarking. Files are ``.npz`` (one array per input name)
or ``.npy`` (a single-input model), or a directory of them; they are read
with ``allow_pickle=False`` and a size cap, and checked against the model's
inputs (names, dtypes, ranks, fixed dims) before use.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from .errors import DataError
from .graph import Graph, TensorSpec

Feed = dict[str, np.ndarray]
MAX_INPUT_FILE_BYTES = 4 << 30


def _read_one(path: Path, specs: Sequence[TensorSpec]) -> Feed:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"{path}: cannot read inputs file: {e.strerror}") from e
    if size > MAX_INPUT_FILE_BYTES:
        raise DataError(f"{path}: {size} bytes is over the {MAX_INPUT_FILE_BYTES} byte cap for an inputs file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            if len(specs) != 1:
                raise DataError(
                    f"{path}: a .npy file holds one array but the model has {len(specs)} inputs "
                    f"({', '.join(s.name for s in specs)}); use an .npz with one array per input name"
                )
            return {specs[0].name: loaded}
        with loaded:
            return {k: loaded[k] for k in loaded.files}
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: cannot read inputs (.npz/.npy expected, no pickled objects): {msg}") from e


def check_feed(feed: Mapping[str, np.ndarray], specs: Sequence[TensorSpec], where: str) -> Feed:
    """Validate a feed against input specs; returns it with arrays made contiguous."""
    names = [s.name for s in specs]
    missing = [n for n in names if n not in feed]
    extra = [n for n in feed if n not in names]
    if missing or extra:
        raise DataError(
            f"{where}: inputs do not match the model: missing {missing or 'none'}, "
            f"unexpected {extra or 'none'} (model inputs: {', '.join(names)})"
        )
    out: Feed = {}
    for s in specs:
        arr = np.asarray(feed[s.name])
        if arr.dtype.name != s.dtype:
            raise DataError(f"{where}: input '{s.name}' has dtype {arr.dtype.name}, the model expects {s.dtype}")
        if arr.ndim != len(s.shape) or any(isinstance(d, int) and d != a for d, a in zip(s.shape, arr.shape)):
            raise DataError(
                f"{where}: input '{s.name}' has shape {list(arr.shape)}, the model expects {list(s.shape)}"
            )
        out[s.name] = np.ascontiguousarray(arr)
    return out


def read_inputs(path: str | os.PathLike, specs: Sequence[TensorSpec]) -> list[Feed]:
    """Feeds from an .npz/.npy file or a directory of them (sorted by name)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: inputs file not found")
    files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: directory holds no .npz or .npy files")
    return [check_feed(_read_one(f, specs), specs, str(f)) for f in files]


def _index_bounds(graph: Graph) -> dict[str, int]:
    """Upper bounds for integer inputs used as Gather indices into an initializer."""
    inits = {t.name: list(t.dims) for t in graph.graph.initializer}
    bounds: dict[str, int] = {}
    for node in graph.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[0] in inits:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            dims = inits[node.input[0]]
            if dims:
                b = dims[axis]
                bounds[node.input[1]] = min(b, bounds.get(node.input[1], b))
    return bounds


def generate_inputs(graph: Graph, *, seed: int = 0, count: int = 1, dim_value: int = 1) -> list[Feed]:
    """Seeded random feeds for the graph's inputs; symbolic dims take ``dim_value``.

    Floats are standard normal; integer inputs that index an embedding stay
    inside its row count, other integers fall in [0, 64); bools are fair coins.
    """
    rng = np.random.default_rng(seed)
    bounds = _index_bounds(graph)
    feeds: list[Feed] = []
    for _ in range(count):
        feed: Feed = {}
        for s in graph.inputs:
            shape = tuple(d if isinstance(d, int) else dim_value for d in s.shape)
            dt = np.dtype(s.dtype) if s.dtype != "unknown" else np.dtype("float32")
            if dt.kind == "f":
                feed[s.name] = rng.standard_normal(shape).astype(dt)
            elif dt.kind in "iu":
                feed[s.name] = rng.integers(0, bounds.get(s.name, 64), size=shape).astype(dt)
            elif dt.kind == "b":
                feed[s.name] = rng.integers(0, 2, size=shape).astype(bool)
            else:
                raise DataError(f"input '{s.name}' has dtype {s.dtype}, which graphopt cannot generate; pass --inputs")
        feeds.append(feed)
    return feeds


class DataSource:
    """Where passes and verification take inputs from.

    Exactly one of ``path`` (file or directory), ``feeds`` (in memory) or
    ``factory`` (a callable returning an iterable of feeds) may be given;
    with none, inputs are generated from ``seed``.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        feeds: Sequence[Feed] | None = None,
        factory: Callable[[], Iterable[Feed]] | None = None,
        seed: int = 0,
    ):
        if sum(x is not None for x in (path, feeds, factory)) > 1:
            raise ValueError("give at most one of path, feeds, factory")
        self.path, self.feeds, self.factory, self.seed = path, feeds, factory, seed

    @property
    def generated(self) -> bool:
        return self.path is None and self.feeds is None and self.factory is None

    def describe(self) -> str:
        if self.path is not None:
            return str(self.path)
        if self.feeds is not None:
            return f"{len(self.feeds)} in-memory feeds"
        if self.factory is not None:
            return getattr(self.factory, "__name__", "callable")
        return f"generated (seed {self.seed})"

    def samples(self, graph: Graph, limit: int | None = None) -> list[Feed]:
        specs = graph.inputs
        if self.path is not None:
            feeds = read_inputs(self.path, specs)
        elif self.feeds is not None:
            feeds = [check_feed(f, specs, "feeds") for f in self.feeds]
        elif self.factory is not None:
            feeds = [check_feed(f, specs, self.describe()) for f in self.factory()]
        else:
            feeds = generate_inputs(graph, seed=self.seed, count=limit or 1)
        return feeds[:limit] if limit else feeds


