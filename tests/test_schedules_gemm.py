"""The default CPU GEMM schedule (targets/schedules/gemm.py): claims matmul-like functions, stays correct.

Every model is lowered through the CPU target and compared with ONNX Runtime;
the scheduled IRModule (captured right after the schedule rules ran) is checked
for the rule's marks — a local accumulator, a vectorized loop, a parallel loop
where the GEMM is big enough — so these tests fail if the rule stops claiming.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.graph import Graph

from .conftest import init, make_model, ort_run, vi

rng = np.random.default_rng(0)


def _rand(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def scheduled_funcs(graph: Graph, mcpu: str = "host", threads: int = 2, relax_passes: bool = False) -> dict:
    """``{name: PrimFunc}`` of the fused functions as the CPU pipeline's schedule rules left them
    (``relax_passes``: after the CPU target's Relax passes too, weight packing included)."""
    import tvm
    from tvm.s_tir import dlight

    from graphopt.targets.cpu import CpuTarget, llvm_target
    from graphopt.relax import build_pipeline, import_graph, select_params
    from graphopt.targets.schedules import default_rules

    tgt = CpuTarget()
    tgt.opts = type("O", (), {"mcpu": mcpu, "opt_level": 3})()
    target = llvm_target(tgt.resolve_mcpu(), threads)
    seen = {}

    @tvm.transform.module_pass(opt_level=0, name="capture")
    def capture(mod, _ctx):
        seen.update({gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)})
        return mod

    mod = import_graph(graph, select_params(graph))
    if relax_passes:
        from graphopt.targets.cpu import relax_passes as cpu_relax_passes

        with tvm.transform.PassContext(opt_level=3):
            mod = tvm.transform.Sequential(cpu_relax_passes(target))(mod)
    pipeline = build_pipeline(target, after_fusion=[dlight.ApplyDefaultSchedule(*default_rules()), capture])
    with tvm.transform.PassContext(opt_level=3):
        tvm.compile(mod, target=target, relax_pipeline=pipeline)
    return seen


def assert_claimed(funcs: dict, parallel: bool | None = None) -> None:
    """Every ``*matmul*`` function carries the GEMM rule's schedule (and a parallel loop when asked)."""
    mm = {n: f for n, f in funcs.items() if "matmul" in n}
    assert mm, f"no matmul function among {sorted(funcs)}"
    for name, f in mm.items():
        text = f.script()
        assert f.attrs.get("tirx.is_scheduled"), f"{name} was not scheduled"
        assert 'scope="local"' in text and "T.vectorized" in text, f"{name} lacks the register tile:\n{text}"
        if parallel is not None:
            assert ("T.parallel" in text) == parallel, f"{name}: parallel expected {parallel}:\n{text}"


def unguarded_vector_tile(func) -> bool:
    """Whether no block under a vectorized loop of ``func`` is guarded by a predicate that reads that loop.

    A split tail leaves ``T.where(jo * NR + ji < N)`` on the register tile's
    blocks; a guard that reads the vector lane makes TVM scalarize the loop.
    Row guards (``io * MR + ii < M``, lane-invariant) are allowed.
    """
    import tvm_ffi
    from tvm import s_tir, tirx

    bad = []

    def visit_loop(loop):
        if loop.kind != tirx.ForKind.VECTORIZED:
            return
        lane = loop.loop_var

        def visit_realize(rz):
            uses = []
            tvm_ffi.structural_walk(rz.predicate, (tirx.Var, lambda v: uses.append(v) if v.same_as(lane) else None))
            if uses:
                bad.append((rz.block.name_hint, rz.predicate))

        tvm_ffi.structural_walk(loop.body, (s_tir.SBlockRealize, visit_realize))

    tvm_ffi.structural_walk(func.body, (tirx.For, visit_loop))
    return not bad


