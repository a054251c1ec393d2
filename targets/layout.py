"""Make a module safe for TVM's ``ConvertLayout``.

``relax.transform.ConvertLayout`` (TVM 0.27) dies with ``std::bad_alloc`` on a
``squeeze`` whose axis is negative — what torch's exporter writes for every
``aten.squeeze.dim(x, -2)`` in attention. :func:`normalize_squeeze_axes_pass`
rewrites such axes to their positive equivalent (same meaning: the input's
rank is known), so a CNN with attention still gets its convolutions converted;
the conversion itself is guarded in :func:`graphopt.targets.schedules.conv.conv_layout_passes`.
"""

from __future__ import annotations

def _uses_ops(mod, names: set[str]) -> bool:
    from tvm import relax

    found = False

    def visit(e):
        nonlocal found
        if isinstance(e, relax.Call) and getattr(e.op, "name", None) in names:
            found = True

    for _, f in mod.functions_items():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(f, visit)
    return found


def normalize_squeeze_axes(mod):
    """``mod`` with every ``squeeze`` axis made non-negative (the input rank is static in Relax types)."""
    from tvm import relax

    @relax.expr_functor.mutator
    class _Mutator(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if getattr(call.op, "name", None) != "relax.squeeze" or call.attrs.axis is None:
                return call
            axes = [int(a) for a in call.attrs.axis]
            ndim = getattr(call.args[0].ty, "ndim", -1)
            if ndim < 0 or all(a >= 0 for a in axes):
                return call
            return relax.op.squeeze(call.args[0], [a % ndim for a in axes])

    updates = {}
    for gv, f in mod.functions_items():
        if isinstance(f, relax.Function):
            updates[gv] = _Mutator(mod).visit_expr(f)
    for gv, f in updates.items():
        mod[gv] = f
    return mod


def normalize_squeeze_axes_pass():
    """:func:`normalize_squeeze_axes` as a module pass (a no-op on modules without a conv2d)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="graphopt.NormalizeSqueezeAxes")
    def _pass(mod, _ctx):
        if not _uses_ops(mod, {"relax.nn.conv2d"}):
            return mod
        return normalize_squeeze_axes(tvm.IRModule(mod.functions, attrs=mod.attrs))

    return _pass


# --------------------------------------------------------------------------- robust ConvertLayout

_HIDDEN = "graphopt.layout_hidden."


def _hide_calls(mod, hide):
    """``(module, table)``: every dataflow call ``hide(index, call)`` selects becomes an opaque packed call.

    ``ConvertLayout`` has no layout rule for ``call_pure_packed``, so it feeds a
    hidden call its arguments in their original layout and never runs the op's
    own layout inference (which is what aborts on some ops). ``index`` numbers
    the calls to ops (conv2d excluded) in binding order over the module's Relax
    functions, the same order every time. ``table`` maps the packed name back to
    the original call for :func:`_unhide_calls`.
    """
    import tvm
    from tvm import relax

    conv = tvm.ir.Op.get("relax.nn.conv2d")
    table = {}
    counter = [0]

    @relax.expr_functor.mutator
    class _Hider(relax.PyExprMutator):
        def visit_dataflow_block_(self, block):
            self._in_df = True
            try:
                return super().visit_dataflow_block_(block)
            finally:
                self._in_df = False

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not getattr(self, "_in_df", False) or not isinstance(call.op, tvm.ir.Op) or call.op.same_as(conv):
                return call
            k = counter[0]
            counter[0] += 1
            if not hide(k, call):
                return call
            name = f"{_HIDDEN}{k}"
            table[name] = call
            return relax.Call(tvm.ir.Op.get("relax.call_pure_packed"), [relax.ExternFunc(name), *call.args],
                              None, [call.ty])

    out = tvm.IRModule(mod.functions, attrs=mod.attrs)
    for gv, f in mod.functions_items():
        if isinstance(f, relax.Function):
            out[gv] = _Hider(out).visit_expr(f)
    return out, table, counter[0]


def _unhide_calls(mod, table):
    """Undo :func:`_hide_calls`: each packed stand-in is the original op again, on its (rewritten) arguments."""
    import tvm
    from tvm import relax

    if not table:
        return mod

    @relax.expr_functor.mutator
    class _Unhider(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if getattr(call.op, "name", None) != "relax.call_pure_packed" or not call.args:
                return call
            f = call.args[0]
            orig = table.get(str(f.global_symbol)) if isinstance(f, relax.ExternFunc) else None
            if orig is None:
                return call
            return relax.Call(orig.op, list(call.args[1:]), orig.attrs, list(orig.ty_args))

    out = tvm.IRModule(mod.functions, attrs=mod.attrs)
    for gv, f in mod.functions_items():
        if isinstance(f, relax.Function):
            out[gv] = _Unhider(out).visit_expr(f)
    return out


def _downstream_of_conv(mod) -> set:
    """Indices (as :func:`_hide_calls` numbers them) of the calls that read, transitively, a conv2d output.

    ``ConvertLayout`` only propagates layouts forward from convolutions: every
    other call sees its inputs in their original layout, gains nothing from the
    conversion, and is only a chance for an op's layout inference to abort.
    """
    import tvm
    from tvm import relax

    conv = tvm.ir.Op.get("relax.nn.conv2d")
    marked = set()
    tainted = set()
    counter = [0]

    def uses_tainted(expr) -> bool:
        found = []

        def visit(e):
            if isinstance(e, relax.Var) and e in tainted:
                found.append(e)

        relax.analysis.post_order_visit(expr, visit)
        return bool(found)

    for _, f in mod.functions_items():
        if not isinstance(f, relax.Function):
            continue
        for block in f.body.blocks:
            is_df = isinstance(block, relax.DataflowBlock)
            for b in block.bindings:
                v = b.value
                if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and v.op.same_as(conv):
                    tainted.add(b.var)
                    continue
                dirty = uses_tainted(v)
                # Number the calls exactly as _hide_calls does: ops (not conv2d) in dataflow blocks,
                # nested calls (rare after normalization) before the binding's own.
                if is_df:
                    def visit(e):
                        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and not e.op.same_as(conv):
                            if dirty:
                                marked.add(counter[0])
                            counter[0] += 1

                    relax.analysis.post_order_visit(v, visit)
                if dirty:
                    tainted.add(b.var)
    return marked


def robust_convert_layout(mod, convert, max_culprits: int = 16):
    """``convert(mod)`` (a ``ConvertLayout`` pass) applied to as much of ``mod`` as TVM can convert.

    TVM 0.27's ``ConvertLayout`` runs every op's layout inference and aborts
    the whole module when one of them fails (magika: ``stack`` then ``max``,
    "Invalid SLayout: can't find S in source layout ABC"), even for ops nowhere
    near a convolution. So:

    1. ops that do not read a conv2d output (directly or not) are hidden from
       it (they would keep their layout anyway);
    2. if it still fails, the failing op is found by bisection over the
       remaining ops in binding order (the shortest prefix of exposed ops that
       fails ends with a culprit), hidden, and the conversion tried again, up
       to ``max_culprits`` times.

    A hidden op keeps its original layout: the conversion transposes its
    inputs back, as at the end of any converted chain. Returns ``(module,
    hidden op count)``; the module is ``mod`` unchanged when nothing converts.
    """

    def attempt(expose):
        hidden, table, _ = _hide_calls(mod, lambda k, _c: k not in expose)
        try:
            return _unhide_calls(convert(hidden), table)
        except Exception:  # noqa: BLE001 - TVM's layout inference aborted
            return None

    _, _, total = _hide_calls(mod, lambda k, c: False)
    exposed = sorted(_downstream_of_conv(mod))
    out = attempt(set(exposed))
    culprits = 0
    while out is None and culprits < max_culprits:
        lo, hi = 0, len(exposed)  # invariant: exposed[:lo] converts, exposed[:hi] does not (or hi untested)
        if attempt(set()) is None:
            return mod, total
        while lo < hi:
            mid = (lo + hi) // 2
            if attempt(set(exposed[:mid + 1])) is None:
                hi = mid
            else:
                lo = mid + 1
        if lo >= len(exposed):
            return mod, total
        del exposed[lo]
        culprits += 1
        out = attempt(set(exposed))
    if out is None:
        return mod, total
    return out, total - len(exposed)


_BINARY = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum",
           "relax.power", "relax.floor_divide"}


def scalarize_uniform_constants(mod):
    """``mod`` with each binary op's constant operand whose elements are all equal made a scalar.

    Folding writes ``1 + tanh(x)`` as ``add(full((1, C, W), 1.0), t)``: the same
    value, but a constant of the activation's shape. ``ConvertLayout`` cannot
    transpose a constant, so it keeps such an op in the original layout and
    transposes the converted activation around it (magika: two transposes inside
    its GELU). A scalar broadcasts in any layout. Only done when the other
    operand already has the result's shape (the scalar changes no shape).
    """
    import numpy as np
    import tvm
    import tvm_ffi
    from tvm import relax

    def same_shape(a, b) -> bool:
        sa, sb = getattr(a, "shape", None), getattr(b, "shape", None)
        if sa is None or sb is None or not hasattr(sa, "values") or not hasattr(sb, "values"):
            return False
        va, vb = list(sa.values), list(sb.values)
        return len(va) == len(vb) and all(tvm_ffi.structural_equal(x, y) for x, y in zip(va, vb))

    @relax.expr_functor.mutator
    class _Mutator(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if getattr(call.op, "name", None) not in _BINARY or len(call.args) != 2:
                return call
            args = list(call.args)
            for i in (0, 1):
                c, other = args[i], args[1 - i]
                if not isinstance(c, tvm.ir.GenericConst) or not same_shape(other.ty, call.ty):
                    continue
                v = c.value.numpy()
                if v.ndim == 0 or v.size < 1 or not (v == v.flat[0]).all():
                    continue
                args[i] = relax.const(np.asarray(v.flat[0], dtype=v.dtype), str(v.dtype))
                return relax.Call(call.op, args, call.attrs, list(call.ty_args))
            return call

    return _map_relax_functions(mod, _Mutator)


def clip_as_maximum_minimum(mod):
    """``mod`` with each float ``clip(x, lo, hi)`` written ``minimum(maximum(x, lo), hi)`` on scalar constants.

    ``ConvertLayout`` has no layout rule for ``clip``: inside an NHWC chain it
    transposes to NCHW before every clip and back after it (MobileNetV3's
    HardSwish, ``x * clip(x + 3, 0, 6) / 6``: two transposes per activation,
    and the activation cannot fuse into the conv before it). ``maximum`` and
    ``minimum`` with a scalar are element-wise binary ops it converts; both
    forms legalize to the same ``max``/``min`` of TIR, so the values are the
    same. An infinite bound (no bound) drops its half.
    """
    import math

    import numpy as np
    from tvm import relax

    @relax.expr_functor.mutator
    class _Mutator(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if getattr(call.op, "name", None) != "relax.clip" or len(call.args) != 3:
                return call
            dtype = str(getattr(call.ty, "dtype", ""))
            if not dtype.startswith("float"):
                return call
            try:
                lo, hi = (float(a.value) for a in call.args[1:])
            except (AttributeError, TypeError, ValueError):
                return call  # symbolic bounds: left as clip
            out = call.args[0]
            if lo != -math.inf:
                out = relax.op.maximum(out, relax.const(np.asarray(lo, dtype=dtype), dtype))
            if hi != math.inf:
                out = relax.op.minimum(out, relax.const(np.asarray(hi, dtype=dtype), dtype))
            return out

    return _map_relax_functions(mod, _Mutator)


def _map_relax_functions(mod, mutator_cls):
    """A copy of ``mod`` with every Relax function rewritten by ``mutator_cls`` (a ``PyExprMutator``)."""
    import tvm
    from tvm import relax

    out = tvm.IRModule(mod.functions, attrs=mod.attrs)
    for gv, f in mod.functions_items():
        if isinstance(f, relax.Function):
            out[gv] = mutator_cls(out).visit_expr(f)
    return out
