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

import logging
import math
import os
import stat
import zipfile
from dataclasses import dataclass
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
        out[s.name] = np.asarray(arr, order="C")
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


# --------------------------------------------------------------------------- generated inputs
#
# Integer inputs are ids, lengths, masks or selectors: Gaussian noise, or any
# fixed range, makes a real model index out of bounds or pick a branch it was
# never meant to take. The rule: follow each integer input forward through ops
# that pass its values on unchanged (Cast, Reshape, Unsqueeze, Concat, TopK's
# values, ...), or shift them by a constant (Add/Sub), to the ops that give them
# a meaning, and take the tightest range those uses allow:
#   - an index (Gather, GatherElements/ND, Scatter*, OneHot): [0, the indexed dim);
#   - a sequence length (sequence_lens of RNN/GRU/LSTM): the sequence dim itself;
#   - with no bound from those, compared for equality with constants (a selector
#     such as a sample rate, a one-hot via Equal): one of those constants;
#   - otherwise [0, 2): 0 and 1 are valid as an index into any dim of size 2 or
#     more, as a mask value and as a flag.
# Uses that cannot fail on any value (Shape, comparisons, float arithmetic after a
# Cast) bound nothing. Subgraph bodies (If/Loop/Scan) are followed too.

#: Ops whose output(s) carry the values of the listed inputs unchanged; None = every input.
_VALUE_PRESERVING: dict[str, tuple[int, ...] | None] = {
    "Identity": (0,), "Cast": (0,), "CastLike": (0,), "Reshape": (0,), "Flatten": (0,), "Squeeze": (0,),
    "Unsqueeze": (0,), "Transpose": (0,), "Expand": (0,), "Tile": (0,), "Slice": (0,), "Gather": (0,),
    "GatherElements": (0,), "GatherND": (0,), "Concat": None, "Split": (0,), "ReduceMax": (0,),
    "ReduceMin": (0,), "Max": None, "Min": None, "Where": (1, 2), "SpaceToDepth": (0,),
    "DepthToSpace": (0,), "Compress": (0,),
}
#: Ops with several outputs of which only some carry the input's values.
_VALUE_OUTPUTS = {"TopK": (0,)}
_RECURRENT = ("RNN", "GRU", "LSTM")


@dataclass
class IntDomain:
    """The values generated for one integer input: a fixed value, a choice of constants, or [low, high)."""

    low: int = 0
    high: int = 2
    choices: tuple[int, ...] = ()
    why: str = "no use bounds it"

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        if self.choices:
            return rng.choice(np.asarray(self.choices, dtype=np.int64), size=shape).astype(dtype)
        return rng.integers(self.low, self.high, size=shape).astype(dtype)


class _Uses:
    """What the uses of one integer input allow, gathered while walking forward from it."""

    def __init__(self):
        self.low, self.high = None, None  # hard bound from indexing uses
        self.lengths: set[int] = set()
        self.equals: set[int] = set()
        self.why: list[str] = []

    def bound(self, low: int, high: int, why: str) -> None:
        self.low = low if self.low is None else max(self.low, low)
        self.high = high if self.high is None else min(self.high, high)
        self.why.append(why)


def _const_of(tensor) -> np.ndarray | None:
    """The value of a graphsurgeon tensor that is a constant (initializer or Constant node), else None.

    Read through :func:`graphopt.ir.array` (a large model's lazy weights as memory maps); a
    constant whose bytes cannot be read counts as unknown.
    """
    import onnx_graphsurgeon as gs

    from .ir import array

    const = tensor if isinstance(tensor, gs.Constant) else None
    if const is None and len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        attrs = tensor.inputs[0].attrs
        if isinstance(attrs.get("value"), gs.Constant):
            const = attrs["value"]
    if const is not None:
        try:
            return array(const)
        except ValueError:
            return None
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        attrs = tensor.inputs[0].attrs
        for k in ("value_int", "value_ints"):
            if k in attrs:
                return np.asarray(attrs[k], dtype=np.int64)
    return None


def _dim(tensor, axis: int) -> int | None:
    shape = getattr(tensor, "shape", None)
    if shape is None:
        value = _const_of(tensor)
        shape = value.shape if value is not None else None
    if shape is None or not len(shape):
        return None
    if not -len(shape) <= axis < len(shape):
        return None
    d = shape[axis]
    return int(d) if isinstance(d, (int, np.integer)) and d > 0 else None


