"""Conv / pooling schedules of the CPU target: outputs match ONNX Runtime, and the conv rule really claims the kernels.

Each model is a small onnx.helper graph with a symbolic batch dim ``N``. It is
lowered through the CPU target (NHWC layout conversion + schedule rules), run at
two batch sizes and compared with ONNX Runtime; separately the fused PrimFuncs
of the same module are checked: every conv / pool function is claimed by
:class:`targets.schedules.conv.WindowReduction` and ends up with a parallel and a
vectorized loop, so the test fails if the rule silently stops applying.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.graph import Graph

from .conftest import init, make_model, ort_run

RNG = np.random.default_rng(0)


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32) * 0.5


def _x_info(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def conv_model(c=8, f=16, hw=(12, 12), k=3, *, pads=None, strides=None, dilations=None, group=1, bias=True,
               post=(), transpose=False, output_padding=None):
    """x[N, c, *hw] -> Conv / ConvTranspose (weights as initializers) -> optional Relu / residual Add -> y."""
    nd = len(hw)
    ks = (k,) * nd
    wshape = (c, f // group, *ks) if transpose else (f, c // group, *ks)
    attrs = {"kernel_shape": list(ks), "group": group}
    if pads is not None:
        attrs["pads"] = list(pads)
    if strides is not None:
        attrs["strides"] = list(strides)
    if dilations is not None:
        attrs["dilations"] = list(dilations)
    if output_padding is not None:
        attrs["output_padding"] = list(output_padding)
    inputs = ["x", "w"] + (["b"] if bias else [])
    inits = [init("w", _w(*wshape))] + ([init("b", _w(f))] if bias else [])
    nodes = [helper.make_node("ConvTranspose" if transpose else "Conv", inputs, ["c0"], **attrs)]
    last = "c0"
    for i, op in enumerate(post):
        out = f"p{i}"
        if op == "relu":
            nodes.append(helper.make_node("Relu", [last], [out]))
        elif op == "residual":  # needs c == f and a shape-preserving conv
            nodes.append(helper.make_node("Add", [last, "x"], [out]))
        elif op == "sigmoid":
            nodes.append(helper.make_node("Sigmoid", [last], [out]))
        last = out
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    return make_model(nodes, [_x_info("x", ["N", c, *hw])], [_x_info("y", ["N"] + [None] * (nd + 1))], inits)


def pool_model(op, c=16, hw=(12, 12), **attrs):
    """x[N, c, *hw] -> a 3x3 conv (so pooling sits in an NHWC chain) -> Relu -> pooling op -> y."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c0"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node(op, ["r0"], ["y"], **attrs)]
    return make_model(nodes, [_x_info("x", ["N", c, *hw])], [_x_info("y", ["N", c, None, None])],
                      [init("w", _w(c, c, 3, 3))])


def _inputs(model, batch):
    shape = [d.dim_value or batch for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"x": RNG.standard_normal(shape).astype(np.float32)}


