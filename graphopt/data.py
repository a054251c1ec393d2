"""Model inputs: read from files the user gives, or generated from a seed.

A data source yields *feeds* (``{input name: array}``) for verification,
calibration and benchmarking. Files are ``.npz`` (one array per input name)
or ``.npy`` (a single-input model), or a directory of them; they are
checked against the model's inputs (names, dtypes, ranks, fixed dims) before
use. Reading is defensive: only regular files are opened (a FIFO, socket or
device is refused from its ``stat``, so nothing blocks); object arrays are
refused; every size a file *declares* (zip members' uncompressed sizes, each
.npy header's shape x dtype) is checked against caps and against the bytes
really stored before a single array is allocated, so a zip bomb or a forged
header costs nothing; a folder's total is capped too.
"""

from __future__ import annotations

import math
import os
import stat
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from .errors import DataError
from .graph import Graph, TensorSpec

Feed = dict[str, np.ndarray]
#: Largest inputs file (.npz/.npy as stored on disk) read.
MAX_INPUT_FILE_BYTES = 4 << 30
#: Largest total of array bytes one inputs file may declare (npy headers, zip members):
#: checked before a single array is read, so a small zip bomb or a header that declares
#: a huge shape is refused instead of allocated.
MAX_INPUT_ARRAY_BYTES = 4 << 30
#: Most arrays one .npz may hold.
MAX_NPZ_MEMBERS = 4096
#: Largest total of array bytes read from a folder of inputs files, and most files read from it.
MAX_INPUTS_TOTAL_BYTES = 8 << 30
MAX_INPUT_FILES = 100_000


def check_regular_file(path: Path, what: str, error=DataError) -> os.stat_result:
    """``os.stat`` of ``path``, refusing anything but a regular file without opening it.

    A FIFO, socket or device could block a reader forever (or never end), so
    those are refused from their ``stat`` alone. ``error`` is the exception class
    raised (its message names ``path`` and ``what`` it should have been).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
                or stat.S_ISBLK(st.st_mode) else "not a regular file")
        raise error(f"{path}: is {kind}; the {what} must be a regular file")
    return st


def _npy_header(f, where: str, available: int) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """Read an .npy header from ``f`` and check what it declares, before any data is read.

    Returns (shape, dtype, fortran_order, declared bytes). Object dtypes (pickles)
    and arrays larger than what follows the header (``available`` is the size of
    the whole file or zip member) or than :data:`MAX_INPUT_ARRAY_BYTES` are refused.
    """
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as e:
        raise DataError(f"{where}: not a valid .npy array: {_first_line(e)}") from None
    if dtype.hasobject:
        raise DataError(f"{where}: cannot read inputs: it holds Python objects (dtype {dtype}), which graphopt does not read (no pickles); "
                        "save numeric arrays")
    if any(d < 0 for d in shape):
        raise DataError(f"{where}: header declares a negative dim {list(shape)}")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_INPUT_ARRAY_BYTES:
        raise DataError(f"{where}: header declares {list(shape)} {dtype} ({nbytes} bytes), over the "
                        f"{MAX_INPUT_ARRAY_BYTES} byte cap for input arrays")
    available -= f.tell()  # what follows the header
    if nbytes > available:
        raise DataError(f"{where}: header declares {nbytes} bytes of data but only {available} are stored "
                        "(truncated or forged file)")
    return tuple(shape), dtype, fortran, nbytes


def _read_npy(f, where: str, available: int) -> np.ndarray:
    shape, dtype, fortran, nbytes = _npy_header(f, where, available)
    data = bytearray(nbytes)  # read in place: one copy of the array in memory, writable
    view, got = memoryview(data), 0
    while got < nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise DataError(f"{where}: truncated: {got} of {nbytes} data bytes")
        got += n
    arr = np.frombuffer(data, dtype=dtype)
    return arr.reshape(shape[::-1]).transpose() if fortran else arr.reshape(shape)


def _read_npz(path: Path) -> Feed:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise DataError(f"{path}: not a valid .npz (zip) file: {_first_line(e)}") from None
    with zf:
        members = zf.infolist()
        if len(members) > MAX_NPZ_MEMBERS:
            raise DataError(f"{path}: holds {len(members)} entries, over the {MAX_NPZ_MEMBERS} cap")
        # Uncompressed sizes as the zip directory declares them: a zip bomb is refused here.
        declared = sum(m.file_size for m in members)
        if declared > MAX_INPUT_ARRAY_BYTES:
            raise DataError(f"{path}: its entries expand to {declared} bytes, over the "
                            f"{MAX_INPUT_ARRAY_BYTES} byte cap for input arrays (zip bomb?)")
        feed: Feed = {}
        for m in members:
            if m.is_dir():
                continue
            name = m.filename[:-4] if m.filename.endswith(".npy") else m.filename
            where = f"{path}: array '{name}'"
            try:
                with zf.open(m) as f:
                    feed[name] = _read_npy(f, where, m.file_size)
            except DataError:
                raise
            except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError) as e:
                raise DataError(f"{where}: cannot read: {_first_line(e)}") from None
        return feed


def _read_one(path: Path, specs: Sequence[TensorSpec]) -> Feed:
    """One .npz/.npy file as a feed: a regular file, sizes checked before any array is read."""
    size = check_regular_file(path, "inputs file").st_size
    if size > MAX_INPUT_FILE_BYTES:
        raise DataError(f"{path}: {size} bytes is over the {MAX_INPUT_FILE_BYTES} byte cap for an inputs file")
    try:
        with open(path, "rb") as f:
            head = f.read(6)
            f.seek(0)
            if head != b"\x93NUMPY":
                if zipfile.is_zipfile(f):
                    return _read_npz(path)
                raise DataError(f"{path}: cannot read inputs (.npz/.npy expected): neither an .npy array nor a zip")
            arr = _read_npy(f, str(path), size)
    except OSError as e:
        raise DataError(f"{path}: cannot read inputs file: {e.strerror or e}") from None
    if len(specs) != 1:
        raise DataError(
            f"{path}: a .npy file holds one array but the model has {len(specs)} inputs "
            f"({', '.join(s.name for s in specs)}); use an .npz with one array per input name"
        )
    return {specs[0].name: arr}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
    """Feeds from an .npz/.npy file or a directory of them (sorted by name).

    Only regular files are read; a FIFO, socket or device (given directly or
    found in the folder) is refused from its ``stat``, never opened.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{path}: inputs file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read inputs: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy"))
        if not files:
            raise DataError(f"{path}: directory holds no .npz or .npy files")
        if len(files) > MAX_INPUT_FILES:
            raise DataError(f"{path}: {len(files)} inputs files, over the cap of {MAX_INPUT_FILES}")
    else:
        files = [path]
    feeds, total = [], 0
    for f in files:
        feed = check_feed(_read_one(f, specs), specs, str(f))
        total += sum(a.nbytes for a in feed.values())
        if total > MAX_INPUTS_TOTAL_BYTES:
            raise DataError(f"{path}: the inputs add up to {total} bytes (and counting), over the "
                            f"{MAX_INPUTS_TOTAL_BYTES} byte cap for all inputs together; pass fewer files")
        feeds.append(feed)
    return feeds


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


