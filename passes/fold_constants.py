"""fold-constants: evaluate what is constant, soundly, within memory caps, without undoing compression."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, dtype_to_onnx
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphopt.graph import Graph
from graphopt.ir import (IR, GraphSurgeonPass, array, detach, drop_nodes, label, replace_uses, subgraphs,
                         tensor_proto, toposort)
from graphopt.options import Option
from graphopt.reference import reference_session

log = logging.getLogger("graphopt.passes.fold_constants")

# Ops whose outputs vary between runs or hold run-time state: never folded.
_NOT_FOLDABLE = {
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli",
    "If", "Loop", "Scan", "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase",
    "SequenceAt", "SplitToSequence", "ConcatFromSequence", "Optional", "OptionalGetElement", "OptionalHasElement",
}
#: Integer/bool results up to this size always fold: shape arithmetic, even when it grows (Range, Concat).
SHAPE_ARITH_BYTES = 4096
#: Results up to this size fold whatever their type (scalars such as a Cast fp16 epsilon): no weight is that small.
TINY_BYTES = 64
#: Constant inputs up to this size are handed to per-node shape inference as data (shape operands).
_DATA_BYTES = 1 << 16


@dataclass
class FoldStats:
    folded: int = 0
    inlined_ifs: int = 0
    too_big: set = field(default_factory=set)
    kept_compressed: set = field(default_factory=set)
    unbounded: set = field(default_factory=set)
    unproven_shapes: set = field(default_factory=set)
    shape_proof: str | None = None
    proven: dict = field(default_factory=dict)
    attempted: set = field(default_factory=set)
    edited_since_proof: bool = False


def _nbytes(t: gs.Constant) -> int:
    return int(t._values.nbytes)


def _constant_node_value(node: gs.Node):
    """Value of a Constant node (its TensorProto kept as is, not decoded); None for sparse and strings."""
    a = node.attrs
    if "value" in a and isinstance(a["value"], gs.Constant):
        v = a["value"]._values
        if isinstance(v, LazyValues):
            is_str = v.tensor.data_type == onnx.TensorProto.STRING
        else:
            is_str = np.asarray(v).dtype.kind in "OSU"
        return None if is_str else v
    for key, dt in (("value_float", np.float32), ("value_floats", np.float32),
                    ("value_int", np.int64), ("value_ints", np.int64)):
        if key in a:
            return np.array(a[key], dtype=dt)
    return None


def _static_dims(shape) -> tuple[int, ...] | None:
    if shape is None or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        return None
    return tuple(int(d) for d in shape)


def _infer_outputs(node: gs.Node, opset: int) -> list[tuple[np.dtype, tuple[int, ...]]] | None:
    """dtype and static shape of each output from ONNX's per-node inference on the constant inputs.

    None when inference cannot bound every output (then the node is not run).
    """
    try:
        proto = OnnxExporter.export_node(node)
        schema = onnx.defs.get_schema(node.op, opset, node.domain or "")
        types, data = {}, {}
        for t in node.inputs:
            if t.is_empty():
                continue
            types[t.name] = helper.make_tensor_type_proto(dtype_to_onnx(t.dtype), list(t.shape))
            if _nbytes(t) <= _DATA_BYTES:
                data[t.name] = tensor_proto(t)
        got = onnx.shape_inference.infer_node_outputs(
            schema, proto, types, data, opset_imports=[helper.make_opsetid("", opset)])
    except Exception:
        return None
    result = []
    for t in node.outputs:
        if t.is_empty():
            result.append(None)
            continue
        tp = got.get(t.name)
        if tp is None or not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
            return None
        dims = []
        for d in tp.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                return None
            dims.append(int(d.dim_value))
        result.append((np.dtype(helper.tensor_dtype_to_np_dtype(tp.tensor_type.elem_type)), tuple(dims)))
    return result


def _ir_version(opset: int) -> int:
    return 8 if opset <= 17 else 9 if opset <= 20 else 10


def _evaluate(node: gs.Node, opset: int) -> list[np.ndarray] | None:
    """Run one node on ONNX Runtime with its constant inputs fed; None if ORT refuses it."""
    import onnxruntime as ort

    try:
        proto = OnnxExporter.export_node(node)
        feeds, inputs = {}, []
        for t in node.inputs:
            if t.is_empty() or t.name in feeds:
                continue
            arr = array(t)  # may fail: external data not loaded, dtypes numpy lacks
            feeds[t.name] = arr
            inputs.append(helper.make_tensor_value_info(t.name, dtype_to_onnx(arr.dtype), list(arr.shape)))
        outs = [o.name for o in node.outputs if not o.is_empty()]
        g = helper.make_graph([proto], "fold", inputs, [helper.make_empty_tensor_value_info(o) for o in outs])
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = _ir_version(opset)
        so = ort.SessionOptions()
        so.log_severity_level = 4
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        vals = dict(zip(outs, sess.run(outs, feeds)))
    except Exception:
        return None
    return [np.asarray(vals[o.name]) if not o.is_empty() else None for o in node.outputs]


def proven_shapes(ir: IR, ctx, names: set[str]) -> tuple[dict[str, tuple[int, ...]], str | None]:
    """Shapes of ``names`` that are static by ONNX inference AND observed on ONNX Runtime runs.

    Inference runs on a copy with every declared value_info and output shape
    removed (exporters get those wrong), and the observation runs the model on
    two different feeds from ``ctx.data`` with the named values exposed as
    outputs. A name is proven only when inference and both runs agree. Returns
    (proven shapes, why nothing could be proven or None).
    """
    model = ir.to_model()
    del model.graph.value_info[:]
    for o in model.graph.output:
        o.type.tensor_type.ClearField("shape")
    # Inference needs the values of small constants (Reshape targets) but only the types of weights:
    # hand it weights as typed inputs, so it does not serialize them.
    light = onnx.ModelProto()
    _light_copy(model, light)
    try:
        # No data propagation: ONNX materializes values for it (GBs on a hostile ConstantOfShape).
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=False)
    except Exception as e:
        return {}, f"shape inference failed: {type(e).__name__}"
    static: dict[str, tuple[int, ...]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        if vi.name in names and vi.type.tensor_type.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
            if all(d is not None for d in dims):
                static[vi.name] = tuple(dims)
    if not static:
        return {}, None
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in sorted(static) if n not in have)
    probe = Graph(model)
    try:
        feeds = ctx.data.samples(probe, limit=2)
        # The reference's session: a large model's lazy weights are fed from memory maps (ONNX Runtime
        # refuses their absolute external-data locations in a serialized model).
        sess = reference_session(probe)
        wanted = sorted(static)
        seen = [dict(zip(wanted, (np.shape(v) for v in sess.run(wanted, f)))) for f in feeds]
    except Exception as e:
        return {}, f"ONNX Runtime could not run the model to confirm shapes: {type(e).__name__}"
    if not seen:
        return {}, "no input samples to confirm shapes"
    return {n: s for n, s in static.items() if all(tuple(obs[n]) == s for obs in seen)}, None


def _light_copy(model: onnx.ModelProto, out: onnx.ModelProto) -> None:
    """Fill ``out`` with ``model`` minus the main graph's large initializers (typed inputs instead)."""
    for field in ("ir_version", "opset_import", "functions"):
        if field == "ir_version":
            out.ir_version = model.ir_version
        else:
            getattr(out, field).extend(getattr(model, field))
    src, dst = model.graph, out.graph
    dst.name = src.name
    dst.node.extend(src.node)
    dst.input.extend(src.input)
    dst.output.extend(src.output)
    dst.initializer.extend(t for t in src.initializer if _proto_bytes(t) <= _DATA_BYTES)
    dst.sparse_initializer.extend(src.sparse_initializer)
    have = {v.name for v in dst.input}
    dst.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                     for t in src.initializer if _proto_bytes(t) > _DATA_BYTES and t.name not in have)


