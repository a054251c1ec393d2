"""The one IR every pass sees: an ONNX model with inferred shapes.

:class:`Graph` wraps an ``onnx.ModelProto``. Passes never change a Graph they
were given: they call :meth:`Graph.copy` (or build a new one) and return it.
Loading checks a file before trusting it: size caps, a parse that fails
cleanly, and external-data locations that must stay inside the model's folder
(checked before a single external byte is read).

Large models (weights on disk)
------------------------------
A protobuf cannot exceed 2 GiB, and a model's weights may be far larger. When
the external data of a loaded model add up to :data:`LAZY_EXTERNAL_BYTES` or
more, each external tensor of at least :data:`LAZY_TENSOR_BYTES` stays on disk:
it remains an ``EXTERNAL`` ``TensorProto`` in ``graph.model`` (name, dtype and
dims as usual, no data) whose ``location`` is the *absolute*, already
validated path of its file. Such a tensor is **lazy** (:func:`is_lazy`). The
contract for pass authors and for every consumer of ``graph.model``:

* read tensor values with :meth:`Graph.array` or :func:`tensor_array` (a
  read-only memory map for a lazy tensor); ``onnx.numpy_helper.to_array`` and
  onnx-graphsurgeon's ``LazyValues.load`` refuse it (onnx rejects absolute
  locations), so a pass that forgets this fails loudly instead of reading a
  file relative to the working directory;
* a lazy tensor may be renamed, moved or dropped like any other; a new value
  is an ordinary inline tensor;
* :meth:`Graph.copy` copies the skeleton only; :meth:`Graph.to_bytes`
  serializes the skeleton (it raises :class:`ModelError` rather than exceed
  2 GiB); :meth:`Graph.save` writes large tensors as external data beside the
  model; :meth:`Graph.infer_shapes` and :meth:`Graph.check` run on a
  weight-stripped skeleton; the reference runtime and the TVM importer get
  the weights as memory maps (no copy into one protobuf anywhere).

Smaller models load exactly as before: every tensor inline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import ModelError, OptionError
from .fsutil import atomic_write_bytes

#: Largest .onnx file (the protobuf itself) we read; protobuf cannot exceed 2 GiB.
MAX_PROTO_BYTES = 2 << 30
#: Default cap on the sum of external-data bytes a model may reference.
MAX_EXTERNAL_BYTES = 32 << 30
#: A loaded model whose external data reach this many bytes keeps its large tensors on disk (lazy).
LAZY_EXTERNAL_BYTES = 1 << 30
#: ... each external tensor of at least this many bytes, that is; smaller ones are read inline.
LAZY_TENSOR_BYTES = 1 << 20
#: Inline tensors of at least this many bytes leave the skeleton used for shape inference and checks.
_STRIP_BYTES = 1 << 16


#: Element types whose bytes numpy (and ONNX Runtime's numpy bridge) read as they are.
_PLAIN_TYPES = {getattr(onnx.TensorProto, n) for n in (
    "FLOAT", "DOUBLE", "FLOAT16", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "BOOL")}


def _external_info(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def is_lazy(t: onnx.TensorProto) -> bool:
    """True for a tensor whose data stay on disk (see the module docstring)."""
    return t.data_location == onnx.TensorProto.EXTERNAL and os.path.isabs(_external_info(t).get("location", ""))


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """Bytes of the tensor's values (without reading them)."""
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    return int(np.prod(t.dims, dtype=np.int64)) * dtype.itemsize


def tensor_array(t: onnx.TensorProto) -> np.ndarray:
    """The values of ``t``: a read-only memory map for a lazy tensor, ``numpy_helper.to_array`` otherwise."""
    if not is_lazy(t):
        return numpy_helper.to_array(t)
    info = _external_info(t)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    if t.data_type not in _PLAIN_TYPES:
        raise ModelError(f"initializer '{t.name}': lazy tensors of type {dtype} are not supported")
    shape = tuple(int(d) for d in t.dims)
    offset = int(info.get("offset", 0) or 0)
    if int(np.prod(shape, dtype=np.int64)) == 0:
        return np.zeros(shape, dtype)
    try:
        return np.memmap(info["location"], dtype=dtype.newbyteorder("<"), mode="r", offset=offset, shape=shape)
    except (OSError, ValueError) as e:
        raise ModelError(f"initializer '{t.name}': cannot map its data in {info['location']}: {e}") from e