def _follow(tensor, shift: int, uses: _Uses, seen: set, depth: int = 0) -> None:
    """Record what each consumer of ``tensor`` (whose values are the input's plus ``shift``) allows."""
    import onnx_graphsurgeon as gs

    if (id(tensor), shift) in seen or depth > 200:
        return
    seen.add((id(tensor), shift))
    for node in list(tensor.outputs):
        slots = [i for i, t in enumerate(node.inputs) if t is tensor]
        op, attrs = node.op, node.attrs
        label = f"{op} '{node.name}'" if node.name else op
        for slot in slots:
            if op in ("Gather", "GatherElements", "ScatterElements", "Scatter") and slot == 1:
                dim = _dim(node.inputs[0], int(attrs.get("axis", 0)))
                if dim:
                    uses.bound(-shift, dim - shift, f"indexes {label} (dim {dim})")
            elif op in ("GatherND", "ScatterND") and slot == 1:
                shape = getattr(node.inputs[0], "shape", None) or []
                b = int(attrs.get("batch_dims", 0))
                dims = [d for d in list(shape)[b:] if isinstance(d, (int, np.integer)) and d > 0]
                if dims:
                    uses.bound(-shift, min(dims) - shift, f"indexes {label} (dims {dims})")
            elif op == "OneHot" and slot == 0:
                depth_v = _const_of(node.inputs[1])
                if depth_v is not None and depth_v.size == 1:
                    uses.bound(-shift, int(depth_v.reshape(())) - shift, f"is one-hot encoded by {label}")
            elif op in _RECURRENT and slot == 4:
                t = _dim(node.inputs[0], 1 if attrs.get("layout", 0) else 0)
                if t:
                    uses.lengths.add(t - shift)
                    uses.why.append(f"is the sequence length of {label} ({t})")
            elif op == "Equal":
                other = _const_of(node.inputs[1 - slot]) if len(node.inputs) == 2 else None
                if other is not None and other.dtype.kind in "iu" and other.size <= 1 << 16:
                    uses.equals.update(int(v) - shift for v in np.unique(other))
            elif op in ("Add", "Sub") and len(node.inputs) == 2:
                c = _const_of(node.inputs[1 - slot])
                if c is not None and c.size == 1 and c.dtype.kind in "iu" and not (op == "Sub" and slot == 1):
                    step = int(c.reshape(()))
                    for out in node.outputs:
                        _follow(out, shift + (step if op == "Add" else -step), uses, seen, depth + 1)
            elif op in ("Loop", "Scan") and isinstance(attrs.get("body"), gs.Graph):
                # Loop: inputs 2.. are the first values of the body's inputs 2..; Scan (opset 9+):
                # states then scanned tensors, whose slices the body's inputs receive, in the same order.
                body = attrs["body"]
                if (op == "Scan" or slot >= 2) and len(node.inputs) == len(body.inputs):
                    _follow(body.inputs[slot], shift, uses, seen, depth + 1)
            elif op in _VALUE_OUTPUTS:
                if slot == 0:
                    for k in _VALUE_OUTPUTS[op]:
                        if k < len(node.outputs):
                            _follow(node.outputs[k], shift, uses, seen, depth + 1)
            elif op in _VALUE_PRESERVING:
                carriers = _VALUE_PRESERVING[op]
                if carriers is None or slot in carriers:
                    for out in node.outputs:
                        _follow(out, shift, uses, seen, depth + 1)


#: Models smaller than this get their shapes inferred for :func:`integer_domains` when they
#: carry none (inference copies the model; large ones rely on what they declare).
_INFER_SHAPES_BELOW = 256 << 20


def integer_domains(graph: Graph) -> dict[str, IntDomain]:
    """For each integer graph input, the values :func:`generate_inputs` draws from (see the rule above).

    Indexed dims come from initializers, Constant nodes and the graph's shape
    information (inferred here when the graph carries none and is not large).
    """
    ints = [s for s in graph.inputs if s.dtype != "unknown" and np.dtype(s.dtype).kind in "iu"]
    if not ints:
        return {}
    if not graph.graph.value_info and graph.model.ByteSize() < _INFER_SHAPES_BELOW:
        graph = graph.infer_shapes()  # dims of computed tensors that get indexed
    try:
        from .ir import IR

        tensors = IR(graph).g.tensors()  # through graphopt.ir, so lazy weights read from disk
    except Exception as e:  # noqa: BLE001 - an aid to generation only: fall back to the small default range
        logging.getLogger("graphopt.data").debug("integer input uses not followed (%s: %s)", type(e).__name__, e)
        tensors = {}
    out: dict[str, IntDomain] = {}
    for spec in ints:
        info = np.iinfo(np.dtype(spec.dtype))
        uses = _Uses()
        if spec.name in tensors:
            _follow(tensors[spec.name], 0, uses, set())
        low = max(uses.low if uses.low is not None else info.min, info.min)
        high = min(uses.high if uses.high is not None else int(info.max) + 1, int(info.max) + 1)
        if uses.low is not None and uses.high > 0:
            low = max(low, 0)  # negative indices are valid but not what real inputs hold
        why = "; ".join(dict.fromkeys(uses.why))
        lengths = sorted(v for v in uses.lengths if low <= v < high)
        equals = sorted(v for v in uses.equals if low <= v < high)
        if lengths:
            out[spec.name] = IntDomain(choices=(lengths[-1],), why=why)
        elif uses.low is not None and low < high:
            out[spec.name] = IntDomain(low, high, why=why)
        elif equals:
            out[spec.name] = IntDomain(choices=tuple(equals), why="is compared with constants "
                                       + (f"{equals}" if len(equals) <= 4 else f"{equals[0]}..{equals[-1]}"))
        else:
            out[spec.name] = IntDomain(why=why or "no use bounds it")
    return out


