"""The reference runtime (ONNX Runtime) and the numerical comparison used everywhere.

Lossless passes, `lower --verify` and `run --verify` all compare through
:func:`compare_outputs`, so "matches the reference" means one thing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from .data import Feed
from .errors import ModelError
from .graph import Graph


#: Main-graph initializers of at least this many bytes reach ONNX Runtime as separate buffers, not in the protobuf.
_SEPARATE_BYTES = 1 << 20


def reference_session(graph: Graph, threads: int = 0):
    """An ONNX Runtime CPU session for ``graph`` (all graph optimizations off: a pure reference).

    Large weights (lazy tensors, and inline ones of 1 MiB or more) are not
    serialized into the protobuf ONNX Runtime parses: the session gets a
    weight-free skeleton plus the arrays themselves (memory maps for lazy
    tensors) through ``add_external_initializers``, so models over 2 GiB load
    and no weight is copied into a protobuf.
    """
    import onnxruntime as ort

    from .graph import skeleton, tensor_array

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    try:
        model, stubbed = skeleton(graph.model, how="external", min_bytes=_SEPARATE_BYTES)
        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(tensor_array(t))) for _, t in stubbed]
        if stubbed:
            so.add_external_initializers([t.name for _, t in stubbed], values)
        sess = ort.InferenceSession(model.SerializeToString(deterministic=True), so,
                                    providers=["CPUExecutionProvider"])
        sess._graphopt_weights = values  # ONNX Runtime reads these buffers for the session's lifetime
        return sess
    except ModelError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{graph.source or 'model'}: ONNX Runtime (the reference) cannot load it: {msg}") from e


def run_reference(graph: Graph, feeds: Sequence[Feed], session=None) -> list[list[np.ndarray]]:
    """Outputs of ONNX Runtime for each feed, in graph output order."""
    sess = session or reference_session(graph)
    names = [o.name for o in graph.outputs]
    results = []
    for feed in feeds:
        try:
            results.append([np.asarray(x) for x in sess.run(names, feed)])
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"{graph.source or 'model'}: ONNX Runtime failed to run it: {msg}") from e
    return results


@dataclass
class Comparison:
    """How far ``got`` is from ``ref`` over all outputs and feeds (worst case)."""

    max_abs: float
    max_rel: float  # max |got - ref| / max |ref| per output
    cosine: float  # minimum cosine similarity of flattened outputs
    snr_db: float  # minimum signal-to-noise ratio (inf when exact)
    worst_output: str
    atol: float
    rtol: float
    ok: bool

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("snr_db", "cosine", "max_abs", "max_rel"):
            if not np.isfinite(d[k]):
                d[k] = None if np.isnan(d[k]) else ("inf" if d[k] > 0 else "-inf")
        return d

    def summary(self) -> str:
        return (
            f"max abs error {self.max_abs:.3g} on '{self.worst_output}' "
            f"(tolerance {self.atol:g} + {self.rtol:g}*max|ref|), cosine {self.cosine:.6f}"
        )


def compare_outputs(
    ref: Sequence[Sequence[np.ndarray]],
    got: Sequence[Sequence[np.ndarray]],
    names: Sequence[str],
    *,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> Comparison:
    """Compare per output: ok when ``max|got-ref| <= atol + rtol*max|ref|`` everywhere.

    Integer and bool outputs must match exactly. Shapes must agree.
    """
    max_abs = max_rel = 0.0
    cosine = 1.0
    snr = float("inf")
    worst = names[0] if names else ""
    ok = True
    for r_outs, g_outs in zip(ref, got):
        for name, r, g in zip(names, r_outs, g_outs):
            r = np.asarray(r)
            g = np.asarray(g)
            if r.shape != g.shape:
                return Comparison(float("inf"), float("inf"), float("nan"), float("-inf"), name, atol, rtol, False)
            exact = r.dtype.kind in "iub"
            rf = r.astype(np.float64)
            gf = g.astype(np.float64)
            if not (np.all(np.isfinite(rf) == np.isfinite(gf)) and np.array_equal(rf[~np.isfinite(rf)], gf[~np.isfinite(gf)])):
                return Comparison(float("inf"), float("inf"), float("nan"), float("-inf"), name, atol, rtol, False)
            fin = np.isfinite(rf)
            diff = np.abs(rf[fin] - gf[fin])
            err = float(diff.max()) if diff.size else 0.0
            scale = float(np.abs(rf[fin]).max()) if diff.size else 0.0
            if err > max_abs:
                max_abs, worst = err, name
            max_rel = max(max_rel, err / scale if scale else (0.0 if err == 0 else float("inf")))
            if exact:
                ok &= err == 0
            else:
                ok &= err <= atol + rtol * scale
            rv, gv = rf[fin].ravel(), gf[fin].ravel()
            nr, ng = np.linalg.norm(rv), np.linalg.norm(gv)
            if nr and ng:
                cosine = min(cosine, float(rv @ gv / (nr * ng)))
            elif nr != ng:
                cosine = min(cosine, 0.0)
            noise = float(np.sum((rv - gv) ** 2))
            if noise:
                snr = min(snr, 10 * np.log10(max(float(np.sum(rv**2)), 1e-300) / noise))
    return Comparison(max_abs, max_rel, cosine, float(snr), worst, atol, rtol, bool(ok))
