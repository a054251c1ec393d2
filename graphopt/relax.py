"""Graph -> TVM Relax, shared by every TVM target.

- :func:`unsupported_ops` lists every node the Relax ONNX importer has no converter for;
- :func:`select_params` picks the initializers that stay weights (function
  parameters read from ``weights.bin``) rather than constants compiled in;
- :func:`import_graph` runs the importer with those parameters and turns its
  failures into errors that name the node and say what to do;
- :func:`build_pipeline` is TVM's default Relax build pipeline plus the one
  step that makes its output reproducible (see :func:`canonicalize_shape_funcs`).
"""

from __future__ import annotations

import contextlib
import gc
import threading

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.errors import LoweringError, UnsupportedOpsError
from graphopt.graph import Graph

#: Smallest initializer (in elements) kept as a weight. Smaller ones (shapes,
#: axes, scales, scalars) become constants: the importer needs many of them as
#: compile-time values (Reshape targets, Resize scales, Slice bounds...).
MIN_PARAM_ELEMENTS = 16
_PARAM_KINDS = "fc"  # float and complex tensors; integer tensors are usually shapes or indices


def unsupported_ops(graph: Graph, native=()) -> dict[str, list[str]]:
    """``{op: [node names]}`` for every node TVM's ONNX importer cannot convert (subgraphs included).

    ``native``: standard ops the target converts itself (converters passed to :func:`import_graph`)."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) | {"Constant", "If"} | set(native)
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


def _default_pipeline_passes() -> set[str]:
    """Names of the passes ``graphopt.api.DEFAULT_LOWER_PIPELINE`` runs."""
    from graphopt.api import DEFAULT_LOWER_PIPELINE_UNROLLED

    # The default of a target without native recurrences (one with them never refuses LSTM/GRU/RNN).
    return {step.split("(")[0].strip() for step in DEFAULT_LOWER_PIPELINE_UNROLLED.split(",")}


def _is_standard(op: str) -> bool:
    """Whether ``op`` (``Name`` or ``domain.Name``) is an operator of the ONNX standard (ai.onnx, ai.onnx.ml)."""
    domain, _, name = op.rpartition(".")
    if domain not in ("", "ai.onnx", "ai.onnx.ml"):
        return False
    try:
        return onnx.defs.has(name, domain)
    except Exception:  # pragma: no cover - defensive: an odd name must not hide the real error
        return False


def raise_if_unsupported(graph: Graph, target: str, native=()) -> None:
    """Refuse a graph with ops the importer cannot convert, listing every op and its nodes at once.

    Standard ONNX ops are named as such (TVM's importer has no converter for
    them) with the built-in pass that rewrites them, where one exists;
    ops of other domains (``com.microsoft``...) are named as non-standard.
    """
    missing = unsupported_ops(graph, native)
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
            + " before lowering"
            + (" (the default lower pipeline does)" if set(by_pass) <= _default_pipeline_passes() else "")
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
    """The model the importer sees: params as trailing graph inputs, other initializers as Constant nodes.

    Params are declared as inputs (same name, dtype and shape) rather than
    handed over as initializers, so the importer never reads or copies a
    weight: they become parameters of ``main`` after the real inputs, in
    ``params`` order, which is exactly how the artifact calls it. A lazy tensor
    (a large model's weight left on disk) is therefore never loaded here.
    """
    from graphopt.graph import _copy_fields, is_lazy, tensor_array

    src = graph.model
    g = onnx.ModelProto()
    _copy_fields(g, src, skip="graph")
    _copy_fields(g.graph, src.graph, skip="initializer")
    keep = set(params)
    by_name = {t.name: t for t in src.graph.initializer}
    # A lazy tensor that is not a weight (a large integer table, say) becomes an inline constant.
    consts = [onnx.helper.make_node("Constant", [], [t.name], name=f"graphopt_const_{t.name}",
                                    value=numpy_helper.from_array(np.asarray(tensor_array(t)), t.name) if is_lazy(t) else t)
              for t in src.graph.initializer if t.name not in keep]
    names = {t.name for t in src.graph.initializer}
    kept_inputs = [v for v in g.graph.input if v.name not in names]
    del g.graph.input[:]
    g.graph.input.extend(kept_inputs)
    for name in params:
        t = by_name[name]
        g.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
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


def _gather_converter():
    """TVM's ONNX ``Gather`` converter, made cheap to compile and memory-safe (see :func:`_graphopt_converters`).

    - A constant index (every per-step Gather of an unrolled recurrence) is
      checked against the axis extent and normalized here: the importer's
      generic path emits six ops per Gather (shape_of, shape_to_tensor, take,
      less, add, where) that Relax's FoldConstant then evaluates one by one,
      building a kernel each time: 200 s of tashkeel's 250 s compile.
    - A runtime index gathers with ``mode="clip"``, not the importer's
      ``"fast"`` (no bounds check): an out-of-range id in the user's input
      (a token, a character) would read outside the table, or crash. ONNX
      Runtime rejects such an index; the artifact cannot raise from a kernel,
      so it clamps it instead (negative indices are normalized first, as ONNX
      defines them).
    """
    import numpy as np
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend

    class Gather(onnx_frontend.Gather):
        @classmethod
        def _impl_v13(cls, bb, inputs, attr, params):
            data, indices = inputs[0], inputs[1]
            const = tvm.ir.GenericConst
            if isinstance(indices, const) and not isinstance(data, (const, relax.ShapeExpr)):
                extent = _static_dim(data, attr.get("axis", 0))
                if extent is not None:
                    idx = indices.value.numpy()
                    if idx.size and (idx.min() < -extent or idx.max() >= extent):
                        raise ValueError(f"Gather index out of range [-{extent}, {extent - 1}]: {idx.min()}..{idx.max()}")
                    idx = np.where(idx < 0, idx + extent, idx).astype(idx.dtype)
                    return relax.op.take(data, relax.const(idx, str(idx.dtype)), attr.get("axis", 0), mode="fast")
            out = super()._impl_v13(bb, inputs, attr, params)
            if isinstance(out, relax.Call) and getattr(out.op, "name", "") == "relax.take" and out.attrs.mode == "fast":
                out = relax.op.take(out.args[0], out.args[1], out.attrs.axis, mode="clip")
            return out

    return Gather


def _clip_converter():
    """TVM's ONNX ``Clip`` converter, with constant float bounds written as Relax's own ``clip`` op.

    The importer emits a bounded Clip (opset 11+: bounds as inputs; ReLU6 as
    PyTorch exports it) as ``call_tir`` kernels of its own, which no Relax pass
    can see into: inside an NHWC chain ``ConvertLayout`` transposed around every
    one, and the activation never fused into the conv before it. As ``clip``
    it is what the importer makes of HardSwish and HardSigmoid too, and the
    conv layout pass rewrites all of them alike
    (:func:`graphopt.targets.layout.clip_as_maximum_minimum`). A missing, NaN
    or infinite bound means no bound (as ONNX Runtime reads it). Anything else
    (runtime bounds, integer tensors) goes to TVM's converter.
    """
    import math

    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend

    def is_float(x) -> bool:
        return str(getattr(getattr(x, "ty", None), "dtype", "")).startswith("float")

    def clip(x, lo, hi):
        lo = -math.inf if lo is None or math.isnan(lo) else lo
        hi = math.inf if hi is None or math.isnan(hi) else hi
        return x if (lo, hi) == (-math.inf, math.inf) else relax.op.clip(x, lo, hi)

    class Clip(onnx_frontend.Clip):
        @classmethod
        def _impl_v13(cls, bb, inputs, attr, params):
            bounds = [*inputs[1:3], None, None][:2]
            if not is_float(inputs[0]) or any(
                    b is not None and not (isinstance(b, tvm.ir.GenericConst) and b.value.numpy().size == 1)
                    for b in bounds):
                return super()._impl_v13(bb, inputs, attr, params)
            return clip(inputs[0], *(None if b is None else float(b.value.numpy().reshape(())) for b in bounds))

        @classmethod
        def _impl_v11(cls, bb, inputs, attr, params):
            return cls._impl_v13(bb, inputs, attr, params)

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            # Opsets 1-10: the bounds are attributes (ReLU6 in models exported before opset 11).
            if not is_float(inputs[0]):
                return super()._impl_v1(bb, inputs, attr, params)
            return clip(inputs[0], attr.get("min"), attr.get("max"))

    return Clip


def _static_dim(expr, axis: int) -> int | None:
    """``expr``'s extent along ``axis`` when it is a known integer, else None."""
    values = getattr(getattr(getattr(expr, "ty", None), "shape", None), "values", None)
    if values is None:
        return None
    if axis < 0:
        axis += len(values)
    if not 0 <= axis < len(values):
        return None
    try:
        return int(values[axis])
    except (TypeError, ValueError):
        return None


_CONVERTERS_LOCK = threading.Lock()


@contextlib.contextmanager
def _graphopt_converters(extra=None):
    """While active, TVM's ONNX importer uses graphopt's converters where it has one (:func:`_gather_converter`,
    :func:`_clip_converter`, and ``extra``: a target's, see :func:`import_graph`).

    The importer reads its op table from ``onnx_frontend._get_convert_map()``
    on every conversion and offers no argument to extend it, so the function
    is swapped for the duration of one import (under a lock) and restored.
    """
    from tvm.relax.frontend.onnx import onnx_frontend

    with _CONVERTERS_LOCK:
        original = onnx_frontend._get_convert_map
        overrides = {"Gather": _gather_converter(), "Clip": _clip_converter(), **(extra or {})}
        onnx_frontend._get_convert_map = lambda: {**original(), **overrides}
        try:
            yield
        finally:
            onnx_frontend._get_convert_map = original


def import_graph(graph: Graph, params: list[str], converters=None):
    """The Relax IRModule of ``graph`` whose ``main`` takes (inputs..., params...).

    ``converters``: ``{op: OnnxOpConverter class}`` a target adds to (or overrides in) the importer's table.
    """

    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    model = _importable_model(graph, params)
    failure = None
    try:
        with _graphopt_converters(converters):
            mod = from_onnx(model, opset=graph.opset, keep_params_in_input=True)
    except Exception as e:
        failure = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    if failure is not None:
        # Let the importer's half-built state go now, while its warnings are still being captured.
        gc.collect()
        raise LoweringError(f"{graph.source or 'model'}: TVM could not import the graph: {failure}{_shape_hint(graph)}")
    mod, _ = relax.frontend.detach_params(mod)
    n_inputs = len(graph.inputs)
    main = mod["main"]
    got = len(main.params) - n_inputs
    if got != len(params):  # pragma: no cover - guards an importer change
        raise LoweringError(f"TVM importer produced {got} weight parameters, expected {len(params)}")
    # Only the real inputs are checked at call time; weights come from weights.bin (as with initializer params).
    mod["main"] = main.with_attr("num_input", n_inputs)
    return mod


def identifier_params(mod):
    """``mod`` with ``main``'s parameters renamed to C identifiers where their ONNX names are not.

    The importer names a parameter after its graph input or initializer (``encoder/layer.0/weight:0``);
    kernels take their buffers' names from it, and a backend that emits C source (CUDA) writes them into
    kernel signatures, where nvcc refuses them. Arguments go by position, so renaming changes nothing
    else. A name is its non-identifier characters replaced by ``_`` with the parameter's position appended
    (unique); a valid name is kept. Returns ``mod`` itself when nothing needs renaming.
    """
    import re

    from tvm import relax

    main = mod["main"]
    ok = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
    mapping = {}
    params = []
    for i, p in enumerate(main.params):
        if ok.fullmatch(p.name):
            params.append(p)
            continue
        clean = re.sub(r"[^A-Za-z0-9_]", "_", p.name)
        new = relax.Var(f"{'p_' if not clean or clean[0].isdigit() else ''}{clean}_{i}", p.ty)
        mapping[p] = new
        params.append(new)
    if not mapping:
        return mod

    @relax.expr_functor.mutator
    class _Rename(relax.PyExprMutator):
        def visit_var_(self, op):
            return mapping.get(op, op)

    body = _Rename(mod).visit_expr(main.body)
    out = mod.clone()
    out["main"] = relax.Function(params, body, main.ret_ty, main.is_pure, main.attrs, main.span)
    return out


# ------------------------------------------------------------ reproducible builds
def rewrite_relax_functions(mod, rewriter_cls):
    """``mod`` with every Relax function passed through ``rewriter_cls`` (a ``PyExprMutator`` class).

    One rewriter serves the whole module, so functions it adds through its
    builder (TIR kernels) are shared between the Relax functions it visits.
    """
    from tvm import relax

    rw = rewriter_cls(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rw.builder_.update_func(gv, rw.visit_expr(func))
    return rw.builder_.get()


def _heap_reads(expr, out: list) -> bool:
    """Collect the BufferLoads of a PrimExpr into ``out``.

    Returns False when ``expr`` holds a node kind this walker does not know, so
    the caller can stay conservative instead of guessing what it reads.
    """
    from tvm import ir
    from tvm.ir.prim import expr as E

    if isinstance(expr, (E.IntImm, E.FloatImm, E.Var, int, float)):
        return True
    if isinstance(expr, ir.expr.TensorLoad):  # what tirx.BufferLoad builds in TVM 0.27
        out.append(expr)
        return all(_heap_reads(i, out) for i in expr.indices)
    if isinstance(expr, (E.BinaryOpExpr, E.CmpExpr, E.LogicalExpr)):
        return _heap_reads(expr.a, out) and _heap_reads(expr.b, out)
    if isinstance(expr, E.Not):
        return _heap_reads(expr.a, out)
    if isinstance(expr, E.Cast):
        return _heap_reads(expr.value, out)
    if isinstance(expr, E.Select):
        return all(_heap_reads(x, out) for x in (expr.condition, expr.true_value, expr.false_value))
    if isinstance(expr, ir.Call):  # struct-info shape expressions are pure, calls included
        return all(_heap_reads(x, out) for x in expr.args)
    return False


def _sorted_stores(body):
    """``body`` with its shape-heap stores ordered by slot, or None when that could change its meaning.

    Reordering is sound only for a flat sequence of stores into one buffer at
    distinct constant indices, none of which reads a slot another one writes.
    """
    from tvm import tirx
    from tvm.ir.prim import expr as E

    stmts = list(body.seq) if isinstance(body, tirx.SeqStmt) else None
    if not stmts or not all(isinstance(s, tirx.BufferStore) for s in stmts):
        return None
    buf = stmts[0].buffer
    slots = []
    for s in stmts:
        if not s.buffer.same_as(buf) or len(s.indices) != 1 or not isinstance(s.indices[0], E.IntImm):
            return None
        slots.append(int(s.indices[0].value))
    if len(set(slots)) != len(slots):
        return None
    written = set(slots)
    for s in stmts:
        reads: list = []
        if not _heap_reads(s.value, reads):
            return None
        for load in reads:  # any buffer: a shape function has only the heap
            idx = load.indices[0] if len(load.indices) == 1 else None
            if not isinstance(idx, E.IntImm) or int(idx.value) in written:
                return None
    order = sorted(range(len(stmts)), key=slots.__getitem__)
    if order == list(range(len(stmts))):
        return body
    return tirx.SeqStmt([stmts[i] for i in order])


def canonicalize_shape_funcs():
    """A module pass that puts the stores of every symbolic-shape function in slot order.

    Why: TVM's ``VMShapeLower`` emits the shape computations of a dynamic-shape
    model (``H[k] = H[0] * 16`` ...) in the iteration order of a C++
    ``unordered_map`` keyed by a hash of the expressions, which for free
    variables is their address. That order changes from build to build (even in
    one process), so ``main.so`` did too. The stores of one such function are
    independent (each reads only slots of variables and writes a distinct
    computed slot), so ordering them by slot index changes nothing but the bytes.
    Functions of any other form are left exactly as they are.
    """
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="graphopt.CanonicalizeShapeFuncs")
    def _pass(mod, _ctx):
        updates = {}
        for gvar, func in mod.functions.items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            body = _sorted_stores(func.body)
            if body is not None and not body.same_as(func.body):
                updates[gvar] = func.with_body(body)
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod

    return _pass


#: The PrimFunc attribute that tells TVM's LLVM codegen a function's buffers do not alias (``tir.noalias``
#: before TVM's tir -> tirx rename).
NOALIAS_ATTR = "tirx.noalias"


def mark_trivially_noalias():
    """A module pass giving every PrimFunc with at most one pointer parameter the ``tirx.noalias`` attribute.

    Why: TVM 0.27's LLVM codegen drops the type-based alias information of
    *every* function in a module as soon as one function lacks ``tirx.noalias``
    (all accesses then share one TBAA tag). ``VMShapeLower`` adds such a function
    to every dynamic-shape model (``shape_func(H)``: one buffer, which trivially
    aliases nothing), so in dynamic-batch artifacts LLVM could no longer keep a
    GEMM's accumulator tile in registers: a store after every FMA, 1.7x slower
    ([n*128, 1024] x [1024, 256] on AVX2: 1.15 ms dynamic vs 0.65 ms static).
    A function with two or more pointer parameters is left as it is: whether
    those alias is not this pass's to decide.
    """
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="graphopt.MarkTriviallyNoalias")
    def _pass(mod, _ctx):
        updates = {}
        for gvar, func in mod.functions.items():
            if not isinstance(func, tirx.PrimFunc) or (func.attrs is not None and NOALIAS_ATTR in func.attrs):
                continue
            pointers = [p for p in func.params if p.dtype == "handle"]
            if len(pointers) <= 1:
                updates[gvar] = func.with_attr(NOALIAS_ATTR, True)
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod

    return _pass


