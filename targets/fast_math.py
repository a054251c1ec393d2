"""Fast math: float32 transcendental functions as vectorizable polynomials, before legalization.

TVM legalizes ``exp``, ``erf``, ``tanh``, ``sigmoid``, GELU (erf and tanh
forms), SiLU and softmax's ``exp`` into calls of the C library, one scalar call
per element: the schedules cannot vectorize those loops (a TIR ``vectorize``
would only call ``expf`` once per lane), and in a GEMM or convolution epilogue
the calls cost more than the arithmetic. ONNX Runtime computes the same
functions with vectorized polynomial approximations (MLAS).

:func:`fast_math_pass` is a Relax pass, run on the high-level ops before
legalization (:func:`graphopt.targets.cpu.relax_passes`), that replaces each
float32 call of

    ``relax.exp``, ``relax.erf``, ``relax.tanh``, ``relax.sigmoid``,
    ``relax.nn.gelu``, ``relax.nn.gelu_tanh``, ``relax.nn.silu``, ``relax.nn.softmax``

by a ``call_tir`` of a TE kernel built from the expressions below (arithmetic,
``floor``, ``reinterpret``, shifts, selects and ``isnan`` only; every one has a
vector instruction). Fusion then works as before: the kernels are element-wise
(softmax keeps TOPI's max / exp / sum / divide structure), so they still fuse
into their producers' epilogues (``fused_matmul_add_fast_gelu``), and the
schedules vectorize them. The CPU target's option ``fast_math`` (default on)
switches it off (``--target-opt fast_math=false``). Other dtypes are left alone.

Accuracy, against float64 references over every float32 magnitude from 1e-30
to FLT_MAX (both signs), [-20, 20] densely, 0, the limits and NaN, measured on
the vectorized kernels (``tests/test_fast_math.py`` asserts these bounds):

=========  ==================================  ==============================================
function   method                              max error measured (float32 in and out)
=========  ==================================  ==============================================
exp        Cody-Waite reduction by ln 2,       rel 8.3e-8 (under 1 ulp) for normal results;
           degree-6 minimax (Cephes), scale    subnormal results within 1e-44 abs; 0 below
           by 2^n as two exponent factors      -103.97, +inf above 88.7228 (as expf)
erf        rational 13/8 (Eigen), |x| <= 4,    abs 3.3e-7, rel 3.3e-7 (worst near |x| = 3.9)
           result clamped to [-1, 1]
tanh       rational 13/6 (Eigen), |x| <= 9;    abs 2.6e-7, rel 2.7e-7
           x itself for |x| < 4e-4
sigmoid    1 / (1 + exp(-x))                   abs 8.9e-8, rel 1.5e-7 where the result is
                                               normal (0 below x = -88.7, as 1/(1+inf))
gelu       0.5 x (1 + erf(x / sqrt 2))         abs 1.9e-7 |x| (9.3e-7 at x = -5.6, where the
                                               float32 formula itself cancels; TVM's too)
gelu_tanh  0.5 x (1 + tanh(..))                abs 2.0e-7 |x|
silu       x * sigmoid(x)                      abs 1.4e-7 |x|
softmax    max, exp(x - max), sum, divide      abs 1.5e-7 (rows of 7-4096, -inf / -1e9 masks)
=========  ==================================  ==============================================

Limits and special values: NaN in gives NaN out (the clamps alone would turn
it into a finite number, so each function selects the input back where it is
NaN); exp(+inf) = +inf, exp(-inf) = 0; erf, tanh(+-inf) = +-1; sigmoid(+inf)
= 1, sigmoid(-inf) = 0; gelu/silu(+inf) = +inf and (-inf) = -0 (the exact
formula's ``-inf * 0`` would be NaN); softmax of a masked row (-inf or -1e9
entries) gives exact zeros there, a row of only -inf gives NaN, as the exact
formula does.
"""

from __future__ import annotations

import math

#: The ops replaced, and the name the generated kernel gets (fused names end in it).
FAST_OPS = {
    "relax.exp": "fast_exp",
    "relax.erf": "fast_erf",
    "relax.tanh": "fast_tanh",
    "relax.sigmoid": "fast_sigmoid",
    "relax.nn.gelu": "fast_gelu",
    "relax.nn.gelu_tanh": "fast_gelu_tanh",
    "relax.nn.silu": "fast_silu",
    "relax.nn.softmax": "fast_softmax",
}