def generate_inputs(graph: Graph, *, seed: int = 0, count: int = 1, dim_value: int = 1) -> list[Feed]:
    """Seeded random feeds for the graph's inputs; symbolic dims take ``dim_value``.

    Floats are standard normal; bools are fair coins; integers follow
    :func:`integer_domains` (indices stay inside what they index, lengths equal
    the sequence length, selectors take the constants they are compared with,
    anything else falls in [0, 2)).
    """
    rng = np.random.default_rng(seed)
    domains = integer_domains(graph)
    for name, d in domains.items():
        values = (f"{d.choices}" if len(d.choices) <= 4 else f"{len(d.choices)} constants") if d.choices \
            else f"[{d.low}, {d.high})"
        logging.getLogger("graphopt.data").debug("generated input '%s': %s (%s)", name, values, d.why)
    feeds: list[Feed] = []
    for _ in range(count):
        feed: Feed = {}
        for s in graph.inputs:
            shape = tuple(d if isinstance(d, int) else dim_value for d in s.shape)
            dt = np.dtype(s.dtype) if s.dtype != "unknown" else np.dtype("float32")
            if dt.kind == "f":
                feed[s.name] = rng.standard_normal(shape).astype(dt)
            elif dt.kind in "iu":
                feed[s.name] = domains[s.name].sample(rng, shape, dt)
            elif dt.kind == "b":
                feed[s.name] = rng.integers(0, 2, size=shape).astype(bool)
            else:
                raise DataError(f"input '{s.name}' has dtype {s.dtype}, which graphopt cannot generate; give real inputs (a .npz file or in-memory feeds)")
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
        option: str | None = None,
    ):
        if sum(x is not None for x in (path, feeds, factory)) > 1:
            raise ValueError("give at most one of path, feeds, factory")
        self.path, self.feeds, self.factory, self.seed = path, feeds, factory, seed
        #: How the user gives real inputs where this source was made (a CLI flag such as
        #: ``--data``); None for the Python API. Only used in messages.
        self.option = option

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

    def cannot_run(self, graph: Graph, error: BaseException) -> DataError:
        """The error for a reference runtime that loaded ``graph`` but failed to run it on these samples.

        The model is not at fault and no pass ran yet, so the message names the
        model and the inputs, and with generated inputs says how to give real ones.
        """
        detail = str(error.__cause__ or error).strip()
        detail = detail.splitlines()[0] if detail else type(error).__name__
        model = graph.source or "the model"
        if self.generated:
            how = (f"{self.option} FILE.npz" if self.option
                   else "data=graphopt.DataSource('FILE.npz') (or feeds=[...])")
            return DataError(
                f"{model}: ONNX Runtime cannot run the original model on generated inputs ({detail}); "
                f"it needs inputs of its own kind: give real ones with {how}, one array per input name"
            )
        return DataError(f"{model}: ONNX Runtime cannot run the original model on the inputs from "
                         f"{self.describe()}: {detail}")

    def reference_outputs(self, graph: Graph, feeds: Sequence[Feed], session=None) -> list[list[np.ndarray]]:
        """ONNX Runtime's outputs of ``graph`` on ``feeds`` (samples of this source).

        A model ONNX Runtime cannot load raises its :class:`ModelError`; one it
        loads but cannot run on these inputs raises :meth:`cannot_run`'s error.
        """
        from .errors import ModelError
        from .reference import reference_session, run_reference

        session = session or reference_session(graph)
        try:
            return run_reference(graph, feeds, session)
        except ModelError as e:
            raise self.cannot_run(graph, e) from e

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


