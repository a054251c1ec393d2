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
