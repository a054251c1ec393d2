"""Artifact directories: what lowering writes and what ``graphopt run`` loads.

Layout (paths relative to the artifact directory)::

    manifest.json   what the artifact is: inputs/outputs, target and CPU features,
                    programs, versions, SHA-256 of every file
    model.onnx      the lowered Graph; its large initializers live in weights.bin
    weights.bin     the weights, 64-byte aligned, shared by model.onnx (ONNX external
                    data, for the reference runtime) and the compiled programs,
                    followed by any weights a target prepacked at lower time
                    (only programs read those; each program's ``params`` lists
                    the weights it takes, by index)
    <program>.so    compiled code from the target

Manifest format 2 (:data:`FORMAT_VERSION`) lists ``programs``, each with its
``library``, ``entry`` point, ``device`` kind (``cpu``, ``cuda``...), ``rank``
(its place in a sharded run; 0 for a single program), ``inputs`` and
``outputs`` (name, dtype, shape) and ``params`` (the weights it reads, by
index). Format 1 artifacts (one program on the CPU, inputs and outputs only at
the top level) still load: :func:`check_manifest` fills in what they lack.
Programs are loaded lazily, on first use, on the device asked for, so an
artifact can be inspected (:func:`describe`) on a machine that cannot run it.

The same Graph and options give byte-identical ``manifest.json``,
``model.onnx`` and ``weights.bin``: nothing time- or path-dependent is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import stat
import threading

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from .data import Feed, check_feed
from .errors import ArtifactError
from .graph import Graph, TensorSpec

FORMAT = "graphopt-artifact"
FORMAT_VERSION = 2
#: Oldest manifest format this graphopt loads; older ones are refused with a message to lower again.
OLDEST_FORMAT_VERSION = 1
#: Device kinds a program may declare (what the target's loader places it on).
DEVICE_KINDS = ("cpu", "cuda")
MANIFEST = "manifest.json"
GRAPH_FILE = "model.onnx"
WEIGHTS_FILE = "weights.bin"
_ALIGN = 64


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_graph_and_weights(graph: Graph, params: Sequence[str], out_dir: Path) -> list[dict]:
    """Write ``weights.bin`` (the named initializers, in order) and ``model.onnx`` referencing it.

    Weights are streamed to ``weights.bin`` one chunk at a time (a lazy tensor
    straight from its file), and ``model.onnx`` is the skeleton whose params
    point into ``weights.bin`` as ONNX external data: no step holds the model
    with its weights inline, so models over 2 GiB are written the same way.
    Returns the weight index for the manifest: name, dtype, shape, offset, nbytes.
    """
    from .graph import skeleton, write_aligned

    model, _ = skeleton(graph.model, how="external", min_bytes=1 << 62)  # a copy of the skeleton only
    del model.graph.initializer[:]
    wanted = set(params)
    kept = {t.name: t for t in graph.graph.initializer}
    order = []
    for t in graph.graph.initializer:
        if t.name in wanted:
            stub = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)
            model.graph.initializer.append(stub)
            order.append((t.name, len(model.graph.initializer) - 1))
        else:
            model.graph.initializer.append(t)
    where = dict(order)
    index = []
    offset = 0
    with open(out_dir / WEIGHTS_FILE, "wb") as f:
        for name in params:
            t = kept[name]
            # The ONNX initializer points at the same bytes instead of a second copy.
            start, n = write_aligned(f, offset, t, WEIGHTS_FILE, model.graph.initializer[where[name]], _ALIGN)
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
            index.append({"name": name, "dtype": dtype.name, "shape": [int(d) for d in t.dims], "offset": start,
                          "nbytes": n})
            offset = start + n
    (out_dir / GRAPH_FILE).write_bytes(model.SerializeToString(deterministic=True))
    return index


def append_weights(out_dir: Path, index: Sequence[Mapping], arrays: Sequence[np.ndarray],
                   names: Sequence[str]) -> list[dict]:
    """Append ``arrays`` to ``weights.bin`` (64-byte aligned, after the entries of ``index``); their index entries.

    For weights only the compiled code reads, such as prepacked layouts:
    ``model.onnx`` references the entries already there, and bytes after them
    do not change what it reads.
    """
    path = out_dir / WEIGHTS_FILE
    offset = max((int(e["offset"]) + int(e["nbytes"]) for e in index), default=0)
    entries = []
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.truncate(offset)
        for name, a in zip(names, arrays):
            a = np.asarray(a, order="C")
            start = -(-offset // _ALIGN) * _ALIGN
            f.seek(offset)
            f.write(b"\0" * (start - offset))
            f.write(a.tobytes())
            entries.append({"name": name, "dtype": a.dtype.name, "shape": [int(d) for d in a.shape],
                            "offset": start, "nbytes": int(a.nbytes)})
            offset = start + a.nbytes
    return entries


def program_weights(manifest: Mapping, prog: Mapping, weights: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The weights ``prog`` takes after its inputs: its ``params`` (indices into the manifest's weights), else all.

    Artifacts written before prepacking have no ``params``: their programs take
    every weight, in order.
    """
    refs = prog.get("params")
    if refs is None:
        return list(weights)
    return [weights[i] for i in refs]


