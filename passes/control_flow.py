"""unroll-loops: unroll ONNX Loop (constant trip count) and Scan (static length) into their bodies' ops."""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.errors import LoweringError
from graphopt.graph import Graph
from graphopt.ir import IR, GraphSurgeonPass, has_ops, outer_reads
from graphopt.options import Option
from graphopt.passbase import PassContext

from ._emit import Builder, Namer, bind_output, const_value, remove_node, rewrite_graphs, static_dim

log = logging.getLogger("graphopt.passes.control_flow")

LOOP_OPS = {"Loop", "Scan"}


class _Refused(Exception):
    """A node this pass cannot unroll; the message says why and what to do."""


class UnrollLoops(GraphSurgeonPass):
    """Unroll Loop nodes with a constant trip count and Scan nodes with a static sequence length.

    Every iteration becomes a renamed copy of the body's nodes: the iteration
    number and the (always true) condition become constants, loop-carried
    values flow from one copy to the next, reads of outer-scope values stay
    as they are, and per-iteration scan outputs are stacked with
    Unsqueeze+Concat (reversed where ``scan_output_directions`` says so).
    Scan inputs are cut into steps with a Split that fails at run time if the
    real length differs from the inferred one. Bodies of ``If``/``Loop``/``Scan``
    are visited too, innermost first, so nested loops unroll.

    Refused, naming the node: a trip count that is not a constant, a loop
    condition that starts false-or-unknown or is computed in the body (an
    early exit), a Scan whose length is not static (fix symbolic dims with
    ``--input-shape``), opset-8 Scan, and more than ``max_iterations``
    iterations. Graphs without Loop/Scan are returned as is.
    """

    name = "unroll-loops"
    lossless = True
    options = (
        Option("max_iterations", int, 1024, "refuse loops/scans with more iterations than this", min=1),
    )

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        if not has_ops(graph.graph, LOOP_OPS):
            self.note("unrolled", 0)
            return graph
        # Scan lengths come from inferred shapes (fresh: earlier passes may have left them stale).
        return super().run(graph.infer_shapes(), ctx)

    def rewrite(self, ir: IR, ctx: PassContext) -> None:
        """Unroll every Loop/Scan of ``ir``, innermost first; Scan lengths come from the tensors'
        shapes, so ``run`` infers shapes first. Raises LoweringError listing every refusal."""
        refused: list[str] = []
        limit = self.opts.max_iterations

        def rewrite(g: gs.Graph, namer: Namer) -> int:
            n = 0
            for node in [x for x in g.nodes if x.op in LOOP_OPS and (x.domain or "") in ("", "ai.onnx")]:
                try:
                    if node.op == "Loop":
                        _unroll_loop(g, node, namer, limit)
                    else:
                        _unroll_scan(g, node, namer, limit)
                    n += 1
                    log.debug("unroll-loops: unrolled %s '%s'", node.op, node.name)
                except _Refused as e:
                    refused.append(f"{node.op} '{node.name or node.outputs[0].name}': {e}")
            return n

        count = rewrite_graphs(ir, rewrite)
        if refused:
            raise LoweringError(
                f"{ir.source or 'model'}: unroll-loops cannot unroll {len(refused)} node(s): " + "; ".join(refused)
            )
        self.note("unrolled", count)


def _present(t) -> bool:
    return t is not None and t.name != ""


def _rename_locals(sub: gs.Graph, namer: Namer, hint: str) -> None:
    """Give every value a subgraph defines (inputs, node outputs, nested ones too) a fresh name."""
    for t in sub.inputs:
        t.name = namer.fresh(f"{hint}/{t.name}")
    for node in sub.nodes:
        node.name = namer.fresh(f"{hint}/{node.name or node.op}")
        for t in node.outputs:
            if t.name:
                t.name = namer.fresh(f"{hint}/{t.name}")
        for attr in node.attrs.values():
            if isinstance(attr, gs.Graph):
                _rename_locals(attr, namer, hint)