# exp: results overflow above EXP_HI (float32(ln FLT_MAX) rounds up) and are below half
# the smallest subnormal (2^-150) below EXP_LO.
EXP_HI = 88.72283935546875
EXP_LO = -103.97207708
_LOG2E = 1.44269504088896341
_LN2_HI = 0.693359375  # exact in float32: n * _LN2_HI is exact for |n| <= 150
_LN2_LO = -2.12194440e-4
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
             5.0000001201e-1)

# erf (Eigen's generic_fast_erf_float): odd numerator in x^2, even denominator.
ERF_CLAMP = 4.0
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)

# tanh (Eigen's generic_fast_tanh_float).
TANH_CLAMP = 9.0
TANH_TINY = 0.0004
_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
           1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)

_FLT_MAX = 3.4028234663852886e38
_SQRT1_2 = 0.7071067811865476
_SQRT_2_PI = math.sqrt(2.0 / math.pi)


def _f(v: float):
    from tvm import tirx

    return tirx.const(v, "float32")


def _horner(x, coeffs):
    acc = _f(coeffs[0])
    for c in coeffs[1:]:
        acc = acc * x + _f(c)
    return acc


def _let(value, body, name="v"):
    """``body(v)`` with ``v`` bound once to ``value`` (a ``Let``): a value used many times (the
    producer's expression, once inlined into an epilogue) is computed once, not once per use."""
    from tvm import tirx

    if isinstance(value, (tirx.Var, tirx.FloatImm, tirx.IntImm)):
        return body(value)
    v = tirx.Var(name, value.ty.dtype)
    return tirx.Let(v, value, body(v))


def _keep_nan(x, y):
    """``y``, but ``x`` where ``x`` is NaN (the clamps inside ``y`` map NaN to a number)."""
    from tvm import tirx

    return tirx.Select(tirx.isnan(x), x, y)


def _scale_pow2(p, n):
    """``p * 2^n`` for an integer-valued float32 ``n`` in [-150, 128]: two normal factors built from
    exponent bits, applied one after the other (2^128 alone would overflow)."""
    from tvm import tirx

    def scaled(ni):
        half = tirx.shift_right(ni, tirx.const(1, "int32"))  # floor(n / 2): arithmetic shift

        def scale(k):
            bits = tirx.shift_left(k + tirx.const(127, "int32"), tirx.const(23, "int32"))
            return tirx.reinterpret("float32", bits)

        return (p * scale(half)) * scale(ni - half)

    return _let(tirx.Cast("int32", n), scaled, "n_i")


def exp(x):
    """e^x for a float32 expression (see the module docstring for its accuracy)."""
    from tvm import tirx

    def body(x):
        def reduced(xc):
            def with_n(n):
                def poly(r):
                    return _scale_pow2(_horner(r, _EXP_POLY) * r * r + r + _f(1.0), n)

                return _let(xc - n * _f(_LN2_HI) - n * _f(_LN2_LO), poly, "r")

            return _let(tirx.floor(xc * _f(_LOG2E) + _f(0.5)), with_n, "n")

        y = _let(tirx.max(tirx.min(x, _f(EXP_HI)), _f(EXP_LO)), reduced, "xc")
        y = tirx.Select(x > _f(EXP_HI), _f(math.inf), tirx.Select(x < _f(EXP_LO), _f(0.0), y))
        return _keep_nan(x, y)

    return _let(x, body, "x")


def erf(x):
    """erf(x) for a float32 expression."""
    from tvm import tirx

    def body(x):
        def rational(xc):
            def with_x2(x2):
                return xc * _horner(x2, _ERF_P) / _horner(x2, _ERF_Q)

            return _let(xc * xc, with_x2, "x2")

        y = _let(tirx.max(tirx.min(x, _f(ERF_CLAMP)), _f(-ERF_CLAMP)), rational, "xc")
        y = tirx.max(tirx.min(y, _f(1.0)), _f(-1.0))  # the rational reaches 1 + 3.6e-7 near |x| = 4
        return _keep_nan(x, y)

    return _let(x, body, "x")


def tanh(x):
    """tanh(x) for a float32 expression."""
    from tvm import tirx

    def body(x):
        def rational(xc):
            def with_x2(x2):
                return xc * _horner(x2, _TANH_P) / _horner(x2, _TANH_Q)

            return _let(xc * xc, with_x2, "x2")

        y = _let(tirx.max(tirx.min(x, _f(TANH_CLAMP)), _f(-TANH_CLAMP)), rational, "xc")
        y = tirx.max(tirx.min(y, _f(1.0)), _f(-1.0))
        y = tirx.Select(tirx.abs(x) < _f(TANH_TINY), x, y)
        return _keep_nan(x, y)

    return _let(x, body, "x")


