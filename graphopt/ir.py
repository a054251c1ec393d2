"""The use-def IR passes edit: onnx-graphsurgeon graphs, bridged to and from :class:`Graph`.

:class:`Graph` (an ONNX ``ModelProto``) stays the interchange form between
passes; a pass that rewrites the graph imports it once into an
onnx-graphsurgeon (gs) graph, where tensors know their producer and consumers
and ``If``/``Loop``/``Scan`` bodies are graphs of their own that share tensor
objects with the outer scope, edits it, and exports it once.

Contract of the bridge (:class:`IR`):

* Import does not copy weights: gs wraps each initializer's ``TensorProto`` as
  a lazily loaded value, and export reuses that proto (protobuf copies it once
  into the new model; no numpy round trip, no dtype change).
* A large model's lazy weights (tensors left on disk, see :mod:`graphopt.graph`)
  stay lazy: :func:`array` reads them as read-only memory maps, and export
  writes their EXTERNAL proto back untouched. (gs's ``Constant.values`` reads
  them too, but caches the map on the tensor, and export then writes the
  values inline: use :func:`array`.)
* Export keeps what gs does not own: ``ir_version``, opset imports, model-local
  functions (verbatim), ``metadata_props``, producer, model and graph doc
  strings, domain and model version, and, for old models, initializers that
  were also listed as graph inputs (they stay overridable inputs).
* An initializer of an outer graph that only a subgraph reads stays an
  initializer of the main graph (gs would emit it inside the subgraph, once per
  branch that reads it).
* Output is deterministic: same input and same edits give the same bytes.

Whole-graph facts every pass needs (which tensors are live, who reads a
tensor, what a subgraph reads from outer scopes, which names are a graph's own
inputs and outputs) come from the functions of this module, and all of them
see subgraphs.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Iterable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.logger import G_LOGGER

from .graph import Graph, is_lazy, tensor_array
from .passbase import Pass, PassContext

# gs prints its warnings (duplicate node names, ...) to stdout; graphopt reports through its own channels.
# Below ERROR its messages are dropped before gs formats them: its logger costs ~60 us a call, once per
# tensor on import (6 s of a 100,000-node import).
G_LOGGER.severity = G_LOGGER.ERROR
for _level in ("ultra_verbose", "verbose", "debug", "info", "warning"):
    setattr(G_LOGGER, _level, lambda *args, **kwargs: None)

Tensor = gs.Tensor
Node = gs.Node


class IR:
    """A model being edited: the gs graph plus what export must restore.

    ``g`` is the main gs graph; edit it freely (through the helpers below when
    names or liveness matter), then call :meth:`to_graph` once.
    """

    def __init__(self, graph: Graph):
        model = graph.model
        self.like = model
        self.source = graph.source
        self.g: gs.Graph = gs.import_onnx(model)
        if any(is_lazy(t) for t in model.graph.initializer):
            _wrap_disk_values(self.g)
        inits = {t.name for t in model.graph.initializer}
        self.init_inputs = [v for v in model.graph.input if v.name in inits]
        self._inner_inits = set()
        for sg in proto_subgraphs(model.graph):
            self._inner_inits.update(t.name for t in sg.initializer)
            self._inner_inits.update(t.name for t in sg.sparse_initializer)

    # ---------------------------------------------------------------- export
    def to_model(self) -> onnx.ModelProto:
        """Export to a ModelProto carrying the input model's model-level fields."""
        like = self.like
        model = gs.export_onnx(self.g, do_type_check=False)
        _hoist_outer_initializers(model.graph, self._inner_inits)
        if self.init_inputs:
            kept = {t.name for t in model.graph.initializer}
            have = {v.name for v in model.graph.input}
            model.graph.input.extend(v for v in self.init_inputs if v.name in kept and v.name not in have)
        if like.ir_version:
            model.ir_version = like.ir_version
        # The input's opset imports, plus any domain gs found in use that the input did not import.
        opsets = list(like.opset_import)
        known = {o.domain for o in opsets}
        opsets += [o for o in model.opset_import if o.domain not in known]
        del model.opset_import[:]
        model.opset_import.extend(opsets)
        del model.functions[:]
        model.functions.extend(like.functions)
        del model.metadata_props[:]
        model.metadata_props.extend(like.metadata_props)
        # Set where the input sets them, absent where it does not (an empty string would still be serialized).
        for name in ("producer_name", "producer_version", "doc_string", "domain", "model_version"):
            if like.HasField(name):
                setattr(model, name, getattr(like, name))
            else:
                model.ClearField(name)
        if like.training_info:
            model.training_info.extend(like.training_info)
        return model

    def to_graph(self) -> Graph:
        return Graph(self.to_model(), self.source)