def write_aligned(f, offset: int, t: onnx.TensorProto, location: str, stub: onnx.TensorProto,
                  align: int = 64) -> tuple[int, int]:
    """Stream ``t``'s bytes into ``f`` (now at ``offset``) from the next ``align``-byte boundary.

    ``stub`` becomes an external-data reference to them in ``location``.
    Returns (where the bytes start, how many), so the caller's next offset is
    their sum. Shared by :meth:`Graph.save` and the artifact's ``weights.bin``.
    """
    pad = (-offset) % align
    f.write(b"\0" * pad)
    start, n = offset + pad, 0
    for chunk in iter_chunks(t):
        f.write(chunk)
        n += len(chunk)
    stub.data_location = onnx.TensorProto.EXTERNAL
    del stub.external_data[:]
    for k, v in (("location", location), ("offset", str(start)), ("length", str(n))):
        e = stub.external_data.add()
        e.key, e.value = k, v
    return start, n


def iter_chunks(t: onnx.TensorProto, chunk: int = 64 << 20) -> Iterator[bytes]:
    """The raw little-endian bytes of ``t`` in chunks of at most ``chunk`` bytes, without holding them all.

    For a lazy tensor this streams from its file; for an inline one it serializes once.
    """
    if not is_lazy(t):
        data = np.asarray(numpy_helper.to_array(t), order="C").tobytes()
        for i in range(0, len(data), chunk):
            yield data[i:i + chunk]
        return
    info = _external_info(t)
    remaining = tensor_nbytes(t)
    with open(info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0) or 0))
        while remaining > 0:
            data = f.read(min(chunk, remaining))
            if not data:
                raise ModelError(f"initializer '{t.name}': its data in {info['location']} end early")
            remaining -= len(data)
            yield data


def _copy_fields(dst, src, skip: str) -> None:
    """Copy every set field of message ``src`` into ``dst`` except the one named ``skip``."""
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _stub(t: onnx.TensorProto, how: str) -> onnx.TensorProto:
    """A data-free stand-in for a large tensor: same name and dtype.

    ``how="external"`` keeps the dims and points at a location that does not exist
    (enough for shape inference and for ONNX Runtime, which gets the data separately);
    ``how="empty"`` is an empty inline tensor, for the checker, which would look
    for the external file.
    """
    s = onnx.TensorProto(name=t.name, data_type=t.data_type)
    if how == "external":
        s.dims.extend(t.dims)
        s.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", "graphopt-weights-not-loaded"), ("offset", "0"), ("length", str(tensor_nbytes(t)))):
            e = s.external_data.add()
            e.key, e.value = k, v
    else:
        s.dims.append(0)
    return s


def skeleton(model: onnx.ModelProto, how: str = "external",
             min_bytes: int = _STRIP_BYTES) -> tuple[onnx.ModelProto, list[tuple[int, onnx.TensorProto]]]:
    """A copy of ``model`` whose lazy and large main-graph initializers are stubs (see :func:`_stub`).

    Returns the copy and ``(index in graph.initializer, original tensor)`` for
    each stubbed tensor. Only the skeleton is copied: a stubbed tensor's data are
    never touched.
    """
    out = onnx.ModelProto()
    _copy_fields(out, model, skip="graph")
    _copy_fields(out.graph, model.graph, skip="initializer")
    stubbed = []
    for i, t in enumerate(model.graph.initializer):
        if is_lazy(t) or (t.data_location != onnx.TensorProto.EXTERNAL and t.data_type in _PLAIN_TYPES
                          and tensor_nbytes(t) >= min_bytes):
            out.graph.initializer.append(_stub(t, how))
            stubbed.append((i, t))
        else:
            out.graph.initializer.append(t)
    return out, stubbed