class _TensorMap:
    """Body tensor -> the tensor it becomes in one iteration (gs tensors are unhashable: keyed by identity)."""

    def __init__(self, pairs=()):
        self._map: dict[int, tuple] = {}
        for k, v in pairs:
            self[k] = v

    def __setitem__(self, key, value) -> None:
        self._map[id(key)] = (key, value)

    def get(self, key, default=None):
        hit = self._map.get(id(key))
        return hit[1] if hit else default

    def by_name(self) -> dict:
        return {k.name: v for k, v in self._map.values()}


def _clone_body(b: Builder, body: gs.Graph, mapping: _TensorMap, hint: str) -> _TensorMap:
    """Copy ``body``'s nodes into ``b.graph``; ``mapping`` maps body tensors to the tensors they become.

    Returns ``mapping`` extended with every value the body computes. Values
    that are neither body inputs nor computed in the body are outer-scope
    reads and stay the same tensors.
    """
    namer = b.namer
    for node in body.nodes:
        outs = []
        for o in node.outputs:
            if not o.name:
                outs.append(gs.Variable.empty())
                continue
            new = gs.Variable(namer.fresh(f"{hint}/{o.name}"), dtype=o.dtype, shape=o.shape)
            mapping[o] = new
            outs.append(new)
        ins = [mapping.get(t, t) if t.name else gs.Variable.empty() for t in node.inputs]
        attrs = {}
        for k, v in node.attrs.items():
            if isinstance(v, gs.Graph):
                # gs's copy makes a detached same-name tensor of every outer value its map lacks; graphopt.ir
                # sees reads by identity, so map each outer read to its tensor in this iteration (or itself).
                outer = {t.name: mapping.get(t, t) for t in outer_reads(v)}
                outer.update(mapping.by_name())
                v = v.copy(tensor_map=outer)
                _rename_locals(v, namer, hint)
            attrs[k] = v
        new_node = gs.Node(node.op, namer.fresh(f"{hint}/{node.name or node.op}"), attrs, inputs=ins, outputs=outs,
                           domain=node.domain)
        b.graph.nodes.append(new_node)
        b.nodes.append(new_node)
    return mapping


def _stack(b: Builder, values: list, axis: int):
    """Stack per-iteration values along a new ``axis`` (Unsqueeze each, Concat)."""
    parts = [b.unsqueeze(v, [axis]) for v in values]
    return b.op("Concat", parts, {"axis": axis}) if len(parts) > 1 else parts[0]


def _cond_always_true(body: gs.Graph) -> bool:
    """Whether the body's output condition is constant true or passes the input condition through."""
    out, cond_in = body.outputs[0], body.inputs[1]
    while True:
        if out is cond_in:
            return True
        v = const_value(out)
        if v is not None:
            return bool(np.all(v))
        producers = list(out.inputs)
        if len(producers) == 1 and producers[0].op == "Identity":
            out = producers[0].inputs[0]
            continue
        return False


def _unroll_loop(g: gs.Graph, node: gs.Node, namer: Namer, limit: int) -> None:
    ins = list(node.inputs)
    trip, cond = (ins + [gs.Variable.empty()] * 2)[:2]
    carried = ins[2:]
    body: gs.Graph = node.attrs["body"]
    if not _present(trip):
        raise _Refused("it has no trip count (a while loop); only loops with a constant trip count can be unrolled")
    tv = const_value(trip)
    if tv is None:
        raise _Refused(
            f"its trip count '{trip.name}' is not a constant; fix the input dims it depends on with --input-shape "
            "(or its inputs with --input-value) so that it folds"
        )
    count = int(np.asarray(tv).reshape(-1)[0])
    if _present(cond):
        cv = const_value(cond)
        if cv is None:
            raise _Refused(f"its initial condition '{cond.name}' is not a constant")
        if not bool(np.all(cv)):
            count = 0
    if count > limit:
        raise _Refused(f"{count} iterations is over unroll-loops(max_iterations={limit})")
    if count > 1 and not _cond_always_true(body):
        raise _Refused("its body computes the loop condition (an early exit), which cannot be unrolled statically")
    n_carried = len(carried)
    n_scan = len(body.outputs) - 1 - n_carried
    if count <= 0 and n_scan:
        raise _Refused("it runs zero times but has scan outputs, whose shape is then unknown")

    prefix = node.name or node.outputs[0].name
    b = Builder(g, namer, prefix)
    outs = remove_node(node, g)
    scans: list[list] = [[] for _ in range(n_scan)]
    for i in range(count):
        hint = f"{prefix}/iter{i}"
        mapping = _TensorMap([(body.inputs[0], b.const(np.array(i, np.int64)))])
        if len(body.inputs) > 1:
            mapping[body.inputs[1]] = b.const(np.array(True))
        for k, v in zip(body.inputs[2:], carried):
            mapping[k] = v
        _clone_body(b, body, mapping, hint)
        carried = [mapping.get(o, o) for o in body.outputs[1: 1 + n_carried]]
        for k, o in enumerate(body.outputs[1 + n_carried:]):
            scans[k].append(mapping.get(o, o))
    results = carried + [_stack(b, s, 0) for s in scans]
    for orig, res in zip(outs, results):
        if orig.name:
            bind_output(b, res, orig)