class DiskValues(LazyValues):
    """gs's lazily loaded values for a lazy tensor: ``load`` maps its file instead of failing.

    gs's own ``load`` calls ``numpy_helper.to_array``, which refuses the
    absolute location of a lazy tensor; this one returns a read-only memory
    map (:func:`graphopt.graph.tensor_array`). Being a ``LazyValues``, export
    reuses the EXTERNAL proto, so the weight stays on disk.
    """

    def load(self) -> np.ndarray:
        return np.asarray(tensor_array(self.tensor))


def _wrap_disk_values(root: gs.Graph) -> None:
    """Give every constant holding a lazy tensor (read at any depth) :class:`DiskValues`."""
    for g in all_graphs(root):
        for t in [t for n in g.nodes for t in n.inputs] + list(g.outputs):
            v = getattr(t, "_values", None)
            if type(v) is LazyValues and is_lazy(v.tensor):
                t._values = DiskValues(v.tensor)


class GraphSurgeonPass(Pass):
    """A pass written against the gs graph: implement :meth:`rewrite`.

    ``run`` imports the Graph once, calls ``rewrite(ir, ctx)`` and exports
    once; composite passes call their sub-steps' ``rewrite`` on the same IR.
    """

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        ir = IR(graph)
        self.rewrite(ir, ctx)
        toposort(ir.g)
        return ir.to_graph()

    def rewrite(self, ir: IR, ctx: PassContext) -> None:  # pragma: no cover - contract
        raise NotImplementedError(f"pass '{self.name}' does not implement rewrite()")


# ------------------------------------------------------------------ structure
def proto_subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """Every subgraph nested anywhere in ``graph`` (not ``graph`` itself)."""
    for node in graph.node:
        for attr in node.attribute:
            subs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
            for sg in subs:
                yield sg
                yield from proto_subgraphs(sg)


def _hoist_outer_initializers(main: onnx.GraphProto, inner_inits: set[str]) -> None:
    """Move initializers gs emitted inside subgraphs, but that are not the subgraph's own, to ``main``.

    ONNX names are unique across a model, so a main-graph initializer is
    visible in every subgraph; each lands there once.
    """
    have = {t.name for t in main.initializer}
    for sg in list(proto_subgraphs(main)):
        keep, move = [], []
        for t in sg.initializer:
            (keep if t.name in inner_inits else move).append(t)
        if not move:
            continue
        for t in move:
            if t.name not in have:
                main.initializer.add().CopyFrom(t)
                have.add(t.name)
        copies = []
        for t in keep:
            c = onnx.TensorProto()
            c.CopyFrom(t)
            copies.append(c)
        del sg.initializer[:]
        sg.initializer.extend(copies)


# Standard ops that can hold graphs; any other op of the standard domain holds none (a fast path).
_GRAPH_OPS = {"If", "Loop", "Scan", "SequenceMap"}


def subgraphs(node: Node) -> list[gs.Graph]:
    """The graphs held directly in ``node``'s attributes (If branches, Loop/Scan bodies)."""
    if node.op not in _GRAPH_OPS and not node.domain or not node.attrs:
        return []
    out = []
    for v in node.attrs.values():
        if isinstance(v, gs.Graph):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(x for x in v if isinstance(x, gs.Graph))
    return out