@dataclass(frozen=True)
class TensorSpec:
    """Name, numpy dtype name and shape of a graph input or output.

    ``shape`` holds ints for fixed dims and strings for symbolic ones
    (``"batch"``); ``"?"`` marks a dim with neither a value nor a name.
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def _value_spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    tt = vi.type.tensor_type
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).name if tt.elem_type else "unknown"
    dims: list[int | str] = []
    if tt.HasField("shape"):
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            elif d.dim_param:
                dims.append(d.dim_param)
            else:
                dims.append("?")
    return TensorSpec(vi.name, dtype, tuple(dims))


def _graph_tensors(graph: onnx.GraphProto | onnx.FunctionProto, where: str) -> Iterator[tuple[str, onnx.TensorProto]]:
    """(description, tensor) for every TensorProto a graph or function holds, recursively."""
    for t in getattr(graph, "initializer", ()):
        yield f"{where}initializer '{t.name}'", t
    for sp in getattr(graph, "sparse_initializer", ()):
        yield f"{where}sparse initializer '{sp.values.name}' (values)", sp.values
        yield f"{where}sparse initializer '{sp.values.name}' (indices)", sp.indices
    for node in graph.node:
        for attr in node.attribute:
            at = f"{where}node '{node.name or node.op_type}' attribute '{attr.name}'"
            if attr.HasField("t"):
                yield at, attr.t
            for t in attr.tensors:
                yield at, t
            sparse = ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors)
            for sp in sparse:  # Constant's sparse_value, among others
                yield f"{at} (sparse values)", sp.values
                yield f"{at} (sparse indices)", sp.indices
            subgraphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
            for g in subgraphs:  # If/Loop/Scan bodies
                yield from _graph_tensors(g, f"{where}subgraph '{g.name}' of node '{node.name or node.op_type}': ")


def _described_tensors(model: onnx.ModelProto | onnx.GraphProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """(description, tensor) for every TensorProto of a model, wherever it sits (see :func:`_all_tensors`)."""
    if isinstance(model, onnx.GraphProto):
        yield from _graph_tensors(model, "")
        return
    yield from _graph_tensors(model.graph, "")
    for fn in model.functions:
        yield from _graph_tensors(fn, f"function '{fn.domain}.{fn.name}': ")


def _all_tensors(model: onnx.ModelProto | onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a model (or graph), wherever it sits.

    Initializers and sparse initializers (values and indices), tensor and
    sparse-tensor attributes (``Constant``'s ``value``/``sparse_value``),
    subgraphs of ``If``/``Loop``/``Scan`` at any depth, and (given a model)
    the nodes of model-local functions. Anything that can hold external data
    is here, so checking and loading through this walk leaves no tensor behind.
    """
    for _, tensor in _described_tensors(model):
        yield tensor


