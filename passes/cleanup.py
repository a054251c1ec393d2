"""Lossless clean-up passes: fold constants, remove identities and dead code, merge duplicate weights.

Each pass is verified numerically by the PassManager (outputs on ONNX Runtime
before and after must agree), and logs what it replaced at debug level.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphopt.graph import Graph, tensor_array
from graphopt.options import Option
from graphopt.passbase import Pass, PassContext

from ._walk import node_label, rename_uses, replace_all, subgraphs, used_names

log = logging.getLogger("graphopt.passes.cleanup")

# Ops whose outputs vary between runs or need run-time state: never folded.
_NOT_FOLDABLE = {
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
    "Bernoulli", "If", "Loop", "Scan", "SequenceConstruct", "SequenceEmpty", "Optional",
}


_CONSTANT_ATTRS = {
    "value_float": lambda a: np.array(a.f, dtype=np.float32),
    "value_floats": lambda a: np.array(list(a.floats), dtype=np.float32),
    "value_int": lambda a: np.array(a.i, dtype=np.int64),
    "value_ints": lambda a: np.array(list(a.ints), dtype=np.int64),
    "value": lambda a: numpy_helper.to_array(a.t),
}


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a Constant node (None for forms left to ONNX Runtime, e.g. sparse)."""
    for a in node.attribute:
        if a.name in _CONSTANT_ATTRS:
            return _CONSTANT_ATTRS[a.name](a)
    return None


def _shape_value(node: onnx.NodeProto, spec) -> np.ndarray | None:
    """The value of a Shape/Size node when the dims it reads are static."""
    if spec is None:
        return None
    dims = list(spec.shape)
    if node.op_type == "Size":
        return np.array(int(np.prod(dims)), dtype=np.int64) if all(isinstance(d, int) for d in dims) else None
    attrs = {a.name: a.i for a in node.attribute}
    start, end = attrs.get("start", 0), attrs.get("end", len(dims))
    sel = dims[slice(start, end)]
    if not all(isinstance(d, int) for d in sel):
        return None
    return np.array(sel, dtype=np.int64)


