"""Emitting new nodes into onnx-graphsurgeon graphs, for the passes that unroll (lower-recurrent, unroll-loops).

:func:`rewrite_graphs` hands every graph of an :class:`~graphopt.ir.IR` (each
``If``/``Loop``/``Scan`` body before the graph holding it) to a rewrite
function with one :class:`Namer` for the model. :class:`Builder` emits new
nodes into one ``gs.Graph`` in the forms the model's opset expects (Split,
Clip, Unsqueeze changed from attributes to inputs over the opsets) with
deterministic, collision-free names. Import, export, toposort and the walk
over nested graphs are :mod:`graphopt.ir`'s.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.ir import IR, all_graphs, array, proto_subgraphs, toposort


def all_names(graph: onnx.GraphProto) -> set[str]:
    """Every value and node name used anywhere in ``graph`` (subgraphs included)."""
    names: set[str] = set()
    for g in [graph, *proto_subgraphs(graph)]:
        names.update(v.name for v in list(g.input) + list(g.output) + list(g.value_info))
        names.update(t.name for t in g.initializer)
        for node in g.node:
            names.add(node.name)
            names.update(node.input)
            names.update(node.output)
    return names


def rewrite_graphs(ir: IR, rewrite: Callable[[gs.Graph, "Namer"], int]) -> int:
    """Apply ``rewrite`` to every graph of ``ir`` (innermost first); returns how many nodes it replaced.

    ``rewrite(g, namer)`` edits ``g`` in place and returns how many nodes it
    replaced. Fresh names avoid every name of the model ``ir`` was imported
    from; the namer's opset is that model's default-domain opset. Every
    rewritten subgraph is sorted; the main graph is left for
    :class:`~graphopt.ir.GraphSurgeonPass` ``run`` to sort, once.
    """
    opset = next((int(o.version) for o in ir.like.opset_import if o.domain in ("", "ai.onnx")), 0)
    namer = Namer(all_names(ir.like.graph), opset)
    count = 0
    for sub in all_graphs(ir.g, innermost_first=True):
        n = rewrite(sub, namer)
        if n and sub is not ir.g:
            # New nodes were appended; sort now, since an enclosing rewrite may copy this body in order.
            toposort(sub)
        count += n
    return count


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


def remove_node(node: gs.Node, graph: gs.Graph) -> list[gs.Tensor]:
    """Remove ``node`` from ``graph``; returns its former outputs (now without a producer)."""
    outs = list(node.outputs)
    node.inputs.clear()
    node.outputs.clear()
    # By identity: gs's Node.__eq__ compares names, attributes and tensors, and another node may match.
    graph.nodes = [n for n in graph.nodes if n is not node]
    return outs


def _constant_of(t) -> gs.Constant | None:
    """The constant behind a tensor that is an initializer or a Constant node's ``value`` output, else None."""
    if isinstance(t, gs.Constant):
        return t
    if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        value = t.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return value
    return None


def const_value(t) -> np.ndarray | None:
    """The value of a tensor that is an initializer or a Constant node's output, else None.

    Read through :func:`graphopt.ir.array`: not cached on the tensor (export
    keeps the weight's proto) and a lazy weight reads as a read-only memory map.
    """
    c = _constant_of(t)
    return None if c is None else array(c)


def static_dim(t, axis: int) -> int | None:
    """Dim ``axis`` of a tensor when it is a known positive int (constants included), else None."""
    c = _constant_of(t)
    shape = c.shape if c is not None else t.shape
    if shape is None or axis >= len(shape):
        return None
    d = shape[axis]
    return int(d) if isinstance(d, (int, np.integer)) and d > 0 else None


def unit_gemm_beta(graph):
    """``graph`` with every Gemm whose ``beta`` is not 1 rewritten to ``beta = 1`` (its constant C, read by it
    alone, scaled by beta; with ``beta = 0``, C dropped): the same function, so passes that refit a layer's
    bias can write the bias as it acts. Returns the graph itself when there is nothing to change."""
    from graphopt.ir import IR, array

    ir = None
    for node in graph.graph.node:
        if node.op_type == "Gemm" and any(a.name == "beta" and a.f != 1.0 for a in node.attribute):
            ir = IR(graph)
            break
    if ir is None:
        return graph
    changed = False
    for node in ir.g.nodes:
        beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        if beta == 1.0:
            continue
        c = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
        const = _constant_of(c) if c is not None else None
        if c is not None and beta != 0.0 and (const is None or len(c.outputs) > 1):
            continue  # a computed or shared C: left as it is
        if c is not None and beta != 0.0:
            const.values = (array(const) * np.float32(beta)).astype(array(const).dtype)
        elif c is not None:
            node.inputs = node.inputs[:2]
        node.attrs["beta"] = 1.0
        changed = True
    return ir.to_graph() if changed else graph