def lower_and_compare(tmp_path, model, mcpu=None, batches=(1, 3)):
    """Lower ``model`` for the CPU (``mcpu`` option when given), run it at each batch size, compare with ORT."""
    opts = {"mcpu": mcpu} if mcpu else None
    graphopt.lower(Graph(model), "cpu", tmp_path / "art", target_options=opts)
    art = graphopt.load(tmp_path / "art")
    for b in batches:
        feed = _inputs(model, b)
        want = ort_run(Graph(model), feed)[0]
        got = art.run(feed)["y"]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def scheduled_functions(model, mcpu="host", winograd=False):
    """``{name: (prim func before scheduling, prim func after)}`` of the model's fused functions, as cpu_pipeline makes them.

    Without ``winograd`` the 3x3 convs stay direct convs (what these tests check the conv rule on).
    """
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.s_tir import dlight

    from targets.cpu import CpuTarget, llvm_target
    from graphopt.relax import import_graph, select_params
    from targets.schedules import default_rules
    from targets.schedules.conv import conv_layout_passes

    g = Graph(model)
    target = llvm_target(CpuTarget(mcpu=mcpu).resolve_mcpu(), 2)
    mod = import_graph(g, select_params(g))
    with target, tvm.transform.PassContext(opt_level=3):
        fused = tvm.transform.Sequential([*cpu.library_dispatch_passes(target), *conv_layout_passes(target, winograd),
                                          *cpu.legalize_passes(target)])(mod)
        before = {gv.name_hint: f for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
        done = dlight.ApplyDefaultSchedule(*default_rules())(fused)
    return {name: (f, done[name]) for name, f in before.items()}, target


def _loop_kinds(func) -> set[str]:
    """The loop kinds in a PrimFunc's TVMScript (``T.parallel(...)`` -> "parallel"); 0.27 exposes no TIR visitor."""
    text = func.script()
    return {k for k in ("parallel", "vectorized", "unroll") if f"T.{k}(" in text}


def assert_claimed(model, names=("conv", "pool", "mean", "max"), mcpu="host", expect=1, parallel=None):
    """Every fused function whose name mentions a conv / pool op is claimed by the conv rule and is parallel + vectorized."""
    from targets.schedules.conv import WindowReduction

    funcs, target = scheduled_functions(model, mcpu)
    hits = [n for n in funcs if any(k in n for k in names)]
    assert len(hits) >= expect, f"expected conv/pool functions, got {sorted(funcs)}"
    for n in hits:
        before, after = funcs[n]
        assert WindowReduction().apply(before, target, False) is not None, f"{n}: the conv rule declined it"
        assert after.attrs and after.attrs.get("tirx.is_scheduled"), f"{n}: not scheduled"
        kinds = _loop_kinds(after)
        # Parallel only above CONV_PARALLEL_MIN_MACS (test_small_convs_run_on_one_thread).
        assert "vectorized" in kinds and (parallel is None or ("parallel" in kinds) == parallel), \
            f"{n}: loops {kinds}"
    return hits


CASES = {
    "3x3_pad1": dict(pads=[1, 1, 1, 1]),
    "strided2": dict(pads=[1, 1, 1, 1], strides=[2, 2], hw=(13, 13)),
    "1x1": dict(k=1, c=16, f=32),
    "depthwise": dict(c=16, f=16, group=16, pads=[1, 1, 1, 1]),
    "grouped2": dict(c=8, f=12, group=2, pads=[1, 1, 1, 1]),
    "dilated2": dict(pads=[2, 2, 2, 2], dilations=[2, 2]),
    "5x5_asym_pad": dict(k=5, pads=[2, 1, 2, 1], hw=(11, 9)),
    "7x7_stride2": dict(k=7, c=3, f=16, pads=[3, 3, 3, 3], strides=[2, 2], hw=(20, 20)),
    "odd_3_to_5": dict(c=3, f=5, pads=[1, 1, 1, 1], hw=(7, 9)),
    "odd_5_to_17": dict(c=5, f=17, pads=[1, 1, 1, 1], hw=(9, 7)),
    "wide_40": dict(c=8, f=40, k=3, hw=(6, 23)),
    "channels_24": dict(c=8, f=24, pads=[1, 1, 1, 1], hw=(10, 16)),
    "no_bias": dict(bias=False),
    "bias_relu_residual": dict(c=16, f=16, pads=[1, 1, 1, 1], post=("relu", "residual", "relu")),
    "sigmoid_epilogue": dict(post=("sigmoid",)),
    "conv1d": dict(c=4, f=8, hw=(30,), k=5, pads=[2, 2]),
    "conv1d_strided": dict(c=6, f=16, hw=(31,), k=3, strides=[2], pads=[1, 1], post=("relu",)),
    "conv_transpose_k2s2": dict(c=8, f=4, k=2, strides=[2, 2], transpose=True),
    "conv_transpose_k3s2": dict(c=8, f=6, k=3, strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1],
                                transpose=True),
    "conv_transpose_k2s2_to_1": dict(c=24, f=1, k=2, strides=[2, 2], transpose=True, post=("sigmoid",)),
    "conv_transpose_k4s2_pad1": dict(c=8, f=16, k=4, strides=[2, 2], pads=[1, 1, 1, 1], transpose=True,
                                     post=("relu",)),
    "conv_transpose_k3s1": dict(c=8, f=32, k=3, pads=[1, 1, 1, 1], transpose=True, hw=(9, 11)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_conv_matches_onnxruntime_and_is_claimed(tmp_path, case):
    model = conv_model(**CASES[case])
    lower_and_compare(tmp_path, model)
    assert_claimed(model)


@pytest.mark.parametrize("op,attrs", [
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    ("AveragePool", dict(kernel_shape=[2, 2], strides=[2, 2])),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=0)),
    ("GlobalAveragePool", {}),
    ("GlobalMaxPool", {}),
])
def test_pooling_matches_onnxruntime_and_is_claimed(tmp_path, op, attrs):
    model = pool_model(op, **attrs)
    lower_and_compare(tmp_path, model)
    hits = assert_claimed(model, expect=2)
    assert any("conv" not in h for h in hits), f"the pooling function was not checked: {hits}"
    if attrs.get("pads"):
        # The padding is computed per tile inside the pooling's one parallel loop (not a padded
        # copy of the whole input first).
        funcs, _ = scheduled_functions(model)
        for h in hits:
            if "conv" not in h:
                text = funcs[h][1].script()
                assert 'T.sblock("pad_temp")' in text and text.count("T.parallel(") == 1, text


