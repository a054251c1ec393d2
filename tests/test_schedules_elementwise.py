"""Default CPU schedules for non-GEMM functions (targets/schedules: elementwise, reduction, fallback, report).

Each model is lowered through the CPU target and compared with ONNX Runtime;
the same model's fused TIR functions are offered to the rules, and the test
asserts which rule claimed each one and that the scheduled function really has
the parallel / vectorized loops the rule promises, so a rule that silently
stops applying fails here.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.graph import Graph

from .conftest import init, make_model, ort_run, vi

RNG = np.random.default_rng(0)


def _f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _target(mcpu="host", cores=2):
    from graphopt.targets.cpu import CpuTarget, llvm_target

    t = CpuTarget.__new__(CpuTarget)
    from types import SimpleNamespace

    t.opts = SimpleNamespace(mcpu=mcpu)
    return llvm_target(CpuTarget.resolve_mcpu(t), cores)


def _fused(res, target):
    """The lowered graph's fused TIR functions (before scheduling), as TVM's CPU pipeline makes them."""
    from graphopt.relax import import_graph, select_params
    from graphopt.targets.schedules.report import fused_module

    return fused_module(import_graph(res.graph, select_params(res.graph)), target)


def _scheduled(mod, name_part, target):
    """``(rule name, scheduled PrimFunc)`` for the one fused function whose name contains ``name_part``."""
    from tvm import tirx

    from graphopt.targets.schedules.elementwise import elementwise_rules

    funcs = [(gv.name_hint, f) for gv, f in mod.functions_items()
             if isinstance(f, tirx.PrimFunc) and name_part in gv.name_hint]
    assert len(funcs) == 1, f"expected one function named *{name_part}*, got {[n for n, _ in funcs]}"
    for rule in elementwise_rules():
        sch = rule.apply(funcs[0][1], target, False)
        if sch is not None:
            return type(rule).__name__, sch.mod["main"]
    return None, funcs[0][1]


def _block_names(func) -> list[str]:
    import tvm_ffi
    from tvm.s_tir import SBlock

    names = []
    tvm_ffi.structural_walk(func.body, (SBlock, lambda b: names.append(str(b.name_hint))), order="post")
    return names


def _loop_kinds(func) -> set[str]:
    import tvm_ffi
    from tvm import tirx

    kinds = set()

    def visit(node):
        kinds.add({tirx.ForKind.PARALLEL: "parallel", tirx.ForKind.VECTORIZED: "vectorized"}.get(node.kind, "serial"))

    tvm_ffi.structural_walk(func.body, (tirx.For, visit), order="post")
    return kinds


def _lower_and_check(tmp_path, model, feed, *, mcpu="host", input_shapes=None, name="m"):
    """Lower (verified against ONNX Runtime on ``feed``) and return the lower result."""
    g = Graph(model)
    res = graphopt.lower(g, "cpu", tmp_path / name, target_options={"mcpu": mcpu}, input_shapes=input_shapes,
                         threads=2)
    art = graphopt.load(tmp_path / name)
    got = art.run(feed)
    want = ort_run(g, feed)
    for out, ref in zip(g.outputs, want):
        # rtol 2e-3: one float16 ulp (the chain model rounds through float16)
        np.testing.assert_allclose(got[out.name], ref, rtol=2e-3, atol=1e-5, err_msg=out.name)
    return res


# ---------------------------------------------------------------- element-wise / injective


def _chain_model(shape):
    """Add (broadcast bias) -> Sigmoid -> Mul (SiLU) -> Where(x>0) -> Cast to f16 and back."""
    d = shape[-1]
    return make_model(
        [helper.make_node("Add", ["x", "b"], ["a"]),
         helper.make_node("Sigmoid", ["a"], ["s"]),
         helper.make_node("Mul", ["a", "s"], ["m"]),
         helper.make_node("Greater", ["x", "zero"], ["pos"]),
         helper.make_node("Where", ["pos", "m", "x"], ["w"]),
         helper.make_node("Cast", ["w"], ["h"], to=TensorProto.FLOAT16),
         helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT)],
        [vi("x", shape)], [vi("y", shape)],
        [init("b", _f32(d)), init("zero", np.zeros((), np.float32))],
    )


def test_elementwise_chain_is_one_parallel_function(tmp_path):
    shape = [4, 64, 256]
    res = _lower_and_check(tmp_path, _chain_model(shape), {"x": _f32(*shape)})
    target = _target()
    mod = _fused(res, target)
    rule, func = _scheduled(mod, "sigmoid", target)
    assert rule == "Injective"
    # Parallel; the inner loop is left to LLVM (a TIR vector of exp calls is scalarized).
    assert "parallel" in _loop_kinds(func) and "vectorized" not in _loop_kinds(func)


@pytest.mark.parametrize("wide", [True, False])
def test_wide_vectors_give_512_bit_code_on_intel_avx512(tmp_path, wide):
    """LLVM prefers 256-bit vectors on Intel AVX-512 CPUs unless told otherwise; the CPU target's
    ``wide_vectors`` (default on) tells it, so a kernel's loops use zmm registers (compile only: the
    mcpu is named, so this holds on any x86 host)."""
    import platform

    import tvm

    from graphopt.targets.cpu import llvm_target

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 only")
    shape = [4, 64, 256]
    model = make_model(  # SiLU of x + b
        [helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Sigmoid", ["a"], ["s"]),
         helper.make_node("Mul", ["a", "s"], ["y"])],
        [vi("x", shape)], [vi("y", shape)], [init("b", _f32(shape[-1]))])
    res = _lower_and_check(tmp_path, model, {"x": _f32(*shape)})
    target = llvm_target("skylake-avx512", 2, wide_vectors=wide)
    assert ("-prefer-256-bit" in list(target.attrs.get("mattr", []))) == wide
    with target:
        _, func = _scheduled(_fused(res, target), "sigmoid", target)
        func = func.with_attr("global_symbol", "silu")
        asm = tvm.tirx.build(tvm.IRModule({"silu": func}), target=target).inspect_source("asm")
    assert ("zmm" in asm) == wide


@pytest.mark.parametrize("shape", [[1], [3], [17], [1, 3, 17], [5, 1, 33]])
def test_elementwise_odd_and_tiny_sizes(tmp_path, shape):
    res = _lower_and_check(tmp_path, _chain_model(shape), {"x": _f32(*shape)})
    target = _target()
    rule, func = _scheduled(_fused(res, target), "sigmoid", target)
    assert rule == "Injective"
    assert "parallel" not in _loop_kinds(func)  # too small to be worth a thread start


def test_broadcast_both_sides_and_concat_gather(tmp_path):
    """[N,1,D] + [1,S,1] broadcast, Concat on the last axis, Gather of rows."""
    model = make_model(
        [helper.make_node("Add", ["x", "r"], ["a"]),
         helper.make_node("Concat", ["a", "a"], ["c"], axis=2),
         helper.make_node("Gather", ["c", "idx"], ["y"], axis=1)],
        [vi("x", [8, 1, 512]), vi("r", [1, 40, 1])], [vi("y", [8, 5, 1024])],
        [init("idx", np.array([0, 39, 7, 7, 20], np.int64))],
    )
    res = _lower_and_check(tmp_path, model, {"x": _f32(8, 1, 512), "r": _f32(1, 40, 1)})
    target = _target()
    mod = _fused(res, target)
    from graphopt.targets.schedules.report import schedule_report
    from graphopt.targets.schedules.elementwise import elementwise_rules

    report = dict(schedule_report(mod, target, elementwise_rules()))
    assert report and all(rule == "Injective" for rule in report.values()), report
    rule, func = _scheduled(mod, "concat", target)
    assert "parallel" in _loop_kinds(func) and "vectorized" in _loop_kinds(func)


@pytest.mark.parametrize("shape,perm", [([4, 128, 160], [0, 2, 1]), ([3, 17, 5], [2, 0, 1]), ([2, 48, 8, 32], [0, 2, 1, 3])])
def test_transpose(tmp_path, shape, perm):
    out_shape = [shape[p] for p in perm]
    model = make_model([helper.make_node("Transpose", ["x"], ["y"], perm=perm)],
                       [vi("x", shape)], [vi("y", out_shape)])
    res = _lower_and_check(tmp_path, model, {"x": _f32(*shape)})
    target = _target()
    rule, func = _scheduled(_fused(res, target), "transpose", target)
    assert rule == "Injective"
    if shape == [4, 128, 160]:
        # Tiled: a vector-wide tile on both the read and the write side, on both cores.
        assert {"parallel", "vectorized"} <= _loop_kinds(func)


def test_resize_and_pad(tmp_path):
    model = make_model(
        [helper.make_node("Resize", ["x", "", "scales"], ["r"], mode="linear"),
         helper.make_node("Pad", ["r", "pads"], ["y"], mode="constant")],
        [vi("x", [1, 8, 30, 40])], [vi("y", [1, 8, 62, 82])],
        [init("scales", np.array([1, 1, 2, 2], np.float32)), init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))],
    )
    res = _lower_and_check(tmp_path, model, {"x": _f32(1, 8, 30, 40)})
    target = _target()
    from graphopt.targets.schedules.elementwise import elementwise_rules
    from graphopt.targets.schedules.report import schedule_report

    report = schedule_report(_fused(res, target), target, elementwise_rules())
    assert report and all(rule == "Injective" for _, rule in report), report


# ---------------------------------------------------------------- reductions


@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax(tmp_path, axis):
    shape = [8, 64, 128]
    model = make_model([helper.make_node("Softmax", ["x"], ["y"], axis=axis)], [vi("x", shape)], [vi("y", shape)])
    res = _lower_and_check(tmp_path, model, {"x": _f32(*shape)})
    target = _target()
    rule, func = _scheduled(_fused(res, target), "softmax", target)
    if axis == -1:
        assert rule == "RowReduction"  # rows contiguous: all four blocks per row, in parallel
        assert "parallel" in _loop_kinds(func)
    else:
        assert rule == "Fallback"  # a column softmax: each block parallel on its own
        assert "parallel" in _loop_kinds(func)


def test_layernorm_and_reductions(tmp_path):
    d = 256
    model = make_model(
        [helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], axis=-1, epsilon=1e-5),
         helper.make_node("ReduceMean", ["ln", "ax"], ["mean"], keepdims=0),
         helper.make_node("ReduceMax", ["x", "ax"], ["mx"], keepdims=1),
         helper.make_node("ArgMax", ["x"], ["am"], axis=2, keepdims=0),
         helper.make_node("ReduceSum", ["x", "ax1"], ["s1"], keepdims=0)],
        [vi("x", [4, 100, d])],
        [vi("ln", [4, 100, d]), vi("mean", [4, 100]), vi("mx", [4, 100, 1]), vi("am", [4, 100], TensorProto.INT64),
         vi("s1", [4, d])],
        [init("g", _f32(d)), init("b", _f32(d)), init("ax", np.array([-1], np.int64)), init("ax1", np.array([1], np.int64))],
        opset=18,
    )
    res = _lower_and_check(tmp_path, model, {"x": _f32(4, 100, d)})
    target = _target()
    mod = _fused(res, target)
    rule, func = _scheduled(mod, "layer_norm", target)
    assert rule == "RowReduction" and "parallel" in _loop_kinds(func)
    # Each row's sums run as one partial sum per vector lane (a vectorized rfactor block), not as a
    # chain of scalar adds that LLVM did not reassociate; the partial sums are not a "local" buffer
    # (workspace-allocated once per row on CPU).
    assert "vectorized" in _loop_kinds(func)
    assert any("_rf_" in b for b in _block_names(func)), _block_names(func)
    assert '"local"' not in func.script()
    rule, func = _scheduled(mod, "argmax", target)
    assert rule == "RowReduction" and "parallel" in _loop_kinds(func)
    from graphopt.targets.schedules.elementwise import elementwise_rules
    from graphopt.targets.schedules.report import schedule_report

    report = schedule_report(mod, target, elementwise_rules())
    assert all(rule is not None for _, rule in report), report


# ---------------------------------------------------------------- dynamic batch, other ISAs


def _mixed_model(batch="N"):
    d = 64
    return make_model(
        [helper.make_node("Add", ["x", "b"], ["a"]),
         helper.make_node("Transpose", ["a"], ["t"], perm=[0, 2, 1]),
         helper.make_node("Softmax", ["a"], ["sm"], axis=-1),
         helper.make_node("LayerNormalization", ["a", "g", "b"], ["ln"], axis=-1),
         helper.make_node("Concat", ["sm", "ln"], ["y"], axis=1)],
        [vi("x", [batch, 17, d])], [vi("y", [batch, 34, d]), vi("t", [batch, d, 17])],
        [init("b", _f32(d)), init("g", _f32(d))],
    )


def test_dynamic_batch_two_sizes(tmp_path):
    model = _mixed_model()
    g = Graph(model)
    res = graphopt.lower(g, "cpu", tmp_path / "dyn", threads=2)
    art = graphopt.load(tmp_path / "dyn")
    for n in (1, 7):
        feed = {"x": _f32(n, 17, 64)}
        got = art.run(feed)
        for out, ref in zip(g.outputs, ort_run(g, feed)):
            np.testing.assert_allclose(got[out.name], ref, rtol=1e-4, atol=1e-5)
    target = _target()
    mod = _fused(res, target)
    from graphopt.targets.schedules.elementwise import elementwise_rules
    from graphopt.targets.schedules.report import schedule_report

    report = dict(schedule_report(mod, target, elementwise_rules()))
    assert all(rule is not None for rule in report.values()), report
    # Symbolic extents count as large work: the batch loop is parallel.
    rule, func = _scheduled(mod, "softmax", target)
    assert rule == "RowReduction" and "parallel" in _loop_kinds(func)


@pytest.mark.parametrize("mcpu", ["x86-64-v3", "portable"])
def test_avx2_and_portable_builds(tmp_path, mcpu):
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("x86-64 cpu names")
    model = _mixed_model(batch=3)
    res = _lower_and_check(tmp_path, model, {"x": _f32(3, 17, 64)}, mcpu=mcpu)
    target = _target(mcpu)
    from graphopt.targets.schedules.common import vector_bits

    assert vector_bits(target) == (256 if mcpu == "x86-64-v3" else 128)
    mod = _fused(res, target)
    rule, func = _scheduled(mod, "layer_norm", target)
    assert rule == "RowReduction"
    rule, func = _scheduled(mod, "concat", target)
    assert rule == "Injective" and "vectorized" in _loop_kinds(func)


# ---------------------------------------------------------------- report


def test_schedule_report_env_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_SCHEDULE_REPORT", "1")
    shape = [2, 8, 16]
    res = graphopt.lower(Graph(_chain_model(shape)), "cpu", tmp_path / "r", threads=2)
    assert "schedule report" in res.native_log and "Injective" in res.native_log
    monkeypatch.setenv("GRAPHOPT_SCHEDULE_REPORT", "0")
    res = graphopt.lower(Graph(_chain_model(shape)), "cpu", tmp_path / "r2", threads=2)
    assert "schedule report" not in res.native_log


def test_dynamic_batch_loop_nests_share_their_static_rows_between_cores():
    """A symbolic leading extent (a dynamic batch, 1 at run time in the usual case) is fused with
    the static loops after it before going parallel, so a batch-1 call uses every core; parallel
    over the batch alone ran ResNet-18's input transpose (NCHW -> NHWC, 224x224) on one thread."""
    import tvm
    import tvm_ffi
    from tvm import te, tirx

    from graphopt.targets.schedules.elementwise import Injective

    n = te.var("n")
    x = te.placeholder((n, 3, 64, 64), name="x")
    y = te.compute((n, 64, 64, 3), lambda b, h, w, c: x[b, c, h, w], name="y")
    target = _target()
    sch = Injective().apply(te.create_prim_func([x, y]), target, False)
    assert sch is not None
    loops = []
    tvm_ffi.structural_walk(sch.mod["main"].body,
                            (tirx.For, lambda f: loops.append(f) if f.kind == tirx.ForKind.PARALLEL else None),
                            order="post")
    assert len(loops) == 1
    assert not loops[0].extent.same_as(n) and "n" in str(loops[0].extent), loops[0].extent
    lib = tvm.compile(sch.mod, target=target)
    xs = _f32(2, 3, 64, 64)
    dev = tvm.cpu()
    got = tvm.runtime.tensor(np.zeros((2, 64, 64, 3), np.float32), dev)
    lib["main"](tvm.runtime.tensor(xs, dev), got)
    np.testing.assert_array_equal(got.numpy(), xs.transpose(0, 2, 3, 1))
