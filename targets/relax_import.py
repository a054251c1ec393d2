"""Graph -> TVM Relax, shared by every TVM target.

- :func:`unsupported_ops` lists every node the Relax ONNX importer has no converter for;
- :func:`select_params` picks the initializers that stay weights (function
  parameters read from ``weights.bin``) rather than constants compiled in;
- :func:`import_graph` runs the importer with those parameters and turns its
  failures into errors that name the node and say what to do.
"""

from __future__ import annotations

import gc



import numpy as np
import onnx


from graphopt.errors import LoweringError, UnsupportedOpsError
from graphopt.graph import Graph

#: Smallest initializer (in elements) kept as a weight. Smaller ones (shapes,
#: axes, scales, scalars) become constants: the importer needs many of them as
#: compile-time values (Reshape targets, Resize scales, Slice bounds...).
MIN_PARAM_ELEMENTS = 16
_PARAM_KINDS = "fc"  # float and complex tensors; integer tensors are usually shapes or indices


def unsupported_ops(graph: Graph) -> dict[str, list[str]]:
    """``{op: [node names]}`` for every node TVM's ONNX importer cannot convert (subgraphs included)."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) | {"Constant", "If"}
    missing: dict[str, list[str]] = {}

    def walk(g: onnx.GraphProto) -> None:
        for i, node in enumerate(g.node):
            domain = node.domain if node.domain not in ("", "ai.onnx") else ""
            if domain or node.op_type not in known:
                op = f"{domain}.{node.op_type}" if domain else node.op_type
                missing.setdefault(op, []).append(node.name or f"#{i}")
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(graph.graph)
    return missing


#: Standard ONNX ops TVM's importer lacks that a built-in pass rewrites into ops it has.
REWRITING_PASS = {"LSTM": "lower-recurrent", "GRU": "lower-recurrent", "RNN": "lower-recurrent",
                  "Loop": "unroll-loops", "Scan": "unroll-loops"}


def _is_standard(op: str) -> bool:
    """Whether ``op`` (``Name`` or ``domain.Name``) is an operator of the ONNX standard (ai.onnx, ai.onnx.ml)."""
    domain, _, name = op.rpartition(".")
    if domain not in ("", "ai.onnx", "ai.onnx.ml"):
        return False
    try:
        return onnx.defs.has(name, domain)
    except Exception:  # pragma: no cover - defensive: an odd name must not hide the real error
        return False


def raise_if_unsupported(graph: Graph, target: str) -> None:
    """Refuse a graph with ops the importer cannot convert, listing every op and its nodes at once.

    Standard ONNX ops are named as such (TVM's importer has no converter for
    them) with the built-in pass that rewrites them, where one exists;
    ops of other domains (``com.microsoft``...) are named as non-standard.
    """
    missing = unsupported_ops(graph)
    if not missing:
        return

    standard = sorted(op for op in missing if _is_standard(op))
    custom = sorted(op for op in missing if op not in standard)
    advice = []
    rewritable = [op for op in standard if op in REWRITING_PASS]
    if rewritable:
        by_pass: dict[str, list[str]] = {}
        for op in rewritable:
            by_pass.setdefault(REWRITING_PASS[op], []).append(op)
        advice.append(
            f"{', '.join(rewritable)} {'is a standard ONNX op' if len(rewritable) == 1 else 'are standard ONNX ops'} "
            "that TVM's importer has no converter for: run "
            + ", ".join(f"the pass '{p}' ({'/'.join(ops)})" for p, ops in sorted(by_pass.items()))
            + " before lowering (the default lower pipeline does)"
        )
    others = [op for op in standard if op not in REWRITING_PASS]
    if others:
        advice.append(
            f"{', '.join(others)} {'is a standard ONNX op' if len(others) == 1 else 'are standard ONNX ops'} "
            "that TVM's importer has no converter for, and no built-in pass rewrites yet: rewrite with a plugin pass"
        )
    if custom:
        advice.append(
            f"{', '.join(custom)} {'is not a standard ONNX op' if len(custom) == 1 else 'are not standard ONNX ops'}: "
            "rewrite with a pass, or export the model with standard ONNX ops"
        )
    listing = "; ".join(
        f"{op} (nodes: {', '.join(missing[op][:5])}{', ...' if len(missing[op]) > 5 else ''})" for op in sorted(missing)
    )
    raise UnsupportedOpsError(
        f"{graph.source or 'model'}: target '{target}' cannot lower {sum(map(len, missing.values()))} node(s): "
        f"{listing}. " + ". ".join(advice),
        missing,
    )


def select_params(graph: Graph) -> list[str]:
    """Names of the initializers that become weights, in graph order."""
    out = []
    for t in graph.graph.initializer:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
        if dtype.kind in _PARAM_KINDS and int(np.prod(t.dims, dtype=np.int64)) >= MIN_PARAM_ELEMENTS:
            out.append(t.name)
    return out


def _importable_model(graph: Graph, params: list[str]) -> onnx.ModelProto:
    """A copy in which every initializer that is not a param is a Constant node."""
    g = graph.copy().model
    keep = set(params)
    consts = []
    rest = []
    for t in g.graph.initializer:
        if t.name in keep:
            rest.append(t)
        else:
            consts.append(onnx.helper.make_node("Constant", [], [t.name], value=t, name=f"graphopt_const_{t.name}"))
    del g.graph.initializer[:]
    g.graph.initializer.extend(rest)
    names = {t.name for t in consts}
    kept_inputs = [v for v in g.graph.input if v.name not in names]
    del g.graph.input[:]
    g.graph.input.extend(kept_inputs)
    nodes = list(g.graph.node)
    del g.graph.node[:]
    g.graph.node.extend(consts + nodes)
    return g





def _shape_hint(graph: Graph) -> str:
    symbolic = [s for s in graph.inputs if not s.is_static]
    if not symbolic:
        return ""
    examples = " ".join(
        f"--input-shape {s.name}:" + ",".join(
            str(d) if isinstance(d, int) else ("1" if i == 0 else f"<{d if d != '?' else 'dim' + str(i)}>")
            for i, d in enumerate(s.shape))
        for s in symbolic
    )
    return (f"; the model has symbolic input dims, so its shape computations cannot fold before import: "
            f"fix them, e.g. {examples}")


def import_graph(graph: Graph, params: list[str]):
    """The Relax IRModule of ``graph`` whose ``main`` takes (inputs..., params...)."""

    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    model = _importable_model(graph, params)
    failure = None
    try:
        mod = from_onnx(model, opset=graph.opset, keep_params_in_input=True)
    except Exception as e:
        failure = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    if failure is not None:
        # Let the importer's half-built state go now, while its warnings are still being captured.
        gc.collect()
        raise LoweringError(f"{graph.source or 'model'}: TVM could not import the graph: {failure}{_shape_hint(graph)}")
    mod, _ = relax.frontend.detach_params(mod)
    n_inputs = len(graph.inputs)
    got = len(mod["main"].params) - n_inputs
    if got != len(params):  # pragma: no cover - guards an importer change
        raise LoweringError(f"TVM importer produced {got} weight parameters, expected {len(params)}")
    return mod