class FoldConstants(Pass):
    """Evaluate nodes whose inputs are all constant, including shape arithmetic.

    ``Shape``/``Size`` of a tensor with static dims becomes a constant, so
    Shape→Gather→Concat chains feeding Reshape fold away once input dims are
    fixed (``--input-shape``). Folding is repeated until nothing changes.
    Left alone: random ops, control flow, nodes producing graph outputs, and
    results larger than ``max_mb`` (they would bloat the file).
    """

    name = "fold-constants"
    lossless = True
    options = (
        Option("max_mb", float, 16.0, "largest tensor (MiB) a folded node may produce", min=0),
        Option("max_rounds", int, 8, "fold / re-infer shapes at most this many times", min=1),
    )

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        folded_total = 0
        too_big: set[str] = set()
        for _ in range(self.opts.max_rounds):
            graph, folded = self._round(graph, too_big)
            folded_total += folded
            if not folded:
                break
        self.note("folded_nodes", folded_total)
        if too_big:
            self.note("left_unfolded_too_large", sorted(too_big))
        return graph

    def _round(self, graph: Graph, too_big: set[str]) -> tuple[Graph, int]:
        g = graph.infer_shapes()
        specs = g.value_specs()
        gp = g.graph
        outputs = {o.name for o in gp.output}
        const = {t.name for t in gp.initializer} | {""}
        direct: dict[str, np.ndarray] = {}  # Constant/Shape/Size values computed without running anything
        evaluated: list[int] = []  # indices of nodes to run on ONNX Runtime
        folded: set[int] = set()
        nodes = list(gp.node)
        for idx, node in enumerate(nodes):
            if node.op_type in _NOT_FOLDABLE or node.domain not in ("", "ai.onnx") or any(subgraphs(node)):
                continue
            if any(o in outputs or o in too_big for o in node.output):
                continue
            if node.op_type in ("Shape", "Size", "Constant"):
                if node.op_type == "Constant":
                    val = _constant_value(node)
                else:
                    val = _shape_value(node, specs.get(node.input[0]))
                if val is not None:
                    direct[node.output[0]] = val
                    const.add(node.output[0])
                    folded.add(idx)
                    continue
            if all(i in const for i in node.input):
                evaluated.append(idx)
                folded.add(idx)
                const.update(node.output)
        if not folded:
            return graph, 0
        foldable_outputs = {o for i in folded for o in nodes[i].output}
        readers: dict[str, list[int]] = {}
        for idx, node in enumerate(nodes):
            for name in set(node.input) | {n for sg in subgraphs(node) for n in used_names(sg)}:
                readers.setdefault(name, []).append(idx)
        needed = sorted(o for o in foldable_outputs if any(r not in folded for r in readers.get(o, [])))
        values = dict(direct)
        to_run = [o for o in needed if o not in direct]
        if to_run:
            values.update(self._evaluate(gp, graph.opset, [nodes[i] for i in evaluated], direct, to_run))
        cap = self.opts.max_mb * (1 << 20)
        big = [o for o in needed if values[o].nbytes > cap]
        if big:
            too_big.update(big)
            return graph, 0  # retry without them; their producers stay
        out = graph.copy()
        op = out.graph
        for i in sorted(folded):
            log.debug("fold-constants: folded %s", node_label(nodes[i], i))
        replace_all(op.node, [n for i, n in enumerate(op.node) if i not in folded])
        existing = {t.name for t in op.initializer}
        for name in needed:
            if name not in existing:
                op.initializer.append(numpy_helper.from_array(np.asarray(values[name]), name))
        _drop_unused_initializers(op)
        return out, len(folded)

    @staticmethod
    def _evaluate(gp: onnx.GraphProto, opset: int, nodes, direct, wanted) -> dict[str, np.ndarray]:
        """Run the foldable nodes alone on ONNX Runtime and fetch ``wanted``."""
        import onnxruntime as ort

        used = {i for n in nodes for i in n.input if i}
        inits = [t for t in gp.initializer if t.name in used]
        inits += [numpy_helper.from_array(v, k) for k, v in direct.items() if k in used]
        sub = helper.make_graph(
            list(nodes), "fold", [], [helper.make_empty_tensor_value_info(w) for w in wanted], inits
        )
        for w, vi in zip(wanted, sub.output):
            vi.name = w
        model = helper.make_model(sub, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return dict(zip(wanted, (np.asarray(v) for v in sess.run(wanted, {}))))


def _drop_unused_initializers(gp: onnx.GraphProto) -> int:
    used = used_names(gp) | {o.name for o in gp.output}
    dropped = {t.name for t in gp.initializer if t.name not in used}
    if dropped:
        replace_all(gp.initializer, [t for t in gp.initializer if t.name not in dropped])
        replace_all(gp.input, [v for v in gp.input if v.name not in dropped])
    return len(dropped)


class EliminateIdentity(Pass):
    """Remove Identity nodes (and inference-mode Dropout) by wiring readers to their input.

    Left alone: an Identity that copies a graph input or an initializer straight
    to a graph output (removing it would merge two of the graph's names).
    """

    name = "eliminate-identity"
    lossless = True

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        gp = graph.graph
        outputs = {o.name for o in gp.output}
        inputs = {i.name for i in gp.input} | {t.name for t in gp.initializer}
        removed = 0
        for node in list(gp.node):
            if not self._is_identity(node, gp):
                continue
            src, dst = node.input[0], node.output[0]
            if dst in outputs:
                if src in inputs or src in outputs:
                    continue
                producer = next((n for n in gp.node if src in n.output), None)
                if producer is None:
                    continue
                # The graph output keeps its name: the producer writes it directly.
                producer.output[list(producer.output).index(src)] = dst
                rename_uses(gp, src, dst)
            else:
                rename_uses(gp, dst, src)
            gp.node.remove(node)
            removed += 1
            log.debug("eliminate-identity: removed %s", node_label(node))
        self.note("removed_nodes", removed)
        return graph

    @staticmethod
    def _is_identity(node, gp) -> bool:
        if node.domain not in ("", "ai.onnx") or not node.input or not node.input[0]:
            return False
        if node.op_type == "Identity":
            return True
        if node.op_type == "Dropout":
            extra_used = len(node.output) > 1 and node.output[1] and node.output[1] in used_names(gp) | {o.name for o in gp.output}
            training = len(node.input) > 2 and node.input[2]
            return not extra_used and not training
        return False


class EliminateDead(Pass):
    """Remove nodes whose results nothing reads, unused initializers and stale value_info."""

    name = "eliminate-dead"
    lossless = True

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        gp = graph.graph
        live = {o.name for o in gp.output}
        kept_rev = []
        removed = 0
        for node in reversed(gp.node):
            if any(o and o in live for o in node.output):
                kept_rev.append(node)
                live.update(i for i in node.input if i)
                for sg in subgraphs(node):
                    live |= used_names(sg)
            else:
                removed += 1
                log.debug("eliminate-dead: removed %s", node_label(node))
        replace_all(gp.node, list(reversed(kept_rev)))
        n_init = _drop_unused_initializers(gp)
        known = used_names(gp) | {o for n in gp.node for o in n.output}
        replace_all(gp.value_info, [v for v in gp.value_info if v.name in known])
        self.note("removed_nodes", removed)
        self.note("removed_initializers", n_init)
        return graph


class DedupInitializers(Pass):
    """Merge initializers with identical dtype, shape and bytes into one."""

    name = "dedup-initializers"
    lossless = True

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        gp = graph.graph
        overridable = {v.name for v in gp.input}  # initializers that are also inputs may be fed
        first: dict[tuple, str] = {}
        drop: set[str] = set()
        saved = 0
        for t in gp.initializer:
            if t.name in overridable:
                continue
            arr = tensor_array(t)  # a lazy weight (large model) is read from its file, not from the cwd
            key = (t.data_type, tuple(t.dims), hashlib.sha256(np.ascontiguousarray(arr).data).hexdigest())
            if key in first:
                rename_uses(gp, t.name, first[key])
                drop.add(t.name)
                saved += arr.nbytes
                log.debug("dedup-initializers: %s -> %s", t.name, first[key])
            else:
                first[key] = t.name
        if drop:
            replace_all(gp.initializer, [t for t in gp.initializer if t.name not in drop])
        self.note("merged_initializers", len(drop))
        self.note("bytes_saved", saved)
        return graph


class Cleanup(Pass):
    """All lossless clean-ups (fold-constants, eliminate-identity, eliminate-dead, dedup-initializers) to a fixpoint."""

    name = "cleanup"
    lossless = True
    options = (Option("max_rounds", int, 4, "repeat the clean-ups at most this many times", min=1),)

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        steps = [FoldConstants(), EliminateIdentity(), EliminateDead(), DedupInitializers()]
        totals: dict[str, int] = {}
        for _ in range(self.opts.max_rounds):
            before = graph.to_bytes()
            for p in steps:
                p.notes = {}
                graph = p.run(graph.copy(), ctx)
                for k, v in p.notes.items():
                    if isinstance(v, int):
                        totals[f"{p.name}.{k}"] = totals.get(f"{p.name}.{k}", 0) + v
            if graph.to_bytes() == before:
                break
        self.notes.update(totals)
        return graph
