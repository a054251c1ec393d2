"""Prepacked weights: weight layout transforms run once, at lower time, not on every call.

A model's weights reach the compiled ``main`` as parameters. Whatever the
program computes from weights alone — a Gemm's transposed B, a convolution
kernel packed into the layout its schedule reads, a reshape — would otherwise
run on every call. :func:`lift_weight_transforms` moves that work into a
separate function with Relax's ``LiftTransformParams``, and
:func:`run_weight_transforms` compiles and runs it once while lowering; the
artifact stores its results next to the original weights (which
``model.onnx`` keeps reading, so the reference still verifies) and ``main``
takes the packed ones.

The contract with the artifact: :class:`PackPlan` says, for each weight
parameter of the lifted ``main`` (in order), either which original weight it is
(``sources[i] = k``: passed through unchanged) or that it is the ``j``-th
output of the transform (``sources[i] = None``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Packed weights may not take more than this factor of the original weights'
#: bytes: lifting is for layout changes, not for materializing expansions
#: (a broadcast or a dequantized copy of a low-bit weight would inflate the
#: artifact for no speed-up).
MAX_GROWTH = 1.25

TRANSFORM_SUFFIX = "_transform_params"


@dataclass
class PackPlan:
    """Where each weight parameter of the lifted ``main`` comes from (see the module docstring)."""

    sources: list[int | None] = field(default_factory=list)
    #: IRModule holding only the transform function (None when nothing is packed).
    transform: object = None
    #: (dtype, shape) of each packed weight, in transform-output order.
    packed: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    note: str = ""

    @property
    def any_packed(self) -> bool:
        return self.transform is not None


def _tensor_bytes(ty) -> int | None:
    shape = getattr(getattr(ty, "shape", None), "values", None)
    if shape is None:
        return None
    try:
        dims = [int(d) for d in shape]
    except TypeError:  # a symbolic dim: not a weight layout change
        return None
    return int(np.prod(dims, dtype=np.int64)) * np.dtype(str(ty.dtype)).itemsize


def lift_weight_transforms(mod, target, passes=(), *, n_weights: int, allowance=None):
    """``(mod, plan)``: ``passes`` applied to ``mod``, then weight-only computations lifted out of ``main``.

    ``mod["main"]`` must take ``num_input`` inputs followed by ``n_weights``
    weights. The returned module holds ``main`` only (taking the plan's
    weights); ``plan.transform`` holds the lifted function. When nothing is
    lifted, or the packed weights would exceed :data:`MAX_GROWTH` times the
    original bytes, the module is returned with ``passes`` applied but nothing
    lifted, and ``plan.sources`` is the identity. ``allowance`` (a callable,
    asked after ``passes`` ran) gives bytes of deliberate expansion the passes
    made on top of that limit (Winograd's transformed weights, within the
    budget its pass keeps).
    """
    import tvm
    from tvm import relax

    with target:
        mod = tvm.transform.Sequential(list(passes))(mod) if passes else mod
        lifted = relax.transform.LiftTransformParams()(mod)
    identity = PackPlan(sources=list(range(n_weights)))
    name = "main" + TRANSFORM_SUFFIX
    if name not in [gv.name_hint for gv in lifted.functions]:
        return mod, identity
    tf = lifted[name]
    bindings = {b.var: b.value for block in tf.body.blocks for b in block.bindings}
    out = tf.body.body
    out = bindings.get(out, out)
    if not isinstance(out, relax.Tuple):  # pragma: no cover - guards a TVM change
        return mod, PackPlan(sources=list(range(n_weights)), note="weight transforms not lifted (unexpected form)")
    param_tuple = tf.params[0]
    sources: list[int | None] = []
    packed_fields = []
    for f in out.fields:
        v = bindings.get(f, f)
        if isinstance(v, relax.TupleGetItem) and v.tuple_value.same_as(param_tuple):
            sources.append(int(v.index))
        else:
            sources.append(None)
            packed_fields.append(f)
    if not packed_fields:
        return mod, identity
    packed = []
    packed_bytes = 0
    for f in packed_fields:
        n = _tensor_bytes(f.ty)
        if n is None:
            return mod, PackPlan(sources=list(range(n_weights)), note="weight transforms not lifted (symbolic shape)")
        packed_bytes += n
        packed.append((str(f.ty.dtype), tuple(int(d) for d in f.ty.shape.values)))
    original = sum(_tensor_bytes(t) or 0 for t in param_tuple.ty.fields)
    extra = int(allowance()) if allowance is not None else 0
    if packed_bytes > MAX_GROWTH * max(original, 1) + extra:
        return mod, PackPlan(sources=list(range(n_weights)),
                             note=f"weight transforms not lifted: packed weights ({packed_bytes} bytes) would exceed "
                                  f"{MAX_GROWTH}x the weights ({original} bytes)"
                                  + (f" plus {extra} bytes of Winograd weights" if extra else ""))
    # main keeps its weight parameters in the order of the transform's outputs.
    main_mod = tvm.IRModule({gv: f for gv, f in lifted.functions.items() if gv.name_hint != name},
                            attrs=lifted.attrs)
    # The transform may call functions of the module (an importer's TE kernels, e.g. einsum): keep those it
    # reaches, and only those (main's kernels may call symbols that only main.so links, such as int8's).
    tf_mod = tvm.IRModule({gv: f for gv, f in lifted.functions.items() if gv.name_hint != "main"}, attrs=lifted.attrs)
    tf_mod = relax.transform.DeadCodeElimination([name])(tf_mod)
    return main_mod, PackPlan(sources=sources, transform=tf_mod, packed=packed)


def run_weight_transforms(plan: PackPlan, weights, target) -> list[np.ndarray]:
    """The packed weights: ``plan.transform`` compiled for ``target`` and run once on ``weights`` (originals, in order)."""
    import tvm
    from tvm import relax

    if not plan.any_packed:
        return []
    with tvm.transform.PassContext(opt_level=3):
        ex = tvm.compile(plan.transform, target=target)
    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    args = [tvm.runtime.from_dlpack(w) if isinstance(w, np.memmap) else tvm.runtime.tensor(np.asarray(w, order="C"), dev)
            for w in weights]
    res = vm["main" + TRANSFORM_SUFFIX](args)
    outs = list(res)
    packed_outs = [o for o, s in zip(outs, plan.sources) if s is None]
    arrays = [o.numpy() for o in packed_outs]
    for a, (dtype, shape) in zip(arrays, plan.packed):
        if str(a.dtype) != dtype or tuple(a.shape) != shape:  # pragma: no cover - guards a TVM change
            raise RuntimeError(f"weight transform returned {a.dtype}{list(a.shape)}, expected {dtype}{list(shape)}")
    return arrays