def all_graphs(g: gs.Graph, innermost_first: bool = False) -> Iterator[gs.Graph]:
    """``g`` and every graph nested in it: outer before inner, or with ``innermost_first`` each graph after
    every graph nested in it (a rewrite that copies bodies then copies rewritten ones).

    Either way siblings come in node order, then attribute order. Iterative (no
    recursion per nesting level). With ``innermost_first`` a graph's subgraphs
    are collected when it is first reached, before the graphs inside it are
    yielded.
    """
    stack: list[tuple[gs.Graph, bool]] = [(g, False)]
    while stack:
        cur, expanded = stack.pop()
        if expanded:
            yield cur
            continue
        if not innermost_first:
            yield cur
        else:
            stack.append((cur, True))
        for node in reversed(cur.nodes):
            stack.extend((sg, False) for sg in reversed(subgraphs(node)))


def has_ops(graph: onnx.GraphProto, ops: set[str]) -> bool:
    """Whether a node of the standard domain in ``graph`` or any subgraph has an op in ``ops``.

    Works on the proto, so a pass can return its input untouched without importing it.
    """
    for g in itertools.chain([graph], proto_subgraphs(graph)):
        if any(n.op_type in ops and n.domain in ("", "ai.onnx") for n in g.node):
            return True
    return False


def outer_reads(sg: gs.Graph, _cache: dict | None = None) -> list[Tensor]:
    """Variables a subgraph (or graphs inside it) reads from enclosing scopes.

    Counts reads by nodes and tensors the subgraph returns directly as
    outputs. Constants are left out: they have no producer to keep alive.
    """
    cache = _cache if _cache is not None else {}
    key = id(sg)
    if key in cache:
        return cache[key]
    local = {id(t) for t in sg.inputs}
    for n in sg.nodes:
        local.update(id(t) for t in n.outputs)
    seen: dict[int, Tensor] = {}

    def want(t: Tensor) -> None:
        if isinstance(t, gs.Variable) and not t.is_empty() and id(t) not in local:
            seen.setdefault(id(t), t)

    for n in sg.nodes:
        for t in n.inputs:
            want(t)
        for inner in subgraphs(n):
            for t in outer_reads(inner, cache):
                want(t)
    for t in sg.outputs:
        want(t)
    cache[key] = list(seen.values())
    return cache[key]


def node_reads(node: Node, cache: dict | None = None) -> list[Tensor]:
    """Everything ``node`` reads: its inputs and its subgraphs' outer-scope reads."""
    reads = [t for t in node.inputs if not t.is_empty()]
    for sg in subgraphs(node):
        reads.extend(outer_reads(sg, cache))
    return reads


def protected(g: gs.Graph) -> set[int]:
    """ids of tensors that are ``g``'s own inputs or outputs (names a caller relies on)."""
    return {id(t) for t in g.inputs} | {id(t) for t in g.outputs}


def graph_outputs_of(root: gs.Graph) -> dict[int, list[tuple[gs.Graph, int]]]:
    """For each tensor returned as an output of any graph in ``root``: (graph, position) pairs."""
    out: dict[int, list[tuple[gs.Graph, int]]] = {}
    for g in all_graphs(root):
        for i, t in enumerate(g.outputs):
            out.setdefault(id(t), []).append((g, i))
    return out


def replace_uses(old: Tensor, new: Tensor, out_index: dict | None = None) -> int:
    """Make every reader of ``old`` read ``new``: nodes at any depth and graph outputs in ``out_index``.

    ``out_index`` comes from :func:`graph_outputs_of`; it is kept up to date.
    Returns the number of uses rewired.
    """
    n = 0
    for node in list(old.outputs):
        for i, t in enumerate(node.inputs):
            if t is old:
                node.inputs[i] = new
                n += 1
    if out_index is not None:
        for g, i in out_index.pop(id(old), []):
            g.outputs[i] = new
            out_index.setdefault(id(new), []).append((g, i))
            n += 1
    return n


def detach(node: Node) -> None:
    """Unlink a node from its tensors (remove it from its graph's node list separately)."""
    node.inputs.clear()
    node.outputs.clear()


def drop_nodes(g: gs.Graph, dead: Iterable[Node]) -> int:
    """Remove ``dead`` nodes from ``g.nodes`` in one linear sweep; returns how many."""
    ids = {id(n) for n in dead}
    if not ids:
        return 0
    for n in g.nodes:
        if id(n) in ids:
            detach(n)
    g.nodes = [n for n in g.nodes if id(n) not in ids]
    return len(ids)


