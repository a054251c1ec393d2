"""Fast math (targets/fast_math.py): accuracy of the polynomial kernels, the pass, the target option.

The accuracy table is checked on the vectorized kernels themselves (16 lanes,
as the schedules emit them) against float64 references over every float32
magnitude, the limits and NaN. The model tests lower through the CPU target,
verify against ONNX Runtime, and assert that the fused functions are the fast
kernels, in their producers' epilogues, with no libm call left in their code.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from onnx import helper

import graphopt
from graphopt.errors import OptionError
from graphopt.graph import Graph

from .conftest import init, make_model, ort_run, vi

special = pytest.importorskip("scipy.special")

RNG = np.random.default_rng(0)
FLT_MIN = np.finfo(np.float32).tiny
FLT_MAX = float(np.finfo(np.float32).max)


def _target(cores=2):
    from graphopt.targets.cpu import host_cpu, llvm_target

    return llvm_target(host_cpu(), cores)


def _kernel(fn, n):
    """The element-wise kernel of expression builder ``fn`` over n (a multiple of 16) floats, vectorized by 16."""
    import tvm
    from tvm import s_tir, te

    from graphopt.targets import fast_math as fm

    x = te.placeholder((n,), "float32", name="x")
    y = fm.elementwise_te(fn)(x)
    sch = s_tir.Schedule(te.create_prim_func([x, y]))
    (loop,) = sch.get_loops(sch.get_sblock("compute"))
    _, inner = sch.split(loop, [None, 16])
    sch.vectorize(inner)
    lib = tvm.compile(sch.mod, target=_target())

    def run(a):
        out = tvm.runtime.tensor(np.zeros_like(a))
        lib(tvm.runtime.tensor(a), out)
        return out.numpy()

    return run


def _wide_inputs():
    mags = np.logspace(-30, np.log10(FLT_MAX), 100_001)
    lin = np.linspace(-20, 20, 200_001)
    edges = [0.0, -0.0, 1e-45, -1e-45, 88.37, 88.72, 88.73, -87.33, -87.34, -103.9, -104.0, FLT_MAX, -FLT_MAX]
    v = np.concatenate([mags, -mags, lin, edges]).astype(np.float32)
    pad = (-len(v)) % 16
    return np.concatenate([v, np.zeros(pad, np.float32)])


def _ref(name, x):
    x = x.astype(np.float64)
    with np.errstate(all="ignore"):
        r = {
            "exp": lambda: np.exp(x),
            "erf": lambda: special.erf(x),
            "tanh": lambda: np.tanh(x),
            "sigmoid": lambda: special.expit(x),
            "gelu": lambda: x * special.ndtr(x),
            "gelu_tanh": lambda: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
            "silu": lambda: x * special.expit(x),
        }[name]()
        return np.where(np.abs(r) > FLT_MAX, np.sign(r) * np.inf, r)  # float32 overflow


# name: (max abs error, max rel error where |f| >= FLT_MIN (None: not bounded), max abs error / |x|)
ACCURACY = {
    "exp": (None, 1.2e-7, None),
    "erf": (4e-7, 4e-7, None),
    "tanh": (3e-7, 3e-7, None),
    "sigmoid": (1.2e-7, 2e-7, None),
    "gelu": (None, None, 2.5e-7),
    "gelu_tanh": (None, None, 2.5e-7),
    "silu": (None, None, 2e-7),
}

# name: outputs for NaN, +inf, -inf, 0, -0
SPECIALS = {
    "exp": [np.nan, np.inf, 0.0, 1.0, 1.0],
    "erf": [np.nan, 1.0, -1.0, 0.0, -0.0],
    "tanh": [np.nan, 1.0, -1.0, 0.0, -0.0],
    "sigmoid": [np.nan, 1.0, 0.0, 0.5, 0.5],
    "gelu": [np.nan, np.inf, 0.0, 0.0, 0.0],
    "gelu_tanh": [np.nan, np.inf, 0.0, 0.0, 0.0],
    "silu": [np.nan, np.inf, 0.0, 0.0, 0.0],
}


@pytest.mark.parametrize("name", sorted(ACCURACY))
def test_accuracy_table(name):
    from graphopt.targets import fast_math as fm

    x = _wide_inputs()
    run = _kernel(getattr(fm, name), len(x))
    y = run(x).astype(np.float64)
    r = _ref(name, x)
    assert not np.isnan(y).any()
    assert np.array_equal(np.isinf(y), np.isinf(r)) and np.array_equal(y[np.isinf(y)], r[np.isinf(r)])
    fin = np.isfinite(r)
    err = np.abs(y[fin] - r[fin])
    max_abs, max_rel, max_abs_per_x = ACCURACY[name]
    if max_abs is not None:
        assert err.max() <= max_abs, err.max()
    if max_rel is not None:
        normal = np.abs(r[fin]) >= FLT_MIN
        rel = err[normal] / np.abs(r[fin][normal])
        assert rel.max() <= max_rel, (rel.max(), x[fin][normal][np.argmax(rel)])
        # below FLT_MIN (subnormal or flushed results): within a few subnormal steps
        assert err[~normal].max(initial=0) <= 1e-44 * (1 if name == "exp" else 1e7)
    if max_abs_per_x is not None:
        scaled = err / np.maximum(np.abs(x[fin].astype(np.float64)), 1e-30)
        assert scaled.max() <= max_abs_per_x, scaled.max()

    s = np.zeros(16, np.float32)
    s[:5] = [np.nan, np.inf, -np.inf, 0.0, -0.0]
    got = _kernel(getattr(fm, name), 16)(s)[:5]
    np.testing.assert_array_equal(got, np.array(SPECIALS[name], np.float32))


def _softmax_kernel(shape, axis):
    import tvm
    from tvm import te

    from graphopt.targets import fast_math as fm

    x = te.placeholder(shape, "float32", name="x")
    lib = tvm.compile(te.create_prim_func([x, fm.softmax_te(x, axis)]), target=_target())

    def run(a):
        out = tvm.runtime.tensor(np.zeros_like(a))
        lib(tvm.runtime.tensor(a), out)
        return out.numpy()

    return run


@pytest.mark.parametrize("shape,axis", [((8, 4096), -1), ((3, 16, 5), 1), ((2, 7), 0)])
def test_softmax_accuracy_masks_and_nan(shape, axis):
    x = (RNG.standard_normal(shape) * 30).astype(np.float32)
    flat = x.reshape(-1)
    flat[::7] = -np.inf  # masked attention
    flat[3::11] = -1e9
    x64 = x.astype(np.float64)
    with np.errstate(invalid="ignore"):
        e = np.exp(x64 - x64.max(axis=axis, keepdims=True))
        ref = e / e.sum(axis=axis, keepdims=True)
    got = _softmax_kernel(shape, axis)(x)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))  # fully masked rows only
    ok = ~np.isnan(ref)
    assert ok.mean() > 0.5 and np.abs(got[ok] - ref[ok]).max() <= 1.5e-7
    assert (got[np.isneginf(x) & ok] == 0).all() and (got[(x == -1e9) & ok] == 0).all()

    y = x.copy()
    np.moveaxis(y, axis, -1)[0, ...] = -np.inf  # a fully masked row: NaN, as the exact formula gives
    y.reshape(-1)[-1] = np.nan  # NaN in a row: that row is NaN
    got = _softmax_kernel(shape, axis)(y)
    assert np.isnan(np.moveaxis(got, axis, -1)[0]).all()
    assert np.isnan(got.reshape(-1)[-1])


# ---- the pass in the CPU target -------------------------------------------------------------


def _epilogue_models():
    """name -> (model, feed, fused function name fragments that must be fast)."""
    m, k, n = 32, 64, 128
    w = (RNG.standard_normal((k, n)) * 0.2).astype(np.float32)
    b = RNG.standard_normal(n).astype(np.float32)
    x = {"x": (RNG.standard_normal((m, k)) * 2).astype(np.float32)}
    gemm = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["hb"])]
    inits = [init("W", w), init("B", b)]
    models = {
        "gelu": (make_model(gemm + [helper.make_node("Gelu", ["hb"], ["y"])], [vi("x", [m, k])],
                            [vi("y", [m, n])], inits, opset=20), x, "fast_gelu"),
        "gelu_tanh": (make_model(gemm + [helper.make_node("Gelu", ["hb"], ["y"], approximate="tanh")],
                                 [vi("x", [m, k])], [vi("y", [m, n])], inits, opset=20), x, "fast_gelu_tanh"),
        "silu": (make_model(gemm + [helper.make_node("Sigmoid", ["hb"], ["s"]),
                                    helper.make_node("Mul", ["hb", "s"], ["y"])],
                            [vi("x", [m, k])], [vi("y", [m, n])], inits), x, "fast_sigmoid"),
        # decomposed erf-GELU after a convolution (PP-OCR's)
        "conv_erf_gelu": (make_model(
            [helper.make_node("Conv", ["img", "K"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Div", ["c", "r2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["c", "e1"], ["m"]),
             helper.make_node("Mul", ["m", "half"], ["y"])],
            [vi("img", [1, 16, 12, 12])], [vi("y", [1, 32, 12, 12])],
            [init("K", (RNG.standard_normal((32, 16, 3, 3)) * 0.2).astype(np.float32)),
             init("r2", np.float32(np.sqrt(2))), init("one", np.float32(1)), init("half", np.float32(0.5))]),
            {"img": RNG.standard_normal((1, 16, 12, 12)).astype(np.float32)}, "fast_erf"),
        # masked attention scores: matmul, scale, mask (-1e9 / -inf), softmax, tanh
        "softmax_tanh": (make_model(
            [helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Add", ["s", "mask"], ["sm"]),
             helper.make_node("Softmax", ["sm"], ["p"], axis=-1), helper.make_node("Tanh", ["q"], ["t"]),
             helper.make_node("Exp", ["t"], ["y2"])],
            [vi("q", [2, 16, 32]), vi("kt", [2, 32, 16])], [vi("p", [2, 16, 16]), vi("y2", [2, 16, 32])],
            [init("mask", np.where(RNG.random((16, 16)) < 0.3, np.float32(-1e9), np.float32(0)).astype(np.float32))]),
            {"q": RNG.standard_normal((2, 16, 32)).astype(np.float32),
             "kt": RNG.standard_normal((2, 32, 16)).astype(np.float32)}, "fast_softmax"),
    }
    return models


MODELS = _epilogue_models()


def _compiled_asm(model, fast_math=True):
    """``(fused PrimFunc names, x86 assembly)`` of the model compiled as the CPU target compiles it."""
    import tvm

    from graphopt.targets.cpu import cpu_pipeline, relax_passes
    from graphopt.relax import import_graph, select_params
    from graphopt.targets.schedules.report import fused_module

    g = Graph(model)
    target = _target()
    mod = import_graph(g, select_params(g))
    with target, tvm.transform.PassContext(opt_level=3):
        mod = tvm.transform.Sequential(relax_passes(target, fast_math=fast_math))(mod)
        names = [gv.name_hint for gv, f in fused_module(mod, target).functions_items()
                 if isinstance(f, tvm.tirx.PrimFunc)]
        ex = tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target))
    return names, "\n".join(m.inspect_source("asm") for m in ex.mod.imports)


def _function_asm(asm: str, name: str) -> str:
    """The assembly of ``<name>_compute_`` (up to the next global function)."""
    start = asm.index(f"\n{name}_compute_:")
    nxt = re.search(r"\n[A-Za-z_][\w.]*:\n", asm[start + 2:])
    return asm[start:start + 2 + (nxt.start() if nxt else len(asm))]


LIBM = re.compile(r"call\w*\s+\*?\w*(expf|erff|tanhf|exp|erf|tanh|logf)\b")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fused_epilogue_is_fast_vectorized_and_verifies(name, tmp_path):
    model, feed, fast = MODELS[name]
    names, asm = _compiled_asm(model)
    fused = [n for n in names if fast in n]
    assert fused, names
    if name in ("gelu", "gelu_tanh", "silu"):
        assert any(n.startswith("fused_matmul") for n in fused), names  # in the GEMM's epilogue
    if name == "conv_erf_gelu":
        assert any(n.startswith("fused_conv2d") for n in fused), names
    for n in fused:
        body = _function_asm(asm, n)
        assert not LIBM.search(body), (n, LIBM.search(body).group(0))
        assert re.search(r"\bv\w+ps\s.*%[xyz]mm", body), n  # packed float math
    assert not LIBM.search(asm)

    res = graphopt.lower(Graph(model), "cpu", tmp_path / "a", threads=2, verify=True)
    assert res.verification.ok
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["target"]["options"]["fast_math"] is True
    got = graphopt.load(tmp_path / "a").run(feed)
    for out, want in zip(got.values(), ort_run(Graph(model), feed)):
        np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


def test_option_off_keeps_libm_and_is_recorded(tmp_path):
    model, feed, _ = MODELS["gelu"]
    names, asm = _compiled_asm(model, fast_math=False)
    assert not any("fast_" in n for n in names) and any(n.endswith("gelu") for n in names)
    assert LIBM.search(asm)
    res = graphopt.lower(Graph(model), "cpu", tmp_path / "off", threads=2, verify=True,
                         target_options={"fast_math": False})
    assert res.verification.ok
    manifest = json.loads((tmp_path / "off" / "manifest.json").read_text())
    assert manifest["target"]["options"]["fast_math"] is False


def test_option_from_the_command_line_and_bad_values(tmp_path):
    from graphopt.cli import main

    model, _, _ = MODELS["silu"]
    path = tmp_path / "m.onnx"
    path.write_bytes(Graph(model).to_bytes())
    assert main(["lower", str(path), "-o", str(tmp_path / "off"), "--target-opt", "fast_math=false", "--quiet"]) == 0
    assert json.loads((tmp_path / "off" / "manifest.json").read_text())["target"]["options"]["fast_math"] is False
    with pytest.raises(OptionError):
        graphopt.lower(Graph(model), "cpu", tmp_path / "bad", target_options={"fast_math": "maybe"})


def test_deterministic_with_fast_math(tmp_path):
    model, _, _ = MODELS["softmax_tanh"]
    for d in ("a", "b"):
        graphopt.lower(Graph(model), "cpu", tmp_path / d, threads=2)
    assert (tmp_path / "a" / "main.so").read_bytes() == (tmp_path / "b" / "main.so").read_bytes()


def test_pass_leaves_other_dtypes_alone():
    import tvm
    from tvm import relax
    from tvm.script import relax as R

    from graphopt.targets.fast_math import fast_math_pass

    @tvm.script.ir_module
    class Mod:
        @R.function
        def main(a: R.Tensor((4, 8), "float16"), b: R.Tensor((4, 8), "float64"), c: R.Tensor((4, 8), "float32")):
            with R.dataflow():
                x = R.exp(a)
                y = R.nn.softmax(b)
                z = R.nn.gelu(c)
                R.output(x, y, z)
            return (x, y, z)

    out = fast_math_pass()(Mod)
    text = out.script()
    assert "R.exp(a)" in text and "R.nn.softmax(b" in text and "R.nn.gelu" not in text
    assert [gv.name_hint for gv, f in out.functions_items() if not isinstance(f, relax.Function)] == ["fast_gelu"]


@pytest.mark.parametrize("mcpu", ["x86-64-v3", "portable"])
def test_avx2_and_portable_builds_verify(mcpu, tmp_path):
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("x86 CPU names")
    for name in ("gelu", "softmax_tanh"):
        model, feed, _ = MODELS[name]
        graphopt.lower(Graph(model), "cpu", tmp_path / name, threads=2, verify=True,
                       target_options={"mcpu": mcpu})
        got = graphopt.load(tmp_path / name).run(feed)
        for out, want in zip(got.values(), ort_run(Graph(model), feed)):
            np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


def test_symbolic_batch(tmp_path):
    """A dynamic batch: the kernels take symbolic shapes (GELU in a GEMM epilogue, softmax over rows)."""
    k, n = 32, 48
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Gelu", ["h"], ["g"]),
         helper.make_node("Softmax", ["g"], ["y"], axis=-1)],
        [vi("x", ["N", k])], [vi("y", ["N", n])], [init("W", (RNG.standard_normal((k, n)) * 0.3).astype(np.float32))],
        opset=20)
    names, asm = _compiled_asm(model)
    assert any("fast_gelu" in s for s in names) and any("fast_softmax" in s for s in names), names
    assert not LIBM.search(asm)
    graphopt.lower(Graph(model), "cpu", tmp_path / "dyn", threads=2)
    art = graphopt.load(tmp_path / "dyn")
    for b in (1, 5):
        feed = {"x": (RNG.standard_normal((b, k)) * 3).astype(np.float32)}
        np.testing.assert_allclose(art.run(feed)["y"], ort_run(Graph(model), feed)[0], atol=1e-6, rtol=1e-5)