def read_weights(art_dir: Path, index: Sequence[Mapping]) -> list[np.ndarray]:
    """The weights of an artifact, memory-mapped read-only, in index order.

    ``index`` is the manifest's weight list, already checked by
    :func:`check_manifest`; each entry must lie inside ``weights.bin`` and its
    shape must account for exactly its byte count, else :class:`ArtifactError`.
    """
    path = art_dir / WEIGHTS_FILE
    if not index:
        return []
    size = _regular_file(path, art_dir).st_size
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    out = []
    for e in index:
        off, n = int(e["offset"]), int(e["nbytes"])
        dtype = _dtype(e["dtype"], f"{art_dir / MANIFEST}: weight '{e['name']}'")
        count = math.prod(e["shape"])
        if off < 0 or n < 0 or off + n > size:
            raise ArtifactError(f"{path}: weight '{e['name']}' lies outside the file (damaged artifact)")
        if count * dtype.itemsize != n:
            raise ArtifactError(f"{art_dir / MANIFEST}: weight '{e['name']}' declares shape {e['shape']} {dtype} "
                                f"but {n} bytes (damaged artifact)")
        arr = np.frombuffer(mm, dtype=dtype, count=count, offset=off)
        out.append(arr.reshape(e["shape"]))
    return out


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("graphopt", "apache-tvm", "apache-tvm-ffi", "onnx", "onnxruntime", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def write_manifest(out_dir: Path, manifest: dict) -> None:
    files = sorted(p.name for p in out_dir.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest["files"] = {name: sha256_file(out_dir / name) for name in files}
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    (out_dir / MANIFEST).write_text(text, encoding="utf-8")


def is_artifact(path: Path) -> bool:
    """Whether ``path`` is a folder with a graphopt manifest (read only if it is a small regular file)."""
    try:
        st = os.lstat(Path(path) / MANIFEST)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MANIFEST_BYTES:
            return False  # never open a FIFO or device, nor read a huge file, just to ask
        return json.loads((Path(path) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


#: Largest manifest.json read (a real one is a few kB plus one line per weight).
MAX_MANIFEST_BYTES = 64 << 20


def _regular_file(path: Path, art_dir: Path) -> os.stat_result:
    """``lstat`` of a file of the artifact: it must be a regular file, not a link, folder, FIFO or device."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ArtifactError(f"{art_dir}: file '{path.name}' is missing (damaged artifact)") from None
    except OSError as e:
        raise ArtifactError(f"{art_dir}: cannot read '{path.name}': {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise ArtifactError(f"{art_dir}: '{path.name}' is {kind}; an artifact holds only regular files "
                            "(damaged or unsafe artifact)")
    return st


def _dtype(name, where: str) -> np.dtype:
    try:
        dt = np.dtype(name)
    except (TypeError, ValueError):
        raise ArtifactError(f"{where}: unknown dtype {name!r} (damaged manifest)") from None
    if dt.hasobject:
        raise ArtifactError(f"{where}: object dtype is not allowed (damaged or unsafe manifest)")
    return dt


def _expect(value, kind, where: str, what: str):
    ok = isinstance(value, kind) and not (kind in (int, (int, str)) and isinstance(value, bool))
    if not ok:
        raise ArtifactError(f"{where}: {what} is missing or has the wrong type (damaged manifest; lower the model again)")
    return value


def check_manifest(doc, mpath: Path) -> dict:
    """Check the structure of a manifest before anything in it is used; every fault is an ArtifactError.

    Types and required keys of ``format``, ``format_version``, ``files``
    (plain names to SHA-256 hex digests), ``programs`` (name, library),
    ``inputs``/``outputs`` (name, dtype, shape), ``target`` (name) and
    ``weights`` (name, dtype, shape, offset, nbytes); every file the artifact
    will load (each program library, ``weights.bin`` when there are weights,
    ``model.onnx``) must be among the hashed ``files``.
    """
    w = str(mpath)
    _expect(doc, dict, w, "the manifest (a JSON object)")
    if doc.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: not a graphopt artifact manifest")
    version = _expect(doc.get("format_version"), int, w, "'format_version'")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{mpath}: artifact format {version} is newer than this graphopt understands ({FORMAT_VERSION}); "
            "upgrade graphopt"
        )
    if version < OLDEST_FORMAT_VERSION:
        raise ArtifactError(f"{mpath}: artifact format {version} is older than this graphopt loads "
                            f"({OLDEST_FORMAT_VERSION}..{FORMAT_VERSION}); lower the model again")
    files = _expect(doc.get("files"), dict, w, "'files'")
    for name, digest in files.items():
        if not name or Path(name).name != name or name in (".", "..") or name == MANIFEST:
            raise ArtifactError(f"{mpath}: file name '{name}' is not a plain name inside the artifact (damaged or unsafe)")
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise ArtifactError(f"{mpath}: file '{name}' has no valid SHA-256 digest (damaged manifest)")
    programs = _expect(doc.get("programs"), list, w, "'programs'")
    for i, prog in enumerate(programs):
        _expect(prog, dict, w, f"programs[{i}]")
        _expect(prog.get("name"), str, w, f"programs[{i}].name")
        lib = _expect(prog.get("library"), str, w, f"programs[{i}].library")
        if not lib or Path(lib).name != lib or lib in (".", ".."):
            raise ArtifactError(f"{mpath}: file name '{lib}' is not a plain name inside the artifact (damaged or unsafe)")
        if lib not in files:
            raise ArtifactError(f"{mpath}: program library '{lib}' is not among the hashed files; refusing to load "
                                "code the manifest does not vouch for (damaged or unsafe artifact)")
        refs = prog.get("params")
        if refs is not None:
            n_weights = len(doc.get("weights", [])) if isinstance(doc.get("weights", []), list) else 0
            _expect(refs, list, w, f"programs[{i}].params")
            for r in refs:
                if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < n_weights:
                    raise ArtifactError(f"{mpath}: programs[{i}].params holds {r!r}, not the index of a weight "
                                        "(damaged manifest)")
    for key in ("inputs", "outputs"):
        _check_specs(_expect(doc.get(key), list, w, f"'{key}'"), w, key)
    for i, prog in enumerate(programs):
        _program_fields(doc, prog, version, w, i)
    names = [p["name"] for p in programs]
    if len(set(names)) != len(names):
        raise ArtifactError(f"{mpath}: two programs share a name (damaged manifest; lower the model again)")
    if doc.get("source") is not None:
        _expect(doc.get("source"), dict, w, "'source'")
    target = _expect(doc.get("target"), dict, w, "'target'")
    _expect(target.get("name"), str, w, "target.name")
    weights = _expect(doc.get("weights", []), list, w, "'weights'")
    for i, e in enumerate(weights):
        _expect(e, dict, w, f"weights[{i}]")
        _expect(e.get("name"), str, w, f"weights[{i}].name")
        _expect(e.get("dtype"), str, w, f"weights[{i}].dtype")
        for k in ("offset", "nbytes"):
            _expect(e.get(k), int, w, f"weights[{i}].{k}")
        for d in _expect(e.get("shape"), list, w, f"weights[{i}].shape"):
            if not isinstance(d, int) or isinstance(d, bool) or d < 0:
                raise ArtifactError(f"{mpath}: weights[{i}].shape holds {d!r}, not a dim (damaged manifest)")
    needed = ([WEIGHTS_FILE] if weights else []) + [GRAPH_FILE]
    for name in needed:
        if name not in files:
            raise ArtifactError(f"{mpath}: '{name}' is not among the hashed files (damaged or unsafe artifact)")
    return doc


def _program_fields(doc: dict, prog: dict, version: int, w: str, i: int) -> None:
    """Check (format 2) or fill in (format 1) a program's device, rank, entry, inputs and outputs."""
    if version < 2:
        # Format 1: one CPU program running the whole graph.
        prog.setdefault("entry", "main")
        prog.setdefault("device", "cpu")
        prog.setdefault("rank", 0)
        prog.setdefault("inputs", doc.get("inputs"))
        prog.setdefault("outputs", doc.get("outputs"))
    _expect(prog.get("entry"), str, w, f"programs[{i}].entry")
    device = _expect(prog.get("device"), str, w, f"programs[{i}].device")
    if device not in DEVICE_KINDS:
        raise ArtifactError(f"{w}: programs[{i}] runs on device '{device}', which this graphopt does not know "
                            f"({', '.join(DEVICE_KINDS)}); upgrade graphopt or lower the model again")
    rank = _expect(prog.get("rank"), int, w, f"programs[{i}].rank")
    if rank < 0:
        raise ArtifactError(f"{w}: programs[{i}].rank is {rank}, not a rank (damaged manifest)")
    for key in ("inputs", "outputs"):
        _check_specs(_expect(prog.get(key), list, w, f"programs[{i}].{key}"), w, f"programs[{i}].{key}")


def _check_specs(specs: list, w: str, where: str) -> None:
    """Each entry of a manifest's tensor list (``inputs``, a program's ``outputs``...): name, dtype, shape."""
    for j, spec in enumerate(specs):
        _expect(spec, dict, w, f"{where}[{j}]")
        _expect(spec.get("name"), str, w, f"{where}[{j}].name")
        _dtype(_expect(spec.get("dtype"), str, w, f"{where}[{j}].dtype"), f"{w}: {where}[{j}]")
        for d in _expect(spec.get("shape"), list, w, f"{where}[{j}].shape"):
            _expect(d, (int, str), w, f"{where}[{j}].shape")


def program_entry(name: str, library: str, *, device: str = "cpu", entry: str = "main", rank: int = 0,
                  inputs: Sequence[Mapping] = (), outputs: Sequence[Mapping] = (), params: Sequence[int] = (),
                  **extra) -> dict:
    """One program of a format-2 manifest (what a target's ``lower`` returns in ``"programs"``).

    ``inputs``/``outputs`` default (when empty) to the artifact's own, filled in by the lowering driver;
    ``extra`` keys (an accelerator the program drives, a mesh position...) are kept as given.
    """
    return {"name": name, "library": library, "entry": entry, "device": device, "rank": int(rank),
            "inputs": [dict(s) for s in inputs], "outputs": [dict(s) for s in outputs],
            "params": [int(i) for i in params], **extra}


def complete_programs(programs: Sequence[dict], inputs: Sequence[Mapping], outputs: Sequence[Mapping]) -> list[dict]:
    """``programs`` with the format-2 fields a target left out: entry ``main``, device ``cpu``, rank 0, and the
    artifact's ``inputs``/``outputs`` (a program that runs the whole graph)."""
    out = []
    for p in programs:
        p = dict(p)
        p.setdefault("entry", "main")
        p.setdefault("device", "cpu")
        p.setdefault("rank", 0)
        if not p.get("inputs"):
            p["inputs"] = [dict(s) for s in inputs]
        if not p.get("outputs"):
            p["outputs"] = [dict(s) for s in outputs]
        out.append(p)
    return out


def describe(manifest: Mapping, art_dir: Path | None = None) -> dict:
    """What an artifact is, from its manifest alone (no code loaded): for ``graphopt inspect <artifact>``.

    Format, source, pipeline, target (name and what it recorded), programs (device, rank, library and its
    size, weights read and their bytes), inputs, outputs, weights and total bytes, and whether this machine
    can run it (``runs_here``: true, or the reason it cannot, from the target's ``cannot_run`` check).
    """
    from .plugins import get_registry

    weights = manifest.get("weights", [])
    files = manifest.get("files", {})
    sizes = {}
    if art_dir is not None:
        for name in files:
            try:
                sizes[name] = os.lstat(Path(art_dir) / name).st_size
            except OSError:
                sizes[name] = None
    target = dict(manifest.get("target") or {})
    programs = []
    for p in manifest.get("programs", []):
        refs = p.get("params")
        refs = range(len(weights)) if refs is None else refs
        programs.append({"name": p["name"], "device": p.get("device", "cpu"), "rank": p.get("rank", 0),
                         "entry": p.get("entry", "main"), "library": p["library"],
                         "library_bytes": sizes.get(p["library"]),
                         **({"accelerator": p["accelerator"]} if p.get("accelerator") else {}),
                         "weights": len(refs), "weight_bytes": int(sum(int(weights[i]["nbytes"]) for i in refs))})
    reason = None
    try:
        cls = get_registry().get_target(target.get("name", "?"))
        reason = cls.cannot_run(manifest)
    except Exception as e:  # a target that is not installed here: the artifact can still be described
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return {
        "format_version": manifest.get("format_version"),
        "source": manifest.get("source"),
        "pipeline": manifest.get("pipeline"),
        "target": target,
        "programs": programs,
        "inputs": manifest.get("inputs", []),
        "outputs": manifest.get("outputs", []),
        "weights": len(weights),
        "weight_bytes": int(sum(int(e["nbytes"]) for e in weights)),
        "bytes": int(sum(v for v in sizes.values() if v)) if sizes else None,
        "versions": manifest.get("versions"),
        "runs_here": True if reason is None else reason,
    }


class Artifact:
    """An artifact: call :meth:`run` with a feed to get the outputs.

    Opening one checks the manifest and the file hashes, and maps the
    weights; the compiled programs are loaded lazily, on first use (:meth:`run`,
    :attr:`programs`, :attr:`threads`), on ``device`` (``None``: the device
    kind each program declares, its first device). So an artifact built for a
    GPU can be opened and inspected on a machine without one; loading its
    programs there is the error. Each problem is an
    :class:`~graphopt.errors.ArtifactError` that says what to do.
    """

    def __init__(self, path: str | os.PathLike, *, check_hashes: bool = True, threads: int | None = None,
                 device: str | None = None):
        self.path = Path(path)
        #: The thread cap asked for (``threads=``, else ``$GRAPHOPT_THREADS``, else None: no cap);
        #: an OptionError for a bad value, before anything is read.
        self.thread_cap = thread_cap(threads)
        #: The device asked for (``"cuda:1"``...); None: each program's own device kind, first device.
        self.device = check_device(device)
        #: Threads the compiled code runs with, set by the target when it loads the programs
        #: (see :func:`run_threads`); ``notes`` say why it differs from what was asked, if it does.
        self._threads: int | None = None
        self._notes: list[str] = []
        self._programs: dict | None = None
        self._loading = False
        self._load_lock = threading.RLock()
        self._target_cls = None
        mpath = self.path / MANIFEST
        try:
            mst = os.lstat(mpath)
        except OSError:
            mst = None
        if mst is None or not self.path.is_dir():
            raise ArtifactError(f"{self.path}: not a graphopt artifact (no {MANIFEST}); build one with `graphopt lower`")
        if not stat.S_ISREG(mst.st_mode):
            raise ArtifactError(f"{mpath}: not a regular file (a link, FIFO or device); refusing to read it")
        if mst.st_size > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{mpath}: {mst.st_size} bytes is over the {MAX_MANIFEST_BYTES} byte cap for a manifest")
        try:
            doc = json.loads(mpath.read_bytes().decode("utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise ArtifactError(f"{mpath}: unreadable manifest: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        self.manifest = check_manifest(doc, mpath)
        # Only regular files inside the folder, each checked before it is opened (a FIFO would block hashing).
        for name, digest in self.manifest["files"].items():
            f = self.path / name
            _regular_file(f, self.path)
            if check_hashes and sha256_file(f) != digest:
                raise ArtifactError(f"{self.path}: file '{name}' does not match its hash in the manifest (modified or damaged)")
        self.inputs = [TensorSpec(s["name"], s["dtype"], tuple(s["shape"])) for s in self.manifest["inputs"]]
        self.outputs = [TensorSpec(s["name"], s["dtype"], tuple(s["shape"])) for s in self.manifest["outputs"]]
        self.weights = read_weights(self.path, self.manifest.get("weights", []))

    @property
    def target_cls(self):
        """The target class that built the artifact (from the installed plugins; an OptionError if absent)."""
        if self._target_cls is None:
            from .plugins import get_registry

            self._target_cls = get_registry().get_target(self.manifest["target"]["name"])
        return self._target_cls

    def load_programs(self) -> dict:
        """Load the compiled programs (once) on their device; ``{name: callable}``.

        The target refuses, with an :class:`~graphopt.errors.ArtifactError`, a machine that cannot run
        them (CPU features, no GPU or an older one...)."""
        if self._programs is not None:
            return self._programs
        # One loader at a time: a second thread waits for the first's programs. Reentrant, because the
        # target reads and sets threads and notes (which load on demand) while it loads.
        with self._load_lock:
            if self._programs is None and not self._loading:
                tname = self.manifest["target"]["name"]
                if self.device is not None:
                    kinds = sorted({p["device"] for p in self.manifest["programs"]})
                    kind, _, index = self.device.partition(":")
                    if kinds != [kind]:
                        raise ArtifactError(f"{self.path}: its programs run on {', '.join(kinds)}, not on "
                                            f"'{self.device}'")
                    if kind == "cpu" and index not in ("", "0"):
                        raise ArtifactError(f"{self.path}: there is one CPU device, 'cpu' (or 'cpu:0'), "
                                            f"not '{self.device}'")
                self._loading = True
                try:
                    self._programs = self.target_cls.load_programs(self)
                except ArtifactError:
                    raise
                except (KeyError, TypeError) as e:  # a target reading a manifest field it needs
                    raise ArtifactError(f"{self.path / MANIFEST}: target '{tname}' cannot use this manifest: "
                                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                                        "(damaged manifest)") from e
                finally:
                    self._loading = False
        return self._programs

    @property
    def programs(self) -> dict:
        return self.load_programs()

    @property
    def threads(self) -> int | None:
        """Threads the compiled code runs with (loads the programs)."""
        self.load_programs()
        return self._threads

    @threads.setter
    def threads(self, value) -> None:
        self._threads = value

    @property
    def notes(self) -> list[str]:
        """Why the run differs from what was asked (threads...); loads the programs."""
        self.load_programs()
        return self._notes

    @notes.setter
    def notes(self, value) -> None:
        self._notes = list(value)

    def describe(self) -> dict:
        """What the artifact is, without loading its code (see :func:`describe`)."""
        return describe(self.manifest, self.path)

    @property
    def graph_path(self) -> Path:
        return self.path / GRAPH_FILE

    def reference_graph(self) -> Graph:
        """The lowered Graph, for running the reference on the same model."""
        return Graph.load(self.graph_path)

    def run(self, feed: Mapping[str, np.ndarray], program: str = "main") -> dict[str, np.ndarray]:
        """Run one feed (``{input name: array}``) through ``program``; returns ``{output name: array}``."""
        programs = self.load_programs()
        if program not in programs:
            raise ArtifactError(f"{self.path}: no program '{program}' (it has {', '.join(sorted(programs))})")
        spec = next((p for p in self.manifest["programs"] if p["name"] == program), None)
        inputs, outputs = self.inputs, self.outputs
        if spec is not None and program != "main":
            inputs = [TensorSpec(s["name"], s["dtype"], tuple(s["shape"])) for s in spec["inputs"]]
            outputs = [TensorSpec(s["name"], s["dtype"], tuple(s["shape"])) for s in spec["outputs"]]
        feed = check_feed(feed, inputs, "inputs")
        outs = programs[program]([feed[s.name] for s in inputs])
        return {s.name: o for s, o in zip(outputs, outs)}

    __call__ = run

    def run_many(self, feeds: Sequence[Feed]) -> list[list[np.ndarray]]:
        return [[r[s.name] for s in self.outputs] for r in (self.run(f) for f in feeds)]


def check_device(device: str | None) -> str | None:
    """``device`` (``cpu``, ``cuda``, ``cuda:1``...), or an OptionError saying what a device looks like."""
    import re

    from .errors import OptionError

    if device is None:
        return None
    if not isinstance(device, str) or not re.fullmatch(rf"({'|'.join(DEVICE_KINDS)})(:\d+)?", device.strip()):
        raise OptionError(f"device {device!r} is not a device: use one of {', '.join(DEVICE_KINDS)}, "
                          "optionally with an index (cuda:1)")
    return device.strip()


def load(path: str | os.PathLike, threads: int | None = None, device: str | None = None) -> Artifact:
    """Load an artifact directory written by ``graphopt lower`` (``threads`` caps its threads; ``device``:
    where its programs run, e.g. ``cuda:1``), programs included: a machine that cannot run it is an
    :class:`~graphopt.errors.ArtifactError` here, not at the first run."""
    art = Artifact(path, threads=threads, device=device)
    art.load_programs()
    return art


def thread_cap(threads: int | None = None) -> int | None:
    """The run-time thread cap: ``threads``, else ``$GRAPHOPT_THREADS``, else None (no cap).

    Raises :class:`~graphopt.errors.OptionError` for a count below 1 or an
    environment value that is not an integer (the same rules as lowering).
    """
    from .target import THREADS_ENV, resolve_threads

    if threads is None and not os.environ.get(THREADS_ENV, "").strip():
        return None
    return resolve_threads(threads)


def run_threads(built: int | None, cap: int | None) -> tuple[int, list[str]]:
    """How many threads an artifact lowered for ``built`` threads runs with here, and notes on why.

    The manifest's count (what the schedules were made for; an artifact from
    before it was recorded: every core) capped by ``cap``. Without a cap the
    count never exceeds the cores this process may use: an artifact built on
    a larger machine runs on every core here, with a note. A cap above the
    cores is honoured (the user asked) but noted, since a spinning thread
    pool with more threads than cores is slow.
    """
    from .target import available_cores

    cores = available_cores()
    n = built if isinstance(built, int) and not isinstance(built, bool) and built >= 1 else cores
    notes = []
    if cap is None:
        if n > cores:
            notes.append(f"the artifact was lowered for {n} threads; this machine has {cores} cores: running on {cores}")
            n = cores
        return n, notes
    if cap > n:
        notes.append(f"a cap of {cap} threads does not raise the {n} threads the artifact was lowered for "
                     f"(lower it again with {cap} threads to use more)")
    n = min(n, cap)
    if n > cores:
        notes.append(f"running on {n} threads, more than the {cores} cores this process may use (slower, not faster)")
    return n, notes