def live_nodes(g: gs.Graph, cache: dict | None = None) -> set[int]:
    """ids of the nodes of ``g`` that contribute to ``g.outputs`` (subgraph reads included)."""
    cache = cache if cache is not None else {}
    producer: dict[int, Node] = {}
    for n in g.nodes:
        for t in n.outputs:
            producer[id(t)] = n
    live: set[int] = set()
    stack = [t for t in g.outputs]
    seen: set[int] = set()
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        n = producer.get(id(t))
        if n is None or id(n) in live:
            continue
        live.add(id(n))
        stack.extend(node_reads(n, cache))
    return live


def toposort(root: gs.Graph) -> None:
    """Sort every graph's nodes so producers come first; stable (original order breaks ties).

    Kahn's algorithm, O(n log n), iterative (gs's own toposort recurses once
    per node of a chain and overflows on unrolled graphs); reads by subgraphs
    count as reads by their node. One pass over a graph's reads both finds
    the dependencies and tells whether the graph is already sorted (then it is
    left as is). Nodes in a cycle (invalid input) keep their relative order at
    the end.
    """
    cache: dict = {}
    for g in all_graphs(root):
        nodes = list(g.nodes)
        producer: dict[int, int] = {}
        for i, n in enumerate(nodes):
            for t in n.outputs:
                producer[id(t)] = i
        deps_of: list[set[int]] = []
        ordered = True
        for i, n in enumerate(nodes):
            deps = {producer[id(t)] for t in node_reads(n, cache) if id(t) in producer}
            deps.discard(i)
            if ordered and deps and max(deps) > i:
                ordered = False
            deps_of.append(deps)
        if ordered:
            continue
        indeg = [len(d) for d in deps_of]
        users: list[list[int]] = [[] for _ in nodes]
        for i, deps in enumerate(deps_of):
            for d in deps:
                users[d].append(i)
        heap = [i for i in range(len(nodes)) if indeg[i] == 0]
        heapq.heapify(heap)
        order = []
        while heap:
            i = heapq.heappop(heap)
            order.append(i)
            for u in users[i]:
                indeg[u] -= 1
                if indeg[u] == 0:
                    heapq.heappush(heap, u)
        if len(order) < len(nodes):
            placed = set(order)
            order += [i for i in range(len(nodes)) if i not in placed]
        g.nodes = [nodes[i] for i in order]


def array(t: gs.Constant) -> np.ndarray:
    """A constant's value as numpy, without caching it on the tensor.

    ``Constant.values`` replaces the tensor's lazily loaded proto with the
    array, and export then re-encodes it: a copy of every weight a pass looked
    at, and a dtype change for types numpy lacks (int4, bfloat16, float8).
    A lazy tensor (:class:`DiskValues`) reads as a read-only memory map.
    Raises ``ValueError`` for other external data that is not loaded.
    """
    v = t._values
    if not isinstance(v, DiskValues) and not is_loaded(t):
        # onnx would resolve the location against the current directory, not the model's folder.
        raise ValueError(f"constant '{t.name}' is external data that is not loaded")
    return v.load() if isinstance(v, LazyValues) else np.asarray(v)


def is_loaded(t: gs.Constant) -> bool:
    """Whether a constant's bytes are in memory (not a reference to an external-data file).

    False for a lazy tensor too: :func:`array` reads it, but from disk, so a
    pass that would copy whole weights can leave it alone.
    """
    v = t._values
    return not (isinstance(v, LazyValues) and v.tensor.data_location == onnx.TensorProto.EXTERNAL)


def tensor_proto(t: gs.Constant) -> onnx.TensorProto:
    """A constant as a TensorProto: the original one when it was never loaded (exact dtype, no copy)."""
    v = t._values
    if isinstance(v, LazyValues):
        return v.tensor
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(v), t.name)


def label(node: Node) -> str:
    return f"{node.op} '{node.name or (node.outputs[0].name if node.outputs else '?')}'"