def _unroll_scan(g: gs.Graph, node: gs.Node, namer: Namer, limit: int) -> None:
    if namer.opset < 9:
        raise _Refused("opset-8 Scan (with a batch axis and sequence_lens) is not supported; convert to opset 9+")
    body: gs.Graph = node.attrs["body"]
    n_in = int(node.attrs["num_scan_inputs"])
    ins = list(node.inputs)
    n_state = len(ins) - n_in
    states, scan_ins = ins[:n_state], ins[n_state:]
    n_out = len(body.outputs) - n_state
    in_axes = list(node.attrs.get("scan_input_axes", [0] * n_in))
    in_dirs = list(node.attrs.get("scan_input_directions", [0] * n_in))
    out_axes = list(node.attrs.get("scan_output_axes", [0] * n_out))
    out_dirs = list(node.attrs.get("scan_output_directions", [0] * n_out))

    length = None
    for t, axis in zip(scan_ins, in_axes):
        if axis < 0:
            if t.shape is None:
                raise _Refused(f"the rank of scan input '{t.name}' is unknown, so its negative axis cannot be resolved")
            axis += len(t.shape)
        d = static_dim(t, axis)
        if d is None:
            shape = None if t.shape is None else list(t.shape)
            raise _Refused(
                f"its sequence length (dim {axis} of '{t.name}', shape {shape}) is not static; fix the model's "
                "symbolic input dims with --input-shape NAME:D1,D2,... and let fold-constants (cleanup) run first"
            )
        if length is not None and d != length:
            raise _Refused(f"its scan inputs have different lengths ({length} and {d})")
        length = d
    if length is None:
        raise _Refused("it has no scan inputs")
    if length > limit:
        raise _Refused(f"{length} iterations is over unroll-loops(max_iterations={limit})")
    if namer.opset < 11 and any(a < 0 for a in out_axes):
        raise _Refused("negative scan_output_axes need opset 11 or later")

    prefix = node.name or node.outputs[0].name
    b = Builder(g, namer, prefix)
    outs = remove_node(node, g)
    # Cut every scan input into its steps once (a Split also checks the length at run time).
    steps = []
    for t, axis in zip(scan_ins, in_axes):
        pieces = b.split(t, [1] * length, axis)
        steps.append([b.squeeze(p, [axis]) for p in pieces])
    per_iter: list[list] = [[] for _ in range(n_out)]
    for i in range(length):
        hint = f"{prefix}/iter{i}"
        mapping = _TensorMap(zip(body.inputs[:n_state], states))
        for j, (x, direction) in enumerate(zip(body.inputs[n_state:], in_dirs)):
            mapping[x] = steps[j][length - 1 - i if direction else i]
        _clone_body(b, body, mapping, hint)
        states = [mapping.get(o, o) for o in body.outputs[:n_state]]
        for k, o in enumerate(body.outputs[n_state:]):
            per_iter[k].append(mapping.get(o, o))
    stacked = []
    for values, axis, direction in zip(per_iter, out_axes, out_dirs):
        stacked.append(_stack(b, values[::-1] if direction else values, axis))
    for orig, res in zip(outs, states + stacked):
        if orig.name:
            bind_output(b, res, orig)