def local_sizes(func, target) -> list:
    """Shapes of the local (register) buffers once ``func`` is lowered: static ints when the tile fits registers."""
    import tvm
    from tvm import tirx

    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    mod = tvm.tirx.transform.BindTarget(target.with_host(target))(mod)
    pipeline, _, _ = tvm.tirx.get_default_tir_pipeline(target)
    with target:
        text = pipeline(mod)["main"].script()
    import re

    return re.findall(r"T\.alloc_local\(\(([^)]*)\)", text)


def assert_fast_tiles(funcs: dict) -> None:
    """Every matmul function's register tile is vectorized and free of lane guards (tails shifted, not cut)."""
    mm = {n: f for n, f in funcs.items() if "matmul" in n}
    assert mm
    for name, f in mm.items():
        assert unguarded_vector_tile(f), f"{name}: a tail guard reads the vector lane:\n{f.script()}"


def lower_and_compare(graph: Graph, feeds: list[dict], tmp_path, mcpu: str = "host", **kw):
    """Lower ``graph`` for ``mcpu``, run it on each feed, compare with ONNX Runtime."""
    out = tmp_path / f"art-{mcpu}"
    graphopt.lower(graph, "cpu", out, target_options={"mcpu": mcpu}, threads=2, **kw)
    prog = graphopt.load(out).programs["main"]
    for feed in feeds:
        ref = ort_run(graph, feed)
        got = prog([feed[s.name] for s in graph.inputs])
        for r, g in zip(ref, got):
            assert r.shape == g.shape
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def matmul_model(m, k, n, *, bias_relu=False, batch=None):
    """x[batch.., m, k] @ w[k, n] (+ b, relu); ``m`` may be a symbolic dim name."""
    xs = [*(batch or []), m, k]
    ys = [*(batch or []), m, n]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y" if not bias_relu else "h"])]
    inits = [init("w", _rand(k, n))]
    if bias_relu:
        nodes += [helper.make_node("Add", ["h", "b"], ["h2"]), helper.make_node("Relu", ["h2"], ["y"])]
        inits.append(init("b", _rand(n)))
    return Graph(make_model(nodes, [vi("x", xs)], [vi("y", ys)], inits))


@pytest.mark.parametrize("m,k,n", [(64, 96, 128), (17, 3, 10), (1, 64, 10), (3, 17, 33), (1, 768, 96)])
def test_matmul_weight_kn(m, k, n, tmp_path):
    g = matmul_model(m, k, n)
    assert_claimed(scheduled_funcs(g))
    lower_and_compare(g, [{"x": _rand(m, k)}], tmp_path)


def test_matmul_bias_relu_epilogue_is_fused_and_parallel(tmp_path):
    g = matmul_model(128, 64, 96, bias_relu=True)
    funcs = scheduled_funcs(g)
    assert_claimed(funcs, parallel=True)
    fused = [n for n in funcs if "matmul" in n]
    assert any("relu" in n for n in fused), fused  # the epilogue lives in the GEMM's function
    lower_and_compare(g, [{"x": _rand(128, 64)}], tmp_path)


def test_tiny_gemm_stays_single_threaded():
    assert_claimed(scheduled_funcs(matmul_model(2, 8, 16)), parallel=False)


def test_gemm_trans_b_with_bias(tmp_path):
    """Gemm(transB=1): the weight is [N, K] (K contiguous)."""
    g = Graph(make_model(
        [helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=1)],
        [vi("x", [33, 40])], [vi("y", [33, 24])], [init("w", _rand(24, 40)), init("c", _rand(24))]))
    assert_claimed(scheduled_funcs(g))
    lower_and_compare(g, [{"x": _rand(33, 40)}], tmp_path)


def test_batch_matmul_with_broadcast(tmp_path):
    """a[2, 1, 9, 7] @ b[3, 7, 20] -> [2, 3, 9, 20]: both operands activations, batch broadcast."""
    g = Graph(make_model([helper.make_node("MatMul", ["a", "b"], ["y"])],
                         [vi("a", [2, 1, 9, 7]), vi("b", [3, 7, 20])], [vi("y", [2, 3, 9, 20])]))
    assert_claimed(scheduled_funcs(g))
    lower_and_compare(g, [{"a": _rand(2, 1, 9, 7), "b": _rand(3, 7, 20)}], tmp_path)