def test_layout_passes_make_nhwc_and_pack_weights_as_relax_ops():
    """Dense conv2d: NHWC, weights permuted then packed [O/t, KH, KW, I, t] by Relax ops on the parameter.

    Grouped conv2d stays an NHWC/HWIO ``nn.conv2d`` (no packing).
    """
    import tvm

    from targets.cpu import llvm_target
    from graphopt.relax import import_graph, select_params
    from targets.schedules.conv import conv_layout_passes

    for mcpu, tile in (("x86-64-v2", 8), ("x86-64-v3", 16)):  # 2 vectors of 4 / 8 float lanes
        g = Graph(conv_model(c=8, f=32, pads=[1, 1, 1, 1]))
        mod = import_graph(g, select_params(g))
        target = llvm_target(mcpu, 1)
        with target:
            out = tvm.transform.Sequential(conv_layout_passes(target))(mod)
        text = out.script()
        assert "R.permute_dims(w" in text and "R.layout_transform(" in text
        assert f"T.Buffer((T.int64({32 // tile}), T.int64(3), T.int64(3), T.int64(8), T.int64({tile}))" in text
        assert "conv2d_nhwc_packed" in text and "nn.conv2d" not in text
    g = Graph(conv_model(c=8, f=12, group=2, pads=[1, 1, 1, 1]))
    mod = import_graph(g, select_params(g))
    with target:
        text = tvm.transform.Sequential(conv_layout_passes(target))(mod)["main"].script()
    assert 'data_layout="NHWC"' in text and 'kernel_layout="HWIO"' in text and "layout_transform" not in text