def _proto_bytes(t: onnx.TensorProto) -> int:
    n = int(np.prod(t.dims, dtype=np.int64))
    try:
        return n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:
        return n * 8


def _known_shape(t: gs.Tensor, g: gs.Graph, proven: dict) -> tuple[int, ...] | None:
    if isinstance(t, gs.Constant):
        return tuple(int(d) for d in t.shape)
    if any(t is i for i in g.inputs):
        return _static_dims(t.shape)  # ORT rejects feeds whose fixed dims differ
    return proven.get(t.name)


def _inline_if(node: gs.Node) -> list[gs.Node]:
    """The nodes replacing an If whose condition is constant: its taken branch, outputs renamed."""
    cond = array(node.inputs[0]).reshape(-1)
    branch = node.attrs["then_branch" if bool(cond[0]) else "else_branch"]
    nodes = list(branch.nodes)
    local = {id(n) for n in nodes}
    pairs = list(zip(branch.outputs, node.outputs))
    detach(node)
    extra = []
    counts: dict[int, int] = {}
    for bo, _ in pairs:
        counts[id(bo)] = counts.get(id(bo), 0) + 1
    for bo, io in pairs:
        producer = bo.inputs[0] if isinstance(bo, gs.Variable) and len(bo.inputs) == 1 else None
        if producer is not None and id(producer) in local and counts[id(bo)] == 1:
            for i, t in enumerate(producer.outputs):
                if t is bo:
                    producer.outputs[i] = io
            replace_uses(bo, io)
        else:  # the branch returns an outer value, a constant or one value twice
            extra.append(gs.Node("Identity", name=f"{io.name}_inlined", inputs=[bo], outputs=[io]))
    return nodes + extra