def test_attention_q_kt_and_pv(tmp_path):
    """softmax(Q·Kᵀ)·V on activations: Kᵀ is a transpose the rule packs, P·V a plain batch matmul."""
    shape = [2, 4, 19, 16]
    g = Graph(make_model(
        [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
         helper.make_node("MatMul", ["q", "kt"], ["s"]),
         helper.make_node("Softmax", ["s"], ["p"], axis=-1),
         helper.make_node("MatMul", ["p", "v"], ["y"])],
        [vi("q", shape), vi("k", shape), vi("v", shape)], [vi("y", shape)]))
    funcs = scheduled_funcs(g)
    assert_claimed(funcs)
    assert sum("matmul" in n for n in funcs) == 2, sorted(funcs)
    lower_and_compare(g, [{"q": _rand(*shape), "k": _rand(*shape), "v": _rand(*shape)}], tmp_path)


def test_dynamic_batch(tmp_path):
    """A symbolic row count: scheduled (parallel, guarded tails), right at two batch sizes."""
    g = matmul_model("N", 48, 40, bias_relu=True, batch=None)
    assert_claimed(scheduled_funcs(g), parallel=True)
    lower_and_compare(g, [{"x": _rand(5, 48)}, {"x": _rand(64, 48)}], tmp_path)


def test_dynamic_batch_3d(tmp_path):
    g = matmul_model(7, 32, 20, batch=["B"])
    assert_claimed(scheduled_funcs(g))
    lower_and_compare(g, [{"x": _rand(1, 7, 32)}, {"x": _rand(3, 7, 32)}], tmp_path)


@pytest.mark.parametrize("mcpu", ["x86-64-v3", "portable"])
def test_other_isas(mcpu, tmp_path):
    """AVX2+FMA and x86-64-v2 builds: claimed (narrower tiles), run and verify here."""
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("x86-64 CPU names")
    g = matmul_model(37, 50, 70, bias_relu=True)
    funcs = scheduled_funcs(g, mcpu=mcpu)
    assert_claimed(funcs)
    assert_fast_tiles(funcs)  # M=37 and N=70 leave tails at every vector width
    lower_and_compare(g, [{"x": _rand(37, 50)}], tmp_path, mcpu=mcpu)


@pytest.mark.parametrize("m,k,n", [(1, 16, 8210), (7, 24, 18), (13, 16, 8210), (13, 40, 18), (7, 33, 100),
                                   (33, 8, 47)])
def test_tails_are_shifted_not_guarded(m, k, n, tmp_path):
    """M, N not multiples of the tile (a classifier to 8210 classes): full, unguarded vector tiles, right values."""
    g = matmul_model(m, k, n, bias_relu=True)
    funcs = scheduled_funcs(g)
    assert_claimed(funcs)
    assert_fast_tiles(funcs)
    lower_and_compare(g, [{"x": _rand(m, k)}], tmp_path)


@pytest.mark.parametrize("mcpu", ["host", "x86-64-v3"])
def test_symbolic_rows_tile_exactly(mcpu, tmp_path):
    """x[B, 128, 64] with a dynamic batch: M = B * 128 needs no guard at all, whether the tile height divides
    128 (AVX-512: 8) or not (AVX2: 6, the last tile of each 128 shifted back)."""
    import platform

    if mcpu != "host" and platform.machine() != "x86_64":
        pytest.skip("x86-64 CPU names")
    g = matmul_model(128, 64, 96, bias_relu=True, batch=["B"])
    funcs = scheduled_funcs(g, mcpu=mcpu)
    assert_claimed(funcs, parallel=True)
    assert_fast_tiles(funcs)
    for name, f in funcs.items():
        if "matmul" in name:
            assert "T.where" not in f.script(), f"{name}: B*128 rows should need no guard:\n{f.script()}"
    lower_and_compare(g, [{"x": _rand(1, 128, 64)}, {"x": _rand(3, 128, 64)}], tmp_path, mcpu=mcpu)


