"""Where outputs may go, and the JSON report of a run that succeeded or failed.

Rules (checked before anything is read or written; a violation is an
:class:`~graphopt.errors.OutputError`, exit 2):

- no output may *be* an input: paths are compared after resolving symlinks,
  ``.``/``..`` and the working directory, and existing files also with
  ``os.path.samefile`` (hard links);
- no output may lie *inside* an input folder (an artifact, a ``--data`` folder);
- no output may *contain* an input: an artifact folder is replaced as a
  whole, so writing it over a folder that holds the model would delete it;
- two outputs may not be the same path;
- dumps (``--dump-after``) never overwrite an existing file.

Inputs are the model file, its external-data files, the data file or folder,
the pipeline file and, for ``run``, the artifact folder.

Reports: :class:`Reporting` writes ``{"ok": true, ...}`` when a run
succeeds and ``{"ok": false, "error": {...}}`` when it fails with an error,
so a build step always finds a record of the outcome. On an interrupt
(Ctrl-C, SIGTERM, SIGHUP) no report is left behind: one written earlier in
the same run is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from . import __version__
from .errors import EXIT_INTERNAL, GraphoptError, OutputError
from .fsutil import atomic_write_text
from .signals import pending

Labelled = tuple[str, "str | os.PathLike | None"]


def _resolve(path) -> Path:
    return Path(os.path.abspath(os.fspath(path))).resolve()


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def external_data_files(model_path: str | os.PathLike) -> list[Path]:
    """Files a model's tensors keep their data in (ONNX external data), resolved; [] if unreadable.

    Reads the protobuf without the external data itself; the model is checked
    properly (and refused if damaged) when it is loaded.
    """
    import onnx

    from .graph import _all_tensors

    path = Path(model_path)
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:
        return []
    files: set[Path] = set()
    for t in _all_tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            if loc:
                files.add(_resolve(path.parent / loc))
    return sorted(files)


def model_inputs(model, data=None, pipeline=None, eval_data=None) -> list[tuple[str, Path]]:
    """The input files of an optimize/lower run, labelled: model, data, pipeline file, evaluation data.

    ``model`` may be a path or a :class:`~graphopt.graph.Graph` (its ``source``
    counts when it is a file); ``data`` a path or a DataSource; ``pipeline`` a
    pipeline file (a ``Path``, or a string ending in ``.toml``) or anything else (ignored).
    """
    out: list[tuple[str, Path]] = []
    src = getattr(model, "source", model)
    if src is not None and not str(src).startswith("torch:"):
        out.append(("model", Path(src)))
    dpath = getattr(data, "path", data) if data is not None else None
    if isinstance(dpath, (str, os.PathLike)):
        out.append(("data", Path(dpath)))
    if (isinstance(pipeline, os.PathLike) and not isinstance(pipeline, str)) or \
            (isinstance(pipeline, str) and pipeline.endswith(".toml")):
        out.append(("pipeline file", Path(pipeline)))
    if isinstance(eval_data, (str, os.PathLike)):
        out.append(("evaluation data", Path(eval_data)))
    return out


def check_outputs(outputs: Iterable[Labelled], inputs: Iterable[Labelled]) -> None:
    """Refuse outputs that are, sit inside or contain an input, or that collide with each other.

    ``outputs`` and ``inputs`` are ``(role, path)`` pairs; ``None`` paths are
    skipped. A model input's external-data files count as inputs too (they
    are looked up only when some output already exists, the only case in
    which one could collide with them).
    """
    outs = [(role, Path(p), _resolve(p)) for role, p in outputs if p is not None]
    ins = [(role, Path(p), _resolve(p)) for role, p in inputs if p is not None]
    if any(os.path.lexists(r) for _, _, r in outs):
        for role, p, _ in list(ins):
            if role == "model" and p.is_file():
                ins += [(f"external data of the model '{p}'", f, f) for f in external_data_files(p)]
    for i, (orole, opath, o) in enumerate(outs):
        for irole, ipath, r in ins:
            if _same(o, r):
                raise OutputError(f"{opath}: the {orole} would overwrite the {irole} '{ipath}' "
                                  "(inputs are never modified); choose another output path")
            if r.is_relative_to(o):
                raise OutputError(f"{opath}: the {orole} contains the {irole} '{ipath}', which writing it "
                                  "would delete or overwrite; choose another output path")
            if o.is_relative_to(r):
                raise OutputError(f"{opath}: the {orole} lies inside the {irole} folder '{ipath}', "
                                  "which is an input; choose a path outside it")
        for orole2, opath2, o2 in outs[i + 1:]:
            if _same(o, o2):
                raise OutputError(f"{opath}: the {orole} and the {orole2} ('{opath2}') would overwrite "
                                  "each other; give them different paths")
            for (ra, pa, a), (rb, pb, b) in (((orole, opath, o), (orole2, opath2, o2)),
                                             ((orole2, opath2, o2), (orole, opath, o))):
                if a.is_relative_to(b):
                    raise OutputError(f"{pa}: the {ra} lies inside the {rb} '{pb}', which is written as a "
                                      "whole; put it outside")


def dump_paths(pipeline, dump_after: Sequence[str], dump_dir) -> list[Path]:
    """The files ``--dump-after`` writes: ``<dump_dir>/<NN>-<pass>.onnx`` for each matching pass.

    Mirrors :class:`~graphopt.manager.PassManager` (a test checks they agree).
    """
    if not dump_after:
        return []
    return [Path(dump_dir) / f"{i + 1:02d}-{p.name}.onnx" for i, p in enumerate(pipeline)
            if p.name in dump_after or str(p) in dump_after]


def check_dumps(paths: Sequence[Path]) -> None:
    """Dumps never overwrite: refuse, before anything runs, a dump file that exists already."""
    for p in paths:
        if os.path.lexists(p):
            raise OutputError(f"{p}: a dump file of that name exists already and graphopt does not overwrite "
                              "dumps; remove it or write the run's outputs to another folder")


def default_artifact_path(model, target: str) -> Path:
    """``build/<model stem>-<target>`` (relative to the working directory) for ``lower`` without ``-o``."""
    src = getattr(model, "source", model)
    stem = Path(str(src)).stem if src and not str(src).startswith("torch:") else "model"
    return Path("build") / f"{stem or 'model'}-{getattr(target, 'name', target)}"


def error_json(e: BaseException) -> dict:
    """``{"message", "kind", "exit_code"}`` of an error, as reports and ``--json`` show it."""
    msg = str(e).strip()
    if isinstance(e, GraphoptError):
        return {"message": msg, "kind": type(e).__name__, "exit_code": e.exit_code}
    first = msg.splitlines()[0] if msg else ""
    return {"message": f"internal error: {type(e).__name__}: {first}".rstrip(": "), "kind": "InternalError",
            "exit_code": EXIT_INTERNAL}


def _dump(doc: dict) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n"


class Reporting:
    """The JSON report of one run at ``path`` (``None``: no report).

    Use as a context manager around the run: :meth:`success` writes the
    report with ``"ok": true``; an ``Exception`` leaving the block writes
    ``{**base, "ok": false, "error": ...}`` (best effort: if that write fails
    too, the original error still propagates); an interrupt removes a report
    this run already wrote. Call :meth:`success` *before* publishing the main
    output: a report that cannot be written then stops the run before the
    artifact or model appears, and a later failure rewrites it as failed.
    """

    def __init__(self, path: str | os.PathLike | None, **base):
        self.path = Path(path) if path is not None else None
        self.base = {"graphopt": __version__, **base}
        self.written = False

    def update(self, **fields) -> None:
        self.base.update(fields)

    def success(self, doc: dict) -> dict:
        doc = {**doc, "ok": True}
        if self.path is not None:
            atomic_write_text(self.path, _dump(doc))
            self.written = True
        return doc

    def failure(self, e: BaseException) -> dict:
        doc = {**self.base, "ok": False, "error": error_json(e)}
        if self.path is not None:
            with contextlib.suppress(GraphoptError, OSError):
                atomic_write_text(self.path, _dump(doc))
                self.written = True
        return doc

    def __enter__(self) -> "Reporting":
        return self

    def __exit__(self, etype, e, tb) -> bool:
        if e is None:
            return False
        if isinstance(e, Exception) and pending() is None:
            self.failure(e)
        elif self.written and self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
        return False