@pytest.mark.parametrize("mcpu", ["x86-64-v3", "portable"])
def test_avx2_and_portable_builds(tmp_path, mcpu):
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("x86-64 cpu names")
    model = conv_model(c=16, f=16, pads=[1, 1, 1, 1], post=("relu", "residual"))
    lower_and_compare(tmp_path, model, mcpu=mcpu)
    assert_claimed(model, mcpu=mcpu)
    pool = pool_model("MaxPool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    lower_and_compare(tmp_path / "pool", pool, mcpu=mcpu)
    assert_claimed(pool, mcpu=mcpu, expect=2)


def test_matmul_and_softmax_are_declined():
    """The conv rule leaves GEMMs and row reductions to the other families."""
    from targets.schedules.conv import WindowReduction

    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Softmax", ["m"], ["y"], axis=-1)]
    model = make_model(nodes, [_x_info("x", ["N", 7, 16])], [_x_info("y", ["N", 7, 24])], [init("w", _w(16, 24))])
    funcs, target = scheduled_functions(model)
    assert funcs
    for name, (before, _) in funcs.items():
        assert WindowReduction().apply(before, target, False) is None, name


def test_rule_declines_non_tir_and_non_llvm():
    import tvm

    from targets.schedules.conv import WindowReduction

    funcs, _ = scheduled_functions(conv_model(pads=[1, 1, 1, 1]))
    conv = next(f for n, (f, _) in funcs.items() if "conv" in n)
    assert WindowReduction().apply(conv, tvm.target.Target("c"), False) is None


def test_nchw_conv_with_unit_width_vectorizes_over_height():
    """NCHW with W = 1 (what a 1-D conv imported as 2-D looks like when the layout stays NCHW):
    the rule skips the unit axis and vectorizes over H instead of a 1-wide 'vector'."""
    import tvm
    import torch
    from tvm import te, topi

    from targets.cpu import host_cpu, llvm_target
    from targets.schedules.conv import WindowReduction

    x = te.placeholder((1, 64, 80, 1), name="x")
    w = te.placeholder((64, 64, 5, 1), name="w")  # 1.6 M multiply-adds: parallel
    out = topi.nn.conv2d_nchw(x, w, stride=1, padding=(2, 0), dilation=1)
    func = te.create_prim_func([x, w, out])
    target = llvm_target(host_cpu(), 2)
    sch = WindowReduction().apply(func, target, False)
    assert sch is not None
    text = sch.mod["main"].script()
    assert "T.parallel(" in text and "T.vectorized(T.int64(1))" not in text and "T.vectorized(" in text
    lib = tvm.compile(sch.mod, target=target)
    xs, ws = _w(1, 64, 80, 1), _w(64, 64, 5, 1)
    dev = tvm.cpu()
    got = tvm.runtime.tensor(np.zeros((1, 64, 80, 1), np.float32), dev)
    lib["main"](tvm.runtime.tensor(xs, dev), tvm.runtime.tensor(ws, dev), got)
    want = torch.nn.functional.conv2d(torch.from_numpy(xs), torch.from_numpy(ws), padding=(2, 0)).numpy()
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4, rtol=1e-4)


def test_conv_transpose_inside_an_nhwc_chain(tmp_path):
    """Conv -> Relu -> ConvTranspose: ConvertLayout must keep the transposed conv in NCHW (all TOPI legalizes)."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c0"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("ConvTranspose", ["r0", "wt", "bt"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    model = make_model(nodes, [_x_info("x", ["N", 8, 10, 10])], [_x_info("y", ["N", 4, 20, 20])],
                       [init("w", _w(16, 8, 3, 3)), init("wt", _w(16, 4, 2, 2)), init("bt", _w(4))])
    lower_and_compare(tmp_path, model)
    assert len(assert_claimed(model, expect=2)) >= 2


@pytest.mark.parametrize("case", sorted(c for c in CASES if CASES[c].get("transpose") and len(CASES[c].get("hw", "ab")) == 2))
def test_conv_transpose_takes_the_gather_path(case):
    """2-D transposed convs become graphopt's gather TE (no TOPI dilate-then-convolve), claimed by the rule."""
    funcs, _ = scheduled_functions(conv_model(**CASES[case]))
    names = [n for n in funcs if "conv2d_transpose" in n]
    assert names, sorted(funcs)
    for n in names:
        text = funcs[n][0].script()
        assert 'T.sblock("conv2d_transpose_nhwc")' in text and "dilate" not in text, n
    assert_claimed(conv_model(**CASES[case]), names=("conv2d_transpose",))