def fold(ir: IR, ctx, *, cap_bytes: float, rounds: int, stats: FoldStats) -> None:
    """Fold the main graph of ``ir`` in place, up to ``rounds`` sweeps or until nothing changes."""
    for _ in range(rounds):
        if not _sweep(ir, ctx, cap_bytes, stats):
            break
    # Report only the shapes still unproven at the end (earlier sweeps may have settled some).
    stats.unproven_shapes = {n.inputs[0].name for n in ir.g.nodes if n.op in ("Shape", "Size") and n.inputs
                             and not isinstance(n.inputs[0], gs.Constant)}


def _sweep(ir: IR, ctx, cap: float, stats: FoldStats) -> bool:
    g = ir.g
    toposort(g)
    opset = g.opset
    outs = {id(t) for t in g.outputs}
    dead: list[gs.Node] = []
    replaced: dict[int, list[gs.Node]] = {}
    # Prove intermediate shapes before this sweep edits anything (the proof runs an exported copy).
    wanted = {n.inputs[0].name for n in g.nodes if n.op in ("Shape", "Size") and n.inputs
              and isinstance(n.inputs[0], gs.Variable) and _known_shape(n.inputs[0], g, {}) is None}
    # Retry names inference could not settle once edits (inlined branches, folded shapes) may have settled them.
    if wanted - stats.attempted or (stats.edited_since_proof and wanted - set(stats.proven)):
        stats.attempted |= wanted
        stats.edited_since_proof = False
        found, why = proven_shapes(ir, ctx, wanted)
        stats.proven.update(found)
        stats.shape_proof = why or stats.shape_proof
    for node in list(g.nodes):
        if (node.domain or "") not in ("", "ai.onnx"):
            continue
        op = node.op
        if op == "If":  # inlined even when it writes graph outputs: the branch's producers take the names
            if isinstance(node.inputs[0], gs.Constant) and node.inputs[0]._values.nbytes > 0:
                replaced[id(node)] = _inline_if(node)
                stats.inlined_ifs += 1
                log.debug("fold-constants: inlined %s", label(node))
            continue
        if any(id(t) in outs for t in node.outputs):
            continue
        if op in _NOT_FOLDABLE or subgraphs(node):
            continue
        if op == "Constant":
            vals = [_constant_node_value(node)]
            if vals[0] is None:
                continue
        elif op in ("Shape", "Size"):
            src = node.inputs[0]
            shape = _known_shape(src, g, stats.proven)
            if shape is None:
                continue
            if op == "Size":
                vals = [np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)]
            else:
                start = int(node.attrs.get("start", 0))
                end = node.attrs.get("end")
                vals = [np.array(shape[slice(start, None if end is None else int(end))], dtype=np.int64)]
        else:
            ins = [t for t in node.inputs if not t.is_empty()]
            if not all(isinstance(t, gs.Constant) for t in ins):
                continue
            types = _infer_outputs(node, opset)
            if types is None:
                stats.unbounded.add(label(node))
                continue
            sizes = [0 if ty is None else int(np.prod(ty[1], dtype=np.int64)) * ty[0].itemsize for ty in types]
            if any(s > cap for s in sizes):
                stats.too_big.update(t.name for t, s in zip(node.outputs, sizes) if s > cap)
                continue
            in_bytes = sum(_nbytes(t) for t in {id(t): t for t in ins}.values())
            small_ints = all(ty is None or ty[0].kind in "iub" for ty in types) and sum(sizes) <= SHAPE_ARITH_BYTES
            if sum(sizes) > in_bytes and not small_ints and sum(sizes) > TINY_BYTES:
                stats.kept_compressed.add(label(node))
                continue
            vals = _evaluate(node, opset)
            if vals is None:
                stats.unbounded.add(label(node))
                continue
        for t, v in zip(node.outputs, vals):
            if not t.is_empty() and v is not None:
                t.to_constant(v if isinstance(v, LazyValues) else np.asarray(v))
        dead.append(node)
        stats.folded += 1
        log.debug("fold-constants: folded %s", label(node))
    if not dead and not replaced:
        return False
    stats.edited_since_proof = True
    drop_nodes(g, dead)
    if replaced:
        new = []
        for n in g.nodes:
            new.extend(replaced.get(id(n), [n]))
        g.nodes = new
    return True


