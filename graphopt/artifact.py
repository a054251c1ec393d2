"""Artifact directories: what lowering writes and what ``graphopt run`` loads.

Layout (paths relative to the artifact directory)::

    manifest.json   what the artifact is: inputs/outputs, target and CPU features,
                    programs, versions, SHA-256 of every file
    model.onnx      the lowered Graph; its large initializers live in weights.bin
    weights.bin     the weights, 64-byte aligned, shared by model.onnx (ONNX external
                    data, for the reference runtime) and the compiled programs
    <program>.so    compiled code from the target

The same Graph and options give byte-identical ``manifest.json``,
``model.onnx`` and ``weights.bin``: nothing time- or path-dependent is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from .data import Feed, check_feed
from .errors import ArtifactError
from .graph import Graph, TensorSpec

FORMAT = "graphopt-artifact"
FORMAT_VERSION = 1
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
    from .graph import iter_chunks, skeleton

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
            pad = (-offset) % _ALIGN
            f.write(b"\0" * pad)
            offset += pad
            n = 0
            for chunk in iter_chunks(t):
                f.write(chunk)
                n += len(chunk)
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
            index.append({"name": name, "dtype": dtype.name, "shape": [int(d) for d in t.dims], "offset": offset,
                          "nbytes": n})
            # The ONNX initializer points at the same bytes instead of a second copy.
            stub = model.graph.initializer[where[name]]
            stub.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(n))):
                e = stub.external_data.add()
                e.key, e.value = k, v
            offset += n
    (out_dir / GRAPH_FILE).write_bytes(model.SerializeToString(deterministic=True))
    return index


def read_weights(art_dir: Path, index: Sequence[Mapping]) -> list[np.ndarray]:
    """The weights of an artifact, memory-mapped read-only, in index order."""
    path = art_dir / WEIGHTS_FILE
    if not index:
        return []
    size = path.stat().st_size
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = []
    for e in index:
        off, n = int(e["offset"]), int(e["nbytes"])
        if off < 0 or off + n > size:
            raise ArtifactError(f"{path}: weight '{e['name']}' lies outside the file (damaged artifact)")
        arr = np.frombuffer(mm, dtype=np.dtype(e["dtype"]), count=n // np.dtype(e["dtype"]).itemsize, offset=off)
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
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class Artifact:
    """A loaded artifact: call :meth:`run` with a feed to get the outputs.

    Loading checks the manifest, the file hashes and (through the target) that
    this machine can run the compiled code; each problem is an
    :class:`~graphopt.errors.ArtifactError` that says what to do.
    """

    def __init__(self, path: str | os.PathLike, *, check_hashes: bool = True):
        from .plugins import get_registry

        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise ArtifactError(f"{self.path}: not a graphopt artifact (no {MANIFEST}); build one with `graphopt lower`")
        try:
            self.manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{mpath}: unreadable manifest: {e}") from e
        if self.manifest.get("format") != FORMAT:
            raise ArtifactError(f"{mpath}: not a graphopt artifact manifest")
        if self.manifest.get("format_version", 0) > FORMAT_VERSION:
            raise ArtifactError(
                f"{mpath}: artifact format {self.manifest['format_version']} is newer than this graphopt "
                f"understands ({FORMAT_VERSION}); upgrade graphopt"
            )
        named = list(self.manifest.get("files", {})) + [p.get("library", "") for p in self.manifest.get("programs", [])]
        for name in named:
            if not name or Path(name).name != name or name in (".", ".."):
                raise ArtifactError(f"{mpath}: file name '{name}' is not a plain name inside the artifact (damaged or unsafe)")
        if check_hashes:
            for name, digest in self.manifest.get("files", {}).items():
                f = self.path / name
                if not f.is_file():
                    raise ArtifactError(f"{self.path}: file '{name}' listed in the manifest is missing")
                if sha256_file(f) != digest:
                    raise ArtifactError(f"{self.path}: file '{name}' does not match its hash in the manifest (modified or damaged)")
        self.inputs = [TensorSpec(s["name"], s["dtype"], tuple(s["shape"])) for s in self.manifest["inputs"]]
        self.outputs = [TensorSpec(s["name"], s["dtype"], tuple(s["shape"])) for s in self.manifest["outputs"]]
        tname = self.manifest["target"]["name"]
        self.target_cls = get_registry().get_target(tname)
        self.weights = read_weights(self.path, self.manifest.get("weights", []))
        self.programs = self.target_cls.load_programs(self)

    @property
    def graph_path(self) -> Path:
        return self.path / GRAPH_FILE

    def reference_graph(self) -> Graph:
        """The lowered Graph, for running the reference on the same model."""
        return Graph.load(self.graph_path)

    def run(self, feed: Mapping[str, np.ndarray], program: str = "main") -> dict[str, np.ndarray]:
        """Run one feed (``{input name: array}``); returns ``{output name: array}``."""
        feed = check_feed(feed, self.inputs, "inputs")
        outs = self.programs[program]([feed[s.name] for s in self.inputs])
        return {s.name: o for s, o in zip(self.outputs, outs)}

    __call__ = run

    def run_many(self, feeds: Sequence[Feed]) -> list[list[np.ndarray]]:
        return [[r[s.name] for s in self.outputs] for r in (self.run(f) for f in feeds)]


def load(path: str | os.PathLike) -> Artifact:
    """Load an artifact directory written by ``graphopt lower``."""
    return Artifact(path)