def test_conv1d_as_2d_nhwc_tiles_rows_over_height(tmp_path):
    """A 1-D conv written as 2-D (kernel 5x1, W = 1, magika): NHWC output [N, H, 1, C] is tiled
    over several rows of H (not one row of the unit W axis), and matches ONNX Runtime."""
    import re

    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[5, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    model = make_model(nodes, [_x_info("x", ["N", 16, 40, 1])], [_x_info("y", ["N", 32, 36, 1])],
                       [init("w", _w(32, 16, 5, 1)), init("b", _w(32))])
    lower_and_compare(tmp_path, model)
    hits = assert_claimed(model)
    funcs, _ = scheduled_functions(model)
    text = funcs[hits[0]][1].script()
    assert 'T.sblock("conv2d_nhwc_packed' in text
    unrolled = [int(u) for u in re.findall(r"T\.unroll\(T\.int64\((\d+)\)\)", text)]
    assert unrolled and max(unrolled) > 1, text


def test_column_reduction_inlines_its_elementwise_producers(tmp_path):
    """Conv -> a GELU-like element-wise chain -> max over H (after NHWC conversion, a column
    reduction the rule claims): the chain is inlined into the reduction, one parallel loop in all."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c", "c"], ["m"]),
             helper.make_node("Add", ["m", "c"], ["a"]),
             helper.make_node("Tanh", ["a"], ["t"]),
             helper.make_node("Mul", ["t", "c"], ["g"]),
             helper.make_node("ReduceMax", ["g"], ["y"], axes=[2, 3], keepdims=1)]
    model = make_model(nodes, [_x_info("x", ["N", 8, 12, 12])], [_x_info("y", ["N", 16, 1, 1])],
                       [init("w", _w(16, 8, 3, 3))])
    lower_and_compare(tmp_path, model)
    funcs, target = scheduled_functions(model)
    from targets.schedules.conv import WindowReduction

    reds = [n for n in funcs if n.endswith(("max", "max1")) or "_max" in n]
    assert reds, sorted(funcs)
    for n in reds:
        before, after = funcs[n]
        assert WindowReduction().apply(before, target, False) is not None, n
        assert after.script().count("T.parallel(") == 1, after.script()


def test_small_convs_run_on_one_thread_large_ones_in_parallel(tmp_path):
    """Below CONV_PARALLEL_MIN_MACS a conv is serial (no thread-pool wake-ups for microseconds of work),
    its padding pass vectorized over channels; above, parallel. Both match ONNX Runtime."""
    small = conv_model(c=16, f=16, hw=(16, 16), pads=[1, 1, 1, 1], post=("relu",))  # 0.6 M at batch 1
    small.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # static (a symbolic batch counts as large)
    large = conv_model(c=32, f=32, hw=(40, 40), pads=[1, 1, 1, 1], post=("relu",))  # 14.7 M at batch 1
    lower_and_compare(tmp_path / "s", small, batches=(1,))
    funcs, _ = scheduled_functions(small)
    text = next(a for n, (_, a) in funcs.items() if "conv" in n).script()
    assert "T.parallel(" not in text and "T.vectorized(" in text
    assert_claimed(small, parallel=False)
    assert_claimed(large, parallel=True)


def test_deep_conv_streams_its_packed_weights_once(tmp_path):
    """A deep conv (weights larger than one image of activations: ResNet's last stage) puts the
    output-channel tiles outermost in the parallel loop, packed weights (``wp[f // t, ..., f % t]``)
    included, so each thread streams its share of the weights once, not once per output row
    (ResNet-18's 7x7x512 convs: 4.0 -> 1.5 ms with cold weights). A shallow conv (large image,
    small weights) keeps rows outermost. Both match ONNX Runtime."""
    import re

    deep = conv_model(c=128, f=128, hw=(6, 6), pads=[1, 1, 1, 1], post=("relu",))  # 590 KB weights, 18 KB image
    shallow = conv_model(c=8, f=32, hw=(40, 40), pads=[1, 1, 1, 1], post=("relu",))
    for name, model, channels_outer in (("deep", deep, True), ("shallow", shallow, False)):
        lower_and_compare(tmp_path / name, model)
        funcs, _ = scheduled_functions(model)
        conv = next(a for n, (_, a) in funcs.items() if "conv" in n).script()
        assert "conv2d_nhwc_packed" in conv, name
        fused = re.findall(r"for (\w+)_fused in T\.parallel", conv)
        par = [f for f in fused if f.startswith(("f_", "b_"))]
        assert par, (name, fused)
        assert par[-1].startswith("f_") == channels_outer, (name, par)


def test_deep_conv_with_large_weights_accumulates_tap_by_tap(tmp_path):
    """Weights of at least TAP_ORDER_MIN_WEIGHTS elements (ResNet-18's 7x7x512 convs): the parallel loop
    covers channel tiles x batch only, and the taps (ry, rx) run outside the output rows, so every
    row of a tile reuses one tap's weights while they are in L1. Smaller deep convs keep rows in the
    parallel loop and the taps inside. Both match ONNX Runtime, at two batch sizes."""
    from targets.schedules.conv import TAP_ORDER_MIN_WEIGHTS

    big = conv_model(c=256, f=512, hw=(5, 5), pads=[1, 1, 1, 1], post=("relu", "sigmoid"))  # 1.18 M weights
    small = conv_model(c=128, f=128, hw=(5, 5), pads=[1, 1, 1, 1], post=("relu",))  # 147 K weights
    assert 3 * 3 * 256 * 512 >= TAP_ORDER_MIN_WEIGHTS > 3 * 3 * 128 * 128
    for name, model, tap_order in (("big", big, True), ("small", small, False)):
        lower_and_compare(tmp_path / name, model)
        funcs, _ = scheduled_functions(model)
        conv = next(a for n, (_, a) in funcs.items() if "conv" in n).script()
        import re

        par = re.findall(r"for (\w+)_fused in T\.parallel", conv)[-1]  # the conv's (after the padding pass)
        assert par == ("f_0_b" if tap_order else "f_0_b_y_x_0"), (name, par)
        grid = re.search(r"for ([\w, ]+) in T\.grid\([^\n]*\n\s+for x_1 in T\.unroll", conv).group(1).split(", ")
        assert (grid[:3] == ["ry", "rx", "y"]) == tap_order, (name, grid)


def test_padded_conv_on_an_nchw_input_transposes_while_padding(tmp_path):
    """The network's first conv (NCHW input, padding): its padding pass reads the NCHW tensor and
    writes padded NHWC, so no separate transpose kernel runs (ResNet-18's 224x224 input: 0.2-0.4 ms).
    Without padding the transpose stays (the conv would read NCHW in its inner loop)."""
    padded = conv_model(c=3, f=16, hw=(20, 20), pads=[1, 1, 1, 1], post=("relu",))
    unpadded = conv_model(c=3, f=16, hw=(20, 20), post=("relu",))
    count = {}
    for name, model in (("padded", padded), ("unpadded", unpadded)):
        lower_and_compare(tmp_path / name, model)
        funcs, _ = scheduled_functions(model)
        # Transposes of activations (the weights' own are lifted out by prepack).
        count[name] = sum(1 for n in funcs if "transpose" in n and "conv" not in n and "layout_transform" not in n
                          and "reshape" not in n)
    assert count["padded"] == count["unpadded"] - 1, count


@pytest.mark.parametrize("act", ["HardSwish", "HardSigmoid", "Clip", "ClipLowOnly", "ClipNaNLow", "ClipOpset10"])
def test_clip_activations_fuse_into_the_conv_without_transposes(tmp_path, act):
    """Conv -> a clip-based activation -> Conv: the activation (MobileNetV3's HardSwish, ReLU6 as a Clip
    with constant bounds; a NaN bound means none) is converted to NHWC with the convs and fused into the
    first conv's epilogue. Relax's ConvertLayout has no rule for ``clip`` or the importer's Clip kernels:
    it transposed to NCHW and back around every activation. Matches ONNX Runtime."""
    inputs = {"Clip": ["c0", "lo", "hi"], "ClipLowOnly": ["c0", "lo"], "ClipNaNLow": ["c0", "nan", "hi"]}
    op = "Clip" if act.startswith("Clip") else act
    attrs = {"min": 0.0, "max": 6.0} if act == "ClipOpset10" else {}  # bounds as attributes before opset 11
    nodes = [helper.make_node("Conv", ["x", "w"], ["c0"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node(op, inputs.get(act, ["c0"]), ["h"], **attrs),
             helper.make_node("Conv", ["h", "w2"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    inits = [init("w", _w(16, 8, 3, 3)), init("w2", _w(16, 16, 3, 3)), init("lo", np.array(0, np.float32)),
             init("hi", np.array(6, np.float32)), init("nan", np.array(np.nan, np.float32))]
    model = make_model(nodes, [_x_info("x", ["N", 8, 12, 12])], [_x_info("y", ["N", 16, 12, 12])], inits,
                       opset=10 if act == "ClipOpset10" else 17)
    lower_and_compare(tmp_path, model)
    funcs, _ = scheduled_functions(model)
    first = [n for n in funcs if n.startswith("fused_conv2d_nhwc_packed") and ("maximum" in n or "minimum" in n)]
    assert first, sorted(funcs)
    activations = [n for n in funcs if "conv" not in n and ("clip" in n or "maximum" in n or "minimum" in n)]
    assert not activations, sorted(funcs)
