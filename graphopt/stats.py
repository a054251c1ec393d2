"""Size and cost figures of a Graph: what `graphopt inspect` prints and every pass records.

FLOPs are an estimate from inferred shapes (a multiply-add counts 2; other ops
count one per output element) of one run: nodes computed from weights alone
(the in-graph decoding of sparse or packed weights) are left out, as ONNX
Runtime folds them when a session starts and the CPU target when it lowers
(:func:`all_node_flops` counts them too). Symbolic dims count as 1, so the figure
is per sample for a dynamic batch. Everything else is counted exactly.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
from onnx import numpy_helper

from .graph import Graph, TensorSpec, is_lazy, tensor_array, tensor_nbytes


@dataclass
class GraphStats:
    nodes: int
    params: int
    bytes: int
    nonzeros: int
    flops: int
    ops: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def _numel(spec: TensorSpec | None) -> int:
    if spec is None:
        return 0
    n = 1
    for d in spec.shape:
        n *= d if isinstance(d, int) and d > 0 else 1
    return n


def _node_flops(node, specs: dict[str, TensorSpec]) -> int:
    out = specs.get(node.output[0]) if node.output else None
    out_numel = _numel(out)
    op = node.op_type
    inp = [specs.get(n) for n in node.input]
    if op in ("Conv", "ConvInteger", "QLinearConv") and len(inp) > 1 and inp[1] is not None:
        w = inp[1].shape  # [M, C/group, k...]
        per_out = 1
        for d in w[1:]:
            per_out *= d if isinstance(d, int) else 1
        return 2 * out_numel * per_out
    if op == "ConvTranspose" and inp[0] is not None and len(inp) > 1 and inp[1] is not None:
        w = inp[1].shape  # [C, M/group, k...]
        per_in = 1
        for d in w[1:]:
            per_in *= d if isinstance(d, int) else 1
        return 2 * _numel(inp[0]) * per_in
    if op in ("MatMul", "MatMulInteger", "Gemm") and inp and inp[0] is not None and inp[0].shape:
        a = inp[0].shape
        k = a[-1] if op != "Gemm" or not any(a.name == "transA" and a.i for a in node.attribute) else a[0]
        k = k if isinstance(k, int) else 1
        return 2 * out_numel * k
    return out_numel


def _count_nonzero(t) -> tuple[int, int]:
    """(elements, non-zero elements) of a tensor; a lazy one is read in slices, never whole."""
    if not is_lazy(t):
        arr = numpy_helper.to_array(t)
        return arr.size, int(np.count_nonzero(arr))
    flat = tensor_array(t).reshape(-1)
    step = max(1, (64 << 20) // max(flat.itemsize, 1))
    nz = sum(int(np.count_nonzero(flat[i:i + step])) for i in range(0, flat.size, step))
    return flat.size, nz


def _flops(g: Graph, specs: dict, per_run: bool) -> int:
    """FLOPs of ``g`` (shapes inferred): with ``per_run``, only the nodes whose values depend on a graph
    input (or that hold a subgraph)."""
    import onnx

    live = {i.name for i in g.graph.input}
    total = 0
    for n in g.graph.node:
        subgraph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)
        if not per_run or subgraph or any(i in live for i in n.input if i):
            live.update(o for o in n.output if o)
            total += _node_flops(n, specs)
    return int(total)


def all_node_flops(graph: Graph) -> int:
    """FLOPs of every node, those computed from weights alone included (:func:`graph_stats` leaves them out)."""
    g = graph.infer_shapes()
    return _flops(g, g.value_specs(), per_run=False)


def graph_stats(graph: Graph) -> GraphStats:
    """Count nodes, parameters, bytes, non-zero weights and estimated FLOPs.

    ``bytes`` is the model's serialized size with every weight inline: the
    protobuf plus the data of lazy tensors (see :mod:`graphopt.graph`).
    """
    g = graph.infer_shapes()
    specs = g.value_specs()
    params = nonzeros = 0
    const_tensors = [a.t for n in graph.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    for t in list(graph.graph.initializer) + const_tensors:
        n, nz = _count_nonzero(t)
        params += n
        nonzeros += nz
    flops = _flops(g, specs, per_run=True)
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in graph.graph.node)
    lazy_bytes = sum(tensor_nbytes(t) for t in graph.graph.initializer if is_lazy(t))
    return GraphStats(
        nodes=len(graph.graph.node),
        params=int(params),
        bytes=int(graph.model.ByteSize()) + lazy_bytes,
        nonzeros=nonzeros,
        flops=int(flops),
        ops=dict(sorted(ops.items())),
    )


def inspect_graph(graph: Graph) -> dict:
    """Everything `graphopt inspect` reports, as JSON-ready data."""
    st = graph_stats(graph)
    return {
        "model": graph.source,
        "opset": graph.opset,
        "producer": f"{graph.model.producer_name} {graph.model.producer_version}".strip(),
        "inputs": [s.to_json() for s in graph.inputs],
        "outputs": [s.to_json() for s in graph.outputs],
        **st.to_json(),
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or unit == "T":
            return f"{n:.0f}" if unit == "" else f"{n:.2f}{unit}"
        n /= 1000
    return str(n)