@pytest.mark.parametrize("mcpu", ["host", "x86-64-v3"])
def test_symbolic_rows_without_divisor_keep_a_register_tile(mcpu, tmp_path):
    """A bare symbolic M (no known factor): lane-invariant row guards only, and a static accumulator."""
    import platform

    from graphopt.targets.cpu import CpuTarget, llvm_target

    if mcpu != "host" and platform.machine() != "x86_64":
        pytest.skip("x86-64 CPU names")
    g = matmul_model("N", 48, 40, bias_relu=True)
    funcs = scheduled_funcs(g, mcpu=mcpu)
    assert_claimed(funcs, parallel=True)
    assert_fast_tiles(funcs)
    tgt = CpuTarget()
    tgt.opts = type("O", (), {"mcpu": mcpu, "opt_level": 3})()
    target = llvm_target(tgt.resolve_mcpu(), 2)
    for name, f in funcs.items():
        if "matmul" in name:
            sizes = local_sizes(f, target)
            assert sizes and all(re_int(s) for s in sizes), f"{name}: accumulator not static: {sizes}"
    lower_and_compare(g, [{"x": _rand(n, 48)} for n in (1, 5, 7, 64)], tmp_path, mcpu=mcpu)


def re_int(shape_text: str) -> bool:
    import re

    return all(re.fullmatch(r"\s*(T\.int64\()?\d+\)?\s*", p) for p in shape_text.split(",") if p.strip())


@pytest.mark.parametrize("name", ["mlp", pytest.param("transformer", marks=pytest.mark.slow)])
def test_torch_models_verify(name, torch_models, tmp_path):
    """The mlp and transformer test models: every matmul claimed, outputs verify against ONNX Runtime."""
    module, example = torch_models[name]
    g = graphopt.capture(module, example)
    assert_claimed(scheduled_funcs(g))
    feed = {s.name: t.numpy() for s, t in zip(g.inputs, example)}
    lower_and_compare(g, [feed], tmp_path)


def test_rule_declines_what_is_not_a_gemm():
    """Integer matmuls, convolutions and plain reductions are not claimed (left to other rules)."""
    import tvm
    from tvm.script import tirx as T

    from graphopt.targets.cpu import host_cpu, llvm_target
    from graphopt.targets.schedules.gemm import Matmul

    @T.prim_func(private=True, s_tir=True)
    def int_mm(a: T.Buffer((8, 8), "int32"), b: T.Buffer((8, 8), "int32"), c: T.Buffer((8, 8), "int32")):
        for i, j, k in T.grid(8, 8, 8):
            with T.sblock("mm"):
                vi_, vj, vk = T.axis.remap("SSR", [i, j, k])
                with T.init():
                    c[vi_, vj] = 0
                c[vi_, vj] = c[vi_, vj] + a[vi_, vk] * b[vk, vj]

    @T.prim_func(private=True, s_tir=True)
    def conv1d(a: T.Buffer((10,), "float32"), w: T.Buffer((3,), "float32"), c: T.Buffer((8,), "float32")):
        for i, k in T.grid(8, 3):
            with T.sblock("conv"):
                vi_, vk = T.axis.remap("SR", [i, k])
                with T.init():
                    c[vi_] = T.float32(0)
                c[vi_] = c[vi_] + a[vi_ + vk] * w[vk]

    @T.prim_func(private=True, s_tir=True)
    def row_sum(a: T.Buffer((8, 8), "float32"), c: T.Buffer((8,), "float32")):
        for i, k in T.grid(8, 8):
            with T.sblock("sum"):
                vi_, vk = T.axis.remap("SR", [i, k])
                with T.init():
                    c[vi_] = T.float32(0)
                c[vi_] = c[vi_] + a[vi_, vk]

    target = llvm_target(host_cpu(), 2)
    for f in (int_mm, conv1d, row_sum):
        assert Matmul().apply(f, target, False) is None
    assert Matmul().apply(int_mm, tvm.target.Target("c"), False) is None