class FoldConstants(GraphSurgeonPass):
    """Evaluate nodes whose inputs are all constant, including shape arithmetic and constant If.

    Changes: a node whose inputs are constants becomes an initializer; an If
    whose condition is constant is replaced by the branch it takes (outer-scope
    names keep working); ``Shape``/``Size`` become constants only when the
    shape is proven: the input is a constant, a graph input with fixed dims
    (ONNX Runtime enforces those), or ONNX shape inference says it is static
    *and* two ONNX Runtime runs on different feeds observe that same shape
    (inference alone is wrong on real exports). Sweeps repeat until nothing
    changes.

    Leaves alone: random ops, Loop/Scan, sequences, non-ONNX domains, nodes
    producing graph outputs; any node whose output size per-node shape
    inference (run on the actual constant values) cannot bound or puts over
    ``max_mb`` (checked before anything is allocated, so caps hold for every
    intermediate value); and any fold that would store more bytes than the
    constants it reads (DequantizeLinear of low-bit weights, Cast of fp16
    weights, Gather over a palette, Expand/Tile/ConstantOfShape), except
    integer results up to 4 KiB (shape arithmetic) and results up to 64 bytes.
    """

    name = "fold-constants"
    lossless = True
    options = (
        Option("max_mb", float, 16.0, "largest tensor (MiB) a folded node may produce", min=0),
        Option("max_rounds", int, 8, "sweep the graph at most this many times", min=1),
    )

    def rewrite(self, ir, ctx) -> None:
        stats = FoldStats()
        fold(ir, ctx, cap_bytes=self.opts.max_mb * (1 << 20), rounds=self.opts.max_rounds, stats=stats)
        report(self, stats)


def report(p, stats: FoldStats, prefix: str = "") -> None:
    """Record what folding did and what it left alone on pass ``p``."""
    p.note(prefix + "folded_nodes", stats.folded)
    if stats.inlined_ifs:
        p.note(prefix + "inlined_ifs", stats.inlined_ifs)
    for key, val in (("left_unfolded_too_large", stats.too_big), ("kept_compressed", stats.kept_compressed),
                     ("left_unfolded_unbounded", stats.unbounded), ("unproven_shapes", stats.unproven_shapes)):
        if val:
            p.note(prefix + key, sorted(val))
    if stats.shape_proof:
        p.note(prefix + "shape_proof", stats.shape_proof)