def sigmoid(x):
    """1 / (1 + e^-x) for a float32 expression (NaN propagates through ``exp``)."""
    return _f(1.0) / (_f(1.0) + exp(-x))


def _finite_factor(x):
    """``x`` with -inf as -FLT_MAX, so that ``x * 0`` is 0, not NaN (NaN is kept by the other factor)."""
    from tvm import tirx

    return tirx.max(x, _f(-_FLT_MAX))


def gelu(x):
    """x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), the form TVM's legalization and ONNX use."""
    return _let(x, lambda x: _finite_factor(x) * (_f(0.5) + erf(x * _f(_SQRT1_2)) * _f(0.5)), "x")


def gelu_tanh(x):
    """0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), ONNX's ``approximate="tanh"``."""

    def body(x):
        inner = _f(_SQRT_2_PI) * (x + _f(0.044715) * x * x * x)
        return _finite_factor(x) * (_f(0.5) + tanh(inner) * _f(0.5))

    return _let(x, body, "x")


def silu(x):
    """x * sigmoid(x)."""
    return _let(x, lambda x: _finite_factor(x) * sigmoid(x), "x")


_ELEMENTWISE = {"relax.exp": exp, "relax.erf": erf, "relax.tanh": tanh, "relax.sigmoid": sigmoid,
                "relax.nn.gelu": gelu, "relax.nn.gelu_tanh": gelu_tanh, "relax.nn.silu": silu}


def elementwise_te(fn):
    """A TE function ``x -> te.Tensor`` applying the expression builder ``fn`` element by element."""

    def te_fn(x):
        from tvm import te

        return te.compute(x.shape, lambda *i: fn(x(*i)), name="compute", tag="elemwise")

    return te_fn


def softmax_te(x, axis: int):
    """Softmax over ``axis`` as TOPI builds it (max, exp, sum, normalize), with :func:`exp`."""
    from tvm import te

    ndim = len(x.shape)
    axis = axis + ndim if axis < 0 else axis
    red_shape = [d for i, d in enumerate(x.shape) if i != axis]

    def full(idx, k):
        return [*idx[:axis], k, *idx[axis:]]

    def reduced(idx):
        return [*idx[:axis], *idx[axis + 1:]]

    k1 = te.reduce_axis((0, x.shape[axis]), name="k")
    mx = te.compute(red_shape, lambda *i: te.max(x(*full(i, k1)), axis=k1), name="T_softmax_maxelem")
    e = te.compute(x.shape, lambda *i: exp(x(*i) - mx(*reduced(i))), name="T_softmax_exp")
    k2 = te.reduce_axis((0, x.shape[axis]), name="k")
    s = te.compute(red_shape, lambda *i: te.sum(e(*full(i, k2)), axis=k2), name="T_softmax_expsum")
    # One division per row: the reciprocal is loop-invariant along the axis, and LLVM hoists it (a division
    # per element: a [1, 4, 128, 128] softmax 28 -> 26 us, ad-hoc on this Xeon).
    return te.compute(x.shape, lambda *i: e(*i) * (_f(1.0) / s(*reduced(i))), name="T_softmax_norm",
                      attrs={"axis": axis})


def _is_float32_tensor(expr) -> bool:
    """A float32 tensor whose shape (static or symbolic) is known: what the TE kernels can take."""
    ty = getattr(expr, "ty", None) or getattr(expr, "struct_info", None)
    return str(getattr(ty, "dtype", "")) == "float32" and getattr(ty, "shape", None) is not None


def fast_math_pass():
    """The Relax module pass replacing float32 ``FAST_OPS`` calls (see the module docstring)."""
    import tvm
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from graphopt.relax import rewrite_relax_functions

    @mutator
    class _Rewriter(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            op = call.op
            if not isinstance(op, tvm.ir.Op) or op.name not in FAST_OPS or not call.args:
                return call
            x = call.args[0]
            if not _is_float32_tensor(x) or not _is_float32_tensor(call):
                return call  # other dtypes, unknown ranks: TVM's own legalization
            name = FAST_OPS[op.name]
            if op.name == "relax.nn.softmax":
                return self.builder_.call_te(softmax_te, x, int(call.attrs.axis), primfunc_name_hint=name)
            return self.builder_.call_te(elementwise_te(_ELEMENTWISE[op.name]), x, primfunc_name_hint=name)

    @tvm.transform.module_pass(opt_level=0, name="graphopt.FastMath")
    def _pass(mod, _ctx):
        return rewrite_relax_functions(mod, _Rewriter)

    return _pass