@pytest.mark.parametrize("m", [95, "sym"])
def test_k_contiguous_b_is_packed(m):
    """C[i, j] = sum_k A[i, k] * B[j, k] in one function (B transposed inside it): packed, claimed, right."""
    import tvm
    from tvm import te, topi

    from graphopt.targets.cpu import host_cpu, llvm_target
    from graphopt.targets.schedules.gemm import Matmul

    i64 = lambda v: tvm.tirx.IntImm("int64", v)  # noqa: E731 - Relax legalizes with int64 shapes
    rows = te.var("m", "int64") if m == "sym" else i64(m)
    a = te.placeholder((rows, i64(40)), name="a")
    b = te.placeholder((i64(72), i64(40)), name="b")
    c = topi.nn.relu(topi.nn.dense(a, b))
    func = te.create_prim_func([a, b, c])
    target = llvm_target(host_cpu(), 2)
    sch = Matmul().apply(func, target, False)
    assert sch is not None
    text = sch.mod["main"].script()
    assert "T.parallel" in text and "T.vectorized" in text and 'scope="local"' in text
    with target:
        lib = tvm.compile(sch.mod, target=target)
    for n in ([95] if m != "sym" else [3, 95]):
        x, w = _rand(n, 40), _rand(72, 40)
        out = tvm.runtime.tensor(np.zeros((n, 72), np.float32))
        lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
        np.testing.assert_allclose(out.numpy(), np.maximum(x @ w.T, 0), rtol=1e-4, atol=1e-4)


def test_avx2_tile_height():
    """AVX2 (16 registers): 6 x 2-vector tiles (12 FMA chains) once M is large enough that the shifted tail
    costs less than the wider tile gains; 4 rows where 6 would waste much of a small M."""
    from graphopt.targets.schedules.gemm import _Gemm, _tile_sizes

    def tile(m, m_div=None):
        g = _Gemm(["I", "J", "K"], False, m, 256, 256, 1, m_div or m, 256)
        return _tile_sizes(g, 8, 256, 2)

    assert tile(128) == (6, 16) and tile(None, 128) == (6, 16)  # a static 128, a symbolic batch * 128
    assert tile(8) == (4, 16) and tile(20) == (4, 16)
    assert tile(3) == (3, 16)  # one tile covers M


@pytest.mark.parametrize("mcpu, c", [("host", None), ("x86-64-v3", 16)])
def test_weights_are_packed_in_panels(mcpu, c, tmp_path):
    """A weight B [K, N] is read as Wp[N/c, K, c] (one contiguous panel per register tile), packed at lower
    time: the artifact stores the packed weight, the rule claims the packed GEMM with its epilogue, and
    the values match ONNX Runtime (static and dynamic batch)."""
    import json
    import platform

    from graphopt.targets.cpu import CpuTarget, llvm_target
    from graphopt.targets.schedules.common import vector_bits

    if mcpu != "host" and platform.machine() != "x86_64":
        pytest.skip("x86-64 CPU names")
    tgt = CpuTarget()
    tgt.opts = type("O", (), {"mcpu": mcpu, "opt_level": 3})()
    c = c or 2 * vector_bits(llvm_target(tgt.resolve_mcpu(), 2)) // 32
    g = matmul_model(128, 40, 8 * c, bias_relu=True, batch=["B"])
    funcs = scheduled_funcs(g, mcpu=mcpu, relax_passes=True)
    packed = [n for n in funcs if "matmul_packed" in n]
    assert packed and any("relu" in n for n in packed), sorted(funcs)
    assert_claimed({n: funcs[n] for n in packed}, parallel=True)
    assert_fast_tiles({n: funcs[n] for n in packed})
    lower_and_compare(g, [{"x": _rand(1, 128, 40)}, {"x": _rand(2, 128, 40)}], tmp_path, mcpu=mcpu)
    weights = json.loads((tmp_path / f"art-{mcpu}" / "manifest.json").read_text())["weights"]
    assert [8, 40, c] in [w["shape"] for w in weights]