def _check_external_data(model: onnx.ModelProto, model_path: Path, max_bytes: int) -> None:
    """Refuse external-data entries that escape the model's folder, are not regular files or overrun them.

    Every tensor of :func:`_all_tensors` is checked (ONNX Runtime would resolve
    a sparse initializer's external data against the *current* directory, so a
    location must never reach it unresolved; see :func:`_load_external_data`).
    """
    base = model_path.parent.resolve()
    total = 0
    for desc, tensor in _described_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        where = f"{model_path}: {desc}"
        if not location:
            raise ModelError(f"{where} has external data without a location")
        rel = Path(location)
        if rel.is_absolute() or ".." in rel.parts:
            raise ModelError(
                f"{where} points its external data at '{location}', outside the model's folder; "
                "external data must be a relative path inside the folder of the .onnx file"
            )
        target = base / rel
        if target.is_symlink() or not target.resolve().is_relative_to(base):
            raise ModelError(f"{where}: external data '{location}' is a link or resolves outside {base}")
        if not target.is_file():  # stat only: a FIFO or device is refused here, never opened
            raise ModelError(f"{where}: external data file '{location}' not found next to the model "
                             "(or not a regular file)")
        size = target.stat().st_size
        try:
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if info.get("length") else size - offset
        except ValueError:
            raise ModelError(f"{where}: external data offset/length must be integers") from None
        if offset < 0 or length < 0 or offset + length > size:
            raise ModelError(
                f"{where}: external data range {offset}+{length} is outside '{location}' ({size} bytes)"
            )
        total += length
        if total > max_bytes:
            raise ModelError(f"{model_path}: external data exceeds the {max_bytes} byte cap")


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Read external data inline, except that a large model's large tensors stay lazy (on disk).

    Runs after :func:`_check_external_data`, so every location is a checked
    relative path inside the model's folder.
    """
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    total = sum(tensor_nbytes(t) for t in _all_tensors(model) if uses_external_data(t))
    base = path.parent.resolve()
    if total >= LAZY_EXTERNAL_BYTES:
        # Only main-graph initializers stay lazy: Constant attributes and subgraph tensors are read inline.
        for t in model.graph.initializer:
            if uses_external_data(t) and tensor_nbytes(t) >= LAZY_TENSOR_BYTES and t.data_type in _PLAIN_TYPES:
                info = _external_info(t)
                target = (base / info["location"]).resolve()
                offset = int(info.get("offset", 0) or 0)
                if offset + tensor_nbytes(t) > target.stat().st_size:
                    raise ModelError(f"{path}: initializer '{t.name}': its external data end before its "
                                     f"{tensor_nbytes(t)} bytes")
                del t.external_data[:]
                for k, v in (("location", str(target)), ("offset", str(offset)), ("length", str(tensor_nbytes(t)))):
                    e = t.external_data.add()
                    e.key, e.value = k, v
    # Everything else is read inline, sparse tensors included: ONNX Runtime would resolve those
    # against the *current* directory, so no external location may be left for it to resolve.
    for desc, t in _described_tensors(model):
        if uses_external_data(t) and not is_lazy(t):
            try:
                load_external_data_for_tensor(t, str(base))
            except Exception as e:
                raise ModelError(f"{path}: {desc}: cannot read external data: {e}") from e
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]


def _check_has_outputs(model: onnx.ModelProto, where: str) -> None:
    """A model without graph outputs computes nothing: refuse it by name."""
    if not model.graph.output:
        raise ModelError(f"{where}: the model has no graph outputs, so there is nothing to compute or verify; "
                         "export it with its outputs declared")


class Graph:
    """An ONNX model plus where it came from. Treat the wrapped proto as read-only.

    ``graph.model`` may hold lazy tensors (weights left on disk); see the module
    docstring for how to read them.
    """

    def __init__(self, model: onnx.ModelProto, source: str | None = None):
        self._model = model
        self.source = source

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | os.PathLike, *, max_external_bytes: int = MAX_EXTERNAL_BYTES) -> "Graph":
        """Read and validate an .onnx file (and its external data, checked first)."""
        path = Path(path)
        if not path.exists():
            raise ModelError(f"{path}: no such file")
        if path.is_dir():
            raise ModelError(f"{path}: is a directory, expected an .onnx file")
        size = path.stat().st_size
        if size == 0:
            raise ModelError(f"{path}: file is empty, expected an ONNX model")
        if size > MAX_PROTO_BYTES:
            raise ModelError(f"{path}: {size} bytes is over the 2 GiB protobuf limit; store weights as external data")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ModelError(f"{path}: cannot read: {e.strerror}") from e
        model = onnx.ModelProto()
        try:
            model.ParseFromString(data)
        except Exception as e:  # protobuf raises DecodeError (and others) on corrupt input
            raise ModelError(f"{path}: not a valid ONNX model (truncated or corrupt file: {e})") from e
        if not model.graph.node and not model.graph.output:
            raise ModelError(f"{path}: not a valid ONNX model (no graph found; truncated or not an .onnx file?)")
        _check_has_outputs(model, str(path))
        _check_external_data(model, path, max_external_bytes)
        try:
            _load_external_data(model, path)
        except ModelError:
            raise
        except Exception as e:
            raise ModelError(f"{path}: cannot read external data: {e}") from e
        graph = cls(model, source=str(path))
        graph.check(where=str(path))
        return graph

    def check(self, where: str = "model") -> None:
        """Run the ONNX checker (on the weight-stripped skeleton); a failure is a :class:`ModelError` naming ``where``."""
        model, _ = skeleton(self._model, how="empty", min_bytes=LAZY_TENSOR_BYTES)
        if model.ByteSize() >= MAX_PROTO_BYTES:
            return  # the checker cannot take protos this large in memory
        try:
            onnx.checker.check_model(model)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"{where}: invalid ONNX model: {first}") from e

    # ----------------------------------------------------------------- saving
    def to_bytes(self) -> bytes:
        """The model as one protobuf (lazy tensors as references to their files).

        Raises :class:`ModelError` when that would exceed protobuf's 2 GiB limit:
        :meth:`save` such a model, which writes large tensors as external data.
        """
        size = self._model.ByteSize()
        if size >= MAX_PROTO_BYTES:
            raise ModelError(f"{self.source or 'model'}: {size} bytes do not fit in one protobuf (2 GiB limit); "
                             "save it with its weights as external data")
        return self._model.SerializeToString(deterministic=True)

    def digest(self) -> str:
        """SHA-256 identifying the model's content: the protobuf, and the bytes of every lazy tensor.

        Where a lazy tensor's file lives does not enter it, so the same model gives
        the same digest from any folder (for a model without lazy tensors it is the
        SHA-256 of :meth:`to_bytes`).
        """
        import hashlib

        if not self.has_lazy_tensors:
            return hashlib.sha256(self.to_bytes()).hexdigest()
        model, stubbed = skeleton(self._model, how="external", min_bytes=1 << 62)
        h = hashlib.sha256(model.SerializeToString(deterministic=True))
        for _, t in stubbed:
            for chunk in iter_chunks(t):
                h.update(chunk)
        return h.hexdigest()

    @property
    def has_lazy_tensors(self) -> bool:
        return any(is_lazy(t) for t in self.graph.initializer)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model to ``path`` atomically.

        Small models are written as one file with their weights inline. A model with
        lazy tensors, or one too large for one protobuf, gets its tensors of
        :data:`LAZY_TENSOR_BYTES` or more written (streamed) to ``<name>.data``
        beside it as ONNX external data; both files appear only once complete.
        """
        path = Path(path)
        if not self.has_lazy_tensors and self._model.ByteSize() < MAX_PROTO_BYTES - (64 << 20):
            atomic_write_bytes(path, self.to_bytes())
            return path
        data_path = path.with_name(path.name + ".data")
        sources = {str(Path(_external_info(t)["location"])) for t in self.graph.initializer if is_lazy(t)}
        if str(data_path.resolve()) in sources:
            raise ModelError(f"{path}: saving here would overwrite '{data_path.name}', which holds this model's "
                             "weights; choose another output path")
        model, stubbed = skeleton(self._model, how="external", min_bytes=LAZY_TENSOR_BYTES)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_beside(data_path)
        try:
            offset = 0
            with open(tmp, "wb") as f:
                for i, orig in stubbed:
                    start, n = write_aligned(f, offset, orig, data_path.name, model.graph.initializer[i])
                    offset = start + n
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, data_path)
            try:
                atomic_write_bytes(path, model.SerializeToString(deterministic=True))
            except BaseException:
                data_path.unlink(missing_ok=True)
                raise
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    # ------------------------------------------------------------- accessors
    @property
    def model(self) -> onnx.ModelProto:
        return self._model

    @property
    def graph(self) -> onnx.GraphProto:
        return self._model.graph

    def copy(self) -> "Graph":
        """A deep copy (lazy tensors stay on disk, so only the skeleton is copied for a large model)."""
        m = onnx.ModelProto()
        m.CopyFrom(self._model)
        return Graph(m, self.source)

    @property
    def opset(self) -> int:
        for imp in self._model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                return int(imp.version)
        return 0

    @property
    def inputs(self) -> list[TensorSpec]:
        """Real graph inputs (initializers listed as inputs by old exporters are skipped)."""
        inits = {t.name for t in self.graph.initializer}
        return [_value_spec(v) for v in self.graph.input if v.name not in inits]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [_value_spec(v) for v in self.graph.output]

    def initializers(self) -> dict[str, onnx.TensorProto]:
        return {t.name: t for t in self.graph.initializer}

    def array(self, name: str) -> np.ndarray:
        """Values of initializer ``name`` (read-only memory map for a lazy tensor)."""
        return tensor_array(self.initializers()[name])

    def value_specs(self) -> dict[str, TensorSpec]:
        """Specs of every typed value: inputs, outputs, value_info and initializers."""
        specs = {v.name: _value_spec(v) for v in self.graph.value_info}
        specs.update({v.name: _value_spec(v) for v in self.graph.input})
        specs.update({v.name: _value_spec(v) for v in self.graph.output})
        for t in self.graph.initializer:
            specs[t.name] = TensorSpec(
                t.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).name, tuple(t.dims)
            )
        return specs

    # -------------------------------------------------------- transformations
    def infer_shapes(self) -> "Graph":
        """A copy with value_info recomputed (stale entries dropped first).

        Inference runs on a skeleton without the large weights (it needs their
        dims, not their values), so no model is serialized whole.
        """
        g = self.copy()
        # No data propagation: ONNX materializes propagated values without a size cap (ConstantOfShape
        # of 2^30 elements took 23 GB); shape arithmetic is folded by fold-constants, under its caps.
        del g.graph.value_info[:]
        stripped, _ = skeleton(g.model, how="external")
        try:
            inferred = onnx.shape_inference.infer_shapes(stripped, strict_mode=False, data_prop=False)
        except Exception:
            # Shape inference is an aid, not a requirement: some valid models
            # (custom domains, odd opsets) defeat it.
            return g
        # Put the real tensors back in place of the stubs (shape inference keeps initializer order).
        inits = list(g.graph.initializer)
        if len(inferred.graph.initializer) != len(inits):  # pragma: no cover - guards an onnx change
            return g
        del inferred.graph.initializer[:]
        inferred.graph.initializer.extend(inits)
        return Graph(inferred, self.source)

    def with_input_shapes(self, shapes: Mapping[str, Iterable[int]]) -> "Graph":
        """A copy whose named inputs have the given fixed dims, shapes re-inferred.

        Unknown names, rank changes and changes to dims that were already fixed
        are rejected, since they could not describe the same model.
        """
        if not shapes:
            return self
        g = self.copy()
        by_name = {v.name: v for v in g.graph.input}
        valid = ", ".join(s.name for s in self.inputs)
        for name, dims in shapes.items():
            dims = [int(d) for d in dims]
            if name not in by_name:
                raise OptionError(f"input shape for '{name}': the model has no input '{name}' (inputs: {valid})")
            vi = by_name[name]
            old = _value_spec(vi)
            if len(old.shape) != len(dims):
                raise OptionError(
                    f"input shape for '{name}': model input has rank {len(old.shape)} {list(old.shape)}, "
                    f"got {len(dims)} dims {dims}"
                )
            for i, (o, n) in enumerate(zip(old.shape, dims)):
                if n <= 0:
                    raise OptionError(f"input shape for '{name}': dim {i} must be positive, got {n}")
                if isinstance(o, int) and o != n:
                    raise OptionError(f"input shape for '{name}': dim {i} is fixed to {o} by the model, got {n}")
            shape = vi.type.tensor_type.shape
            for d, n in zip(shape.dim, dims):
                d.Clear()
                d.dim_value = n
        # Outputs keep their symbolic dims otherwise, which would contradict inference.
        for out in g.graph.output:
            for d in out.type.tensor_type.shape.dim:
                if not (d.HasField("dim_value") and d.dim_value > 0):
                    d.Clear()
        return g.infer_shapes()

    def with_input_values(self, values: Mapping[str, object]) -> "Graph":
        """A copy in which each named input is a constant (an initializer) of the given value.

        The dtype is the input's; a value whose element count matches the
        input's fixed dims takes that shape (a scalar for a rank-0 input).
        Dependent branches, pads and shapes can then fold. Unknown names, values
        that do not fit the dtype (fractions or out-of-range numbers for integer
        inputs) and element counts that do not match are rejected.
        """
        if not values:
            return self
        g = self.copy()
        by_name = {v.name: v for v in g.graph.input}
        specs = {s.name: s for s in self.inputs}
        valid = ", ".join(specs) or "none"
        kept = []
        for name, value in values.items():
            if name not in specs:
                raise OptionError(f"input value for '{name}': the model has no input '{name}' (inputs: {valid})")
            spec = specs[name]
            if spec.dtype == "unknown":
                raise OptionError(f"input value for '{name}': the input has no tensor dtype to convert the value to")
            dtype = np.dtype(spec.dtype)
            try:
                raw = np.asarray(value)
                if dtype.kind in "iu":
                    if raw.dtype.kind == "f" and not np.all(np.isfinite(raw) & (raw == np.round(raw))):
                        raise ValueError(f"{name} is an integer input ({dtype}), got {value!r}")
                    info = np.iinfo(dtype)
                    if raw.size and (np.min(raw) < info.min or np.max(raw) > info.max):
                        raise ValueError(f"{value!r} is out of range for {dtype}")
                elif dtype.kind == "b" and raw.dtype.kind not in "biu":
                    raise ValueError(f"{name} is a bool input, got {value!r}")
                arr = raw.astype(dtype)
            except (TypeError, ValueError) as e:
                raise OptionError(f"input value for '{name}': {e}") from None
            if spec.is_static and int(np.prod(spec.shape, dtype=np.int64)) == arr.size:
                arr = arr.reshape(spec.shape)
            elif arr.ndim != len(spec.shape) or any(
                    isinstance(d, int) and d != n for d, n in zip(spec.shape, arr.shape)):
                raise OptionError(
                    f"input value for '{name}': the input has shape {list(spec.shape)}, got {arr.size} value(s) "
                    f"of shape {list(arr.shape)}")
            g.graph.initializer.append(numpy_helper.from_array(arr, name))
            kept.append(name)
        remaining = [v for v in g.graph.input if v.name not in kept]
        del g.graph.input[:]
        g.graph.input.extend(remaining)
        del by_name
        return g

    def __repr__(self) -> str:
        return f"Graph({self.source or 'in-memory'}, nodes={len(self.graph.node)}, opset={self.opset})"


