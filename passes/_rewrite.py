"""Shared machinery of the rewriting passes that work on onnx-graphsurgeon graphs.

:func:`rewrite_with_gs` imports a model into onnx-graphsurgeon, hands every
graph (the main graph, then each ``If``/``Loop``/``Scan`` body, innermost
first) to a rewrite function, and exports the result keeping the model's
ir_version, opset imports, functions and metadata. :class:`Builder` emits new
nodes into one ``gs.Graph`` in the forms the model's opset expects (Split,
Clip, Unsqueeze changed from attributes to inputs over the opsets) with
deterministic, collision-free names.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.graph import Graph

from ._walk import subgraphs


def has_ops(graph: onnx.GraphProto, ops: set[str]) -> bool:
    """Whether any node of the standard domain in ``graph`` or its subgraphs has an op in ``ops``."""
    for node in graph.node:
        if node.op_type in ops and node.domain in ("", "ai.onnx"):
            return True
        if any(has_ops(sg, ops) for sg in subgraphs(node)):
            return True
    return False


def all_names(graph: onnx.GraphProto) -> set[str]:
    """Every value and node name used anywhere in ``graph`` (subgraphs included)."""
    names = {v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
    names |= {t.name for t in graph.initializer}
    for node in graph.node:
        names.add(node.name)
        names.update(node.input)
        names.update(node.output)
        for sg in subgraphs(node):
            names |= all_names(sg)
    return names


def graphs_innermost_first(graph: gs.Graph) -> list[gs.Graph]:
    """``graph`` and every subgraph below it, children before their parents."""
    out: list[gs.Graph] = []
    for node in graph.nodes:
        for attr in node.attrs.values():
            if isinstance(attr, gs.Graph):
                out.extend(graphs_innermost_first(attr))
    out.append(graph)
    return out


def _names_read(graph: gs.Graph) -> set[str]:
    """Names of every value read by the nodes of ``graph`` and its subgraphs."""
    out: set[str] = set()
    for node in graph.nodes:
        out.update(t.name for t in node.inputs if t.name)
        for attr in node.attrs.values():
            if isinstance(attr, gs.Graph):
                out |= _names_read(attr)
    return out


def toposort(graph: gs.Graph) -> None:
    """Sort ``graph.nodes`` so producers come first (reads inside subgraphs count), keeping the order otherwise.

    Iterative Kahn's algorithm, linear in the graph: onnx-graphsurgeon's own
    toposort recurses once per node of a chain and overflows on unrolled graphs.
    """
    import heapq

    nodes = list(graph.nodes)
    producer = {t.name: i for i, n in enumerate(nodes) for t in n.outputs if t.name}
    users: list[list[int]] = [[] for _ in nodes]
    pending = [0] * len(nodes)
    for i, node in enumerate(nodes):
        reads = {t.name for t in node.inputs if t.name}
        for attr in node.attrs.values():
            if isinstance(attr, gs.Graph):
                reads |= _names_read(attr)
        deps = {producer[r] for r in reads if r in producer and producer[r] != i}
        pending[i] = len(deps)
        for d in deps:
            users[d].append(i)
    ready = [i for i, n in enumerate(pending) if n == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for u in users[i]:
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):  # a cycle: leave the order alone, the checker will name it
        return
    graph.nodes = order


def rewrite_with_gs(graph: Graph, rewrite: Callable[[gs.Graph, "Namer"], int]) -> tuple[Graph, int]:
    """Apply ``rewrite`` to every graph of the model (innermost first); returns (new Graph, count).

    ``rewrite(g, namer)`` edits ``g`` in place and returns how many nodes it
    replaced. When nothing was replaced the input Graph is returned as is.
    """
    model = graph.model
    g = gs.import_onnx(model)
    namer = Namer(all_names(model.graph), graph.opset)
    count = 0
    for sub in graphs_innermost_first(g):
        n = rewrite(sub, namer)
        if n:
            # New nodes were appended; sort now, since an enclosing rewrite may copy this body in order.
            toposort(sub)
        count += n
    if not count:
        return graph, 0
    out = gs.export_onnx(g, do_type_check=False)
    # Model-level fields (ir_version, opset imports, functions, metadata...) are the input's, not the
    # exporter's rebuild; copied field by field so the input's graph and weights are not copied in vain.
    new = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name == "graph":
            continue
        if field.is_repeated:
            getattr(new, field.name).extend(value)
        elif field.message_type is not None:
            getattr(new, field.name).CopyFrom(value)
        else:
            setattr(new, field.name, value)
    new.graph.CopyFrom(out.graph)
    return Graph(new, graph.source), count


class Namer:
    """Deterministic fresh names that collide with nothing in the model."""

    def __init__(self, taken: set[str], opset: int):
        self.taken = set(taken)
        self.opset = opset
        self.counter = 0
        #: (graph id, dtype, shape, bytes) -> Constant, so equal constants (shapes, axes, step indices) are shared
        self.constants: dict[tuple, gs.Constant] = {}

    def fresh(self, hint: str) -> str:
        while True:
            self.counter += 1
            name = f"{hint}/graphopt_{self.counter}"
            if name not in self.taken:
                self.taken.add(name)
                return name


class Builder:
    """Emits nodes into one ``gs.Graph``; names start with ``prefix`` (the node being replaced)."""

    def __init__(self, graph: gs.Graph, namer: Namer, prefix: str, dtype: np.dtype | None = None):
        self.graph = graph
        self.namer = namer
        self.prefix = prefix
        self.dtype = dtype
        self.opset = namer.opset
        self.nodes: list[gs.Node] = []

    # ----------------------------------------------------------------- basics
    def const(self, value, dtype=None) -> gs.Constant:
        # numpy arrays keep their dtype; Python numbers take the builder's (the model's float type)
        if dtype is None and not isinstance(value, np.ndarray):
            dtype = self.dtype
        arr = np.asarray(value, dtype=dtype)
        if arr.size > 64:  # weights: one each, never hashed or kept twice
            return gs.Constant(self.namer.fresh(f"{self.prefix}/c"), arr.copy(order="C"))
        key = (id(self.graph), arr.dtype.str, arr.shape, arr.tobytes())
        hit = self.namer.constants.get(key)
        if hit is None:
            hit = gs.Constant(self.namer.fresh(f"{self.prefix}/c"), arr.copy(order="C"))  # keeps 0-d arrays 0-d
            self.namer.constants[key] = hit
        return hit

    def op(self, op_type: str, inputs: Sequence, attrs: dict | None = None, n_out: int = 1, dtype=None):
        """Add one node; returns its output Variable (or a list when ``n_out`` > 1)."""
        name = self.namer.fresh(f"{self.prefix}/{op_type}")
        outs = [gs.Variable(self.namer.fresh(f"{self.prefix}/{op_type}_out"), dtype=dtype) for _ in range(n_out)]
        ins = [self._as_tensor(i) for i in inputs]
        node = gs.Node(op_type, name, dict(attrs or {}), inputs=ins, outputs=outs)
        self.graph.nodes.append(node)
        self.nodes.append(node)
        return outs[0] if n_out == 1 else outs

    def _as_tensor(self, x):
        if x is None:
            return gs.Variable.empty()
        if isinstance(x, gs.Tensor):
            return x
        return self.const(x)

    # ----------------------------------------------------- opset-aware forms
    def split(self, x, sizes: Sequence[int], axis: int) -> list:
        if self.opset >= 13:
            outs = self.op("Split", [x, self.const(np.array(sizes, np.int64))], {"axis": axis}, n_out=len(sizes))
        else:
            outs = self.op("Split", [x], {"axis": axis, "split": list(sizes)}, n_out=len(sizes))
        return outs if isinstance(outs, list) else [outs]

    def unsqueeze(self, x, axes: Sequence[int]):
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.const(np.array(axes, np.int64))])
        return self.op("Unsqueeze", [x], {"axes": list(axes)})

    def squeeze(self, x, axes: Sequence[int]):
        if self.opset >= 13:
            return self.op("Squeeze", [x, self.const(np.array(axes, np.int64))])
        return self.op("Squeeze", [x], {"axes": list(axes)})

    def clip(self, x, bound: float):
        if self.opset >= 11:
            return self.op("Clip", [x, self.const(-bound), self.const(bound)])
        return self.op("Clip", [x], {"min": -float(bound), "max": float(bound)})

    def reshape(self, x, shape: Iterable[int]):
        return self.op("Reshape", [x, self.const(np.array(list(shape), np.int64))])

    def gather(self, x, index: int, axis: int = 0):
        return self.op("Gather", [x, self.const(np.array(index, np.int64))], {"axis": axis})

    def add(self, a, b):
        return self.op("Add", [a, b])

    def mul(self, a, b):
        return self.op("Mul", [a, b])

    def sub(self, a, b):
        return self.op("Sub", [a, b])

    def matmul(self, a, b):
        return self.op("MatMul", [a, b])


def bind_output(b: Builder, result: gs.Tensor, orig: gs.Tensor) -> None:
    """Make ``orig`` (an output of a replaced node, detached from it) carry ``result``.

    Rebinds the producer's output slot when ``result`` has no other reader,
    else adds an Identity, so consumers and graph outputs keep their tensor.
    """
    producers = list(result.inputs) if isinstance(result, gs.Variable) else []
    if len(producers) == 1 and producers[0] in b.nodes and not result.outputs and result not in b.graph.outputs:
        prod = producers[0]
        idx = [i for i, t in enumerate(prod.outputs) if t is result][0]
        if orig.dtype is None:
            orig.dtype = result.dtype
        prod.outputs[idx] = orig
        return
    node = gs.Node("Identity", b.namer.fresh(f"{b.prefix}/Identity"), inputs=[result], outputs=[orig])
    b.graph.nodes.append(node)
    b.nodes.append(node)


def detach(node: gs.Node, graph: gs.Graph) -> list[gs.Tensor]:
    """Remove ``node`` from ``graph``; returns its former outputs (now without a producer)."""
    outs = list(node.outputs)
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.remove(node)
    return outs


def const_value(t) -> np.ndarray | None:
    """The value of a tensor that is an initializer or a Constant node's output, else None."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        attrs = t.inputs[0].attrs
        if "value" in attrs and isinstance(attrs["value"], gs.Constant):
            return np.asarray(attrs["value"].values)
    return None


def static_dim(t, axis: int) -> int | None:
    """Dim ``axis`` of a tensor when it is a known positive int (constants included), else None."""
    v = const_value(t)
    shape = v.shape if v is not None else t.shape
    if shape is None or axis >= len(shape):
        return None
    d = shape[axis]
    return int(d) if isinstance(d, (int, np.integer)) and d > 0 else None