def test_n_not_a_multiple_of_the_panel_is_padded_and_packed(tmp_path):
    """A weight whose N is not a multiple of the panel width c (a classifier's 8210 classes) gets zero columns
    up to a whole panel at lower time and is packed; the GEMM computes the padded width, a slice drops the
    extra columns, and the bias + ReLU epilogue after it still gives ONNX Runtime's values (static and
    dynamic batch). The artifact stores the padded, packed weight."""
    import json

    from graphopt.targets.cpu import CpuTarget, llvm_target
    from graphopt.targets.schedules.common import vector_bits

    tgt = CpuTarget()
    tgt.opts = type("O", (), {"mcpu": "host", "opt_level": 3})()
    c = 2 * vector_bits(llvm_target(tgt.resolve_mcpu(), 2)) // 32
    n = 8 * c + 3
    g = matmul_model(64, 40, n, bias_relu=True, batch=["B"])
    funcs = scheduled_funcs(g, relax_passes=True)
    packed = [f for f in funcs if "matmul_packed" in f]
    assert packed, sorted(funcs)
    assert_claimed({f: funcs[f] for f in packed}, parallel=True)
    lower_and_compare(g, [{"x": _rand(1, 64, 40)}, {"x": _rand(3, 64, 40)}], tmp_path)
    weights = json.loads((tmp_path / "art-host" / "manifest.json").read_text())["weights"]
    assert [9, 40, c] in [w["shape"] for w in weights]


def test_activation_and_narrow_operands_are_not_packed():
    """Only weights are packed (a matmul of two activations would pay the copy on every call), and only when
    N spans at least four panels."""
    q = helper.make_node("MatMul", ["x", "y"], ["z"])
    g = Graph(make_model([q], [vi("x", [64, 32]), vi("y", [32, 128])], [vi("z", [64, 128])], []))
    assert not [n for n in scheduled_funcs(g, relax_passes=True) if "packed" in n]
    narrow = matmul_model(64, 32, 24)
    assert not [n for n in scheduled_funcs(narrow, relax_passes=True) if "packed" in n]
    # A weight decoded from int8 codes (weight-only quantization): the decode stays inlined in the GEMM.
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"]), helper.make_node("MatMul", ["x", "w"], ["y"])]
    inits = [init("wq", rng.integers(-127, 127, (32, 128)).astype(np.int8)), init("ws", np.float32(0.01))]
    dq = Graph(make_model(nodes, [vi("x", [64, 32])], [vi("y", [64, 128])], inits))
    funcs = scheduled_funcs(dq, relax_passes=True)
    assert not [n for n in funcs if "packed" in n] and [n for n in funcs if "matmul" in n], sorted(funcs)


@pytest.mark.parametrize("n,keep", [(1024, 1000), (120, 100), (128, 64)])
def test_matmul_followed_by_a_column_slice(tmp_path, n, keep):
    """A GEMM whose output is sliced (a fused QKV projection split by Slice): the slice is fused into the
    GEMM's kernel but must not be inlined into the tile write-back, which covers every column (it wrote the
    sliced tensor out of bounds: max error ~47). Packed (N a multiple of the panel) and unpacked B, and a
    bias + ReLU epilogue before the slice, all against ONNX Runtime."""
    from onnx import numpy_helper

    rng = np.random.default_rng(n)
    m_rows, k = 64, 96
    inits = [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b"),
             numpy_helper.from_array(np.array([0], np.int64), "st"),
             numpy_helper.from_array(np.array([keep], np.int64), "en"),
             numpy_helper.from_array(np.array([1], np.int64), "ax")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Slice", ["r", "st", "en", "ax"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m_rows, k])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m_rows, keep])], inits)
    g = Graph(model)
    graphopt.lower(g, "cpu", tmp_path / "art")
    x = rng.standard_normal((m_rows, k)).astype(np.float32)
    got = graphopt.load(tmp_path / "art").run({"x": x})["y"]
    want = ort_run(g, {"x": x})[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-4)