def build_pipeline(target=None, *, before_legalize=(), after_fusion=()):
    """The Relax build pipeline for ``tvm.compile``, then :func:`canonicalize_shape_funcs`.

    Without arguments it is TVM's default pipeline. With a ``target`` it is
    TVM's pipeline for that target's kind (``cuda``: TVM's CUDA backend, with
    CUDA-graph rewriting; anything else: its generic CPU backend): library
    dispatch, legalize, fold, fuse, dataflow lowering, memory planning, VM
    lowering, with two hooks a target fills in (see
    :meth:`graphopt.target.Target` subclasses' ``relax_passes`` and
    ``schedule_rules``): ``before_legalize`` (Relax passes on high-level ops,
    e.g. layout conversion) and ``after_fusion`` (passes on the fused TIR
    functions, e.g. applying schedules). TVM's CUDA pipeline applies its own
    dlight rules after fusion; here the target's ``after_fusion`` replaces
    them, so every kernel is scheduled by what the target declares. The
    passes run under ``target``, so rules that read it (vector width, cores,
    thread limits) see the one being built for.

    ``VMShapeLower`` runs near the end (only ``AttachGlobalSymbol`` follows
    it), so canonicalizing after the whole pipeline sees its output unchanged.
    """
    import tvm
    from tvm import relax

    if target is None:
        return tvm.transform.Sequential([relax.get_pipeline("default"), canonicalize_shape_funcs(),
                                         mark_trivially_noalias()], name="graphopt.build_pipeline")
    if target.kind.name == "cuda":
        from tvm.relax.backend.cuda import pipeline as backend
    else:
        from tvm.relax.backend.cpu_generic import pipeline as backend

    legalize = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]
    passes = [
        *backend.library_dispatch_passes(target),
        *before_legalize,
        *legalize,
        *after_fusion,
        *backend.dataflow_lower_passes(target),
        *backend.finalize_passes(target),
        canonicalize_shape_funcs(),
        mark_trivially_noalias(),
    ]

    @tvm.transform.module_pass(opt_level=0, name="graphopt.build_pipeline")
    def _pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def output_specs(mod, graph: Graph) -> list[dict] | None:
    """The graph outputs' specs as the imported program really returns them (``main``'s return type).

    Exporters declare wrong output shapes (ddddocr declares ``[1, seqlen]`` for a
    ``[T, 1, 8210]`` result), and passes keep what was declared; the Relax
    importer computes each output's shape from the ops. Fixed dims become ints,
    symbolic ones their variable's name, unknown ones ``"?"``. Returns None when
    the return type does not line up with the graph's outputs (then the
    declared specs stand).
    """
    from tvm import tirx

    ret = mod["main"].ret_ty
    fields = list(ret.fields) if hasattr(ret, "fields") else [ret]
    declared = graph.outputs
    if len(fields) != len(declared):
        return None
    out = []
    for spec, ty in zip(declared, fields):
        shape = getattr(ty, "shape", None)
        values = getattr(shape, "values", None)
        if values is None:
            return None
        dims = [int(v) if isinstance(v, tirx.IntImm) else (v.name if isinstance(v, tirx.Var) else "?") for v in values]
        out.append({"name": spec.name, "dtype": spec.dtype, "shape": dims})
    return out