def _temp_beside(path: Path) -> str:
    """A new empty file next to ``path`` (same filesystem, so it can be renamed onto it), mode per umask."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    return tmp


def parse_input_shapes(specs: Iterable[str]) -> dict[str, list[int]]:
    """Parse ``name:1,3,224,224`` strings (the ``--input-shape`` syntax)."""
    out: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        if not sep or not name:
            raise OptionError(f"--input-shape '{spec}': expected NAME:D1,D2,... such as x:1,3,224,224")
        try:
            out[name] = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            raise OptionError(f"--input-shape '{spec}': dims must be integers, e.g. {name}:1,3,224,224") from None
        if not out[name]:
            raise OptionError(f"--input-shape '{spec}': no dims given")
    return out


def parse_input_values(specs: Iterable[str]) -> dict[str, np.ndarray]:
    """Parse ``name=VALUE`` strings (the ``--input-value`` syntax): a number or a comma list."""
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        name, sep, text = spec.partition("=")
        name = name.strip()
        if not sep or not name or not text.strip():
            raise OptionError(f"--input-value '{spec}': expected NAME=VALUE or NAME=V1,V2,... such as sr=16000")
        items = [t.strip() for t in text.split(",")]
        try:
            nums = [int(t) for t in items]
            arr = np.array(nums if len(nums) > 1 else nums[0])
        except ValueError:
            try:
                nums = [float(t) for t in items]
            except ValueError:
                raise OptionError(f"--input-value '{spec}': values must be numbers, e.g. {name}=16000") from None
            arr = np.array(nums if len(nums) > 1 else nums[0])
        out[name] = arr
    return out
