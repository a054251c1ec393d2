"""The quantize pass, its numerics, the data roles (calibration, evaluation, budget) and the refusals."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.accuracy import EvalSet, output_error, top1_agreement
from graphopt.data import DataSource
from graphopt.reference import run_reference
from graphopt.passes import _quant_math as qm

from .conftest import make_model, run_cli, vi


# ------------------------------------------------------------------------------------------ numerics
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000])
def test_bitplanes_round_trip(bits, n):
    codes = np.random.default_rng(bits * n).integers(0, 1 << bits, n).astype(np.uint8)
    packed = qm.pack_bitplanes(codes, bits)
    assert packed.shape == (-(-n // 8), bits) and packed.dtype == np.uint8
    np.testing.assert_array_equal(qm.unpack_bitplanes(packed, n), codes)


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    """GPTQ minimizes the layer's output error ||X (W - Wq)^T|| on the calibration inputs, not the weights'."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2048, 64)) @ rng.standard_normal((64, 64)) * 0.3 + rng.standard_normal(64)
    w = rng.standard_normal((32, 64))
    for bits in (2, 3, 4):
        out = {}
        for how in ("nearest", "gptq"):
            codes, s, m = (qm.round_nearest(w, bits, 0) if how == "nearest" else qm.gptq(w, x.T @ x / len(x), bits, 0))
            wq = qm.dequantize(codes, s, m, w.shape[1])
            out[how] = np.linalg.norm(x @ (w - wq).T)
        assert out["gptq"] < 0.8 * out["nearest"], (bits, out)


def test_gptq_groups_and_padding():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((512, 50))
    w = rng.standard_normal((8, 50))
    codes, s, m = qm.gptq(w, x.T @ x, 4, 16)
    assert codes.shape == (8, 64) and s.shape == (8, 4)
    assert codes.max() <= 15 and codes.min() >= 0
    wq = qm.dequantize(codes, s, m, 50)
    assert np.abs(wq - w).max() < 0.6


@pytest.mark.parametrize("how", ["nearest", "gptq"])
@pytest.mark.parametrize("group", [0, 4])
def test_constant_rows_and_groups_quantize_without_dividing_by_zero(how, group):
    """A row or group whose weights are all equal (a pruned or dead unit: zeros) has range 0; its scale, stored
    as float16, must not round to 0, or the codes are 0/0 = NaN cast to an integer (undefined)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 16))
    w[1] = 0.0
    w[2] = 0.37
    w[4, :4] = -1.25
    with np.errstate(all="raise"):  # any division by zero or invalid value fails the test
        codes, s, m = (qm.round_nearest(w, 2, group) if how == "nearest"
                       else qm.gptq(w, np.eye(16), 2, group))
    assert np.isfinite(codes).all() and (s > 0).all()
    wq = qm.dequantize(codes, s, m, 16)
    np.testing.assert_allclose(wq[1], 0.0, atol=1e-6)
    np.testing.assert_allclose(wq[2], 0.37, atol=1e-3)  # the float16 offset's rounding
    if group:
        np.testing.assert_allclose(wq[4, :4], -1.25, atol=1e-3)


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "entropy"])
@pytest.mark.parametrize("signed", [False, True])
def test_activation_params_cover_zero_and_bound_the_error(method, signed):
    x = np.random.default_rng(2).standard_normal(100_000).astype(np.float32)
    x[:5] = 40.0  # outliers: every method but minmax may clip them
    obs = qm.Observer()
    obs.see_range(x)
    obs.see_values(x)
    scale, zero = qm.activation_params(obs, method, signed)
    qmin, qmax = (-127, 127) if signed else (0, 255)
    assert scale > 0 and qmin <= zero <= qmax
    q = np.clip(np.round(x / scale) + zero, qmin, qmax)
    err = np.mean(((q - zero) * scale - x) ** 2)
    assert np.mean(((q - zero) * scale - x)[5:] ** 2) < 0.01  # the bulk of the values is represented well
    if method == "mse":  # the least squared error over all values, outliers included
        s0, z0 = qm.activation_params(obs, "minmax", signed)
        q0 = np.clip(np.round(x / s0) + z0, qmin, qmax)
        assert err <= np.mean(((q0 - z0) * s0 - x) ** 2)


# ------------------------------------------------------------------------------- hand-built graphs
def _layers_model(opset=17):
    """Conv (grouped, SAME padding) -> Conv 1x1 -> Flatten -> Gemm(transB) -> MatMul, every layer kind."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("w1", rng.standard_normal((8, 2, 3, 3))), ("b1", rng.standard_normal(8)),
        ("w2", rng.standard_normal((4, 8, 1, 1))),
        ("w3", rng.standard_normal((16, 4 * 4 * 4)) * 0.2), ("b3", rng.standard_normal(16)),
        ("w4", rng.standard_normal((16, 10)) * 0.3))]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv_grouped", group=2, auto_pad="SAME_UPPER",
                         strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv_1x1"),
        helper.make_node("Flatten", ["c2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["g", "w4"], ["y"], name="matmul"),
    ]
    return graphopt.Graph(make_model(nodes, [vi("x", ["n", 4, 8, 8])],
                                     [vi("y", ["n", 10])], inits, opset=opset))


def _feeds(count=8, seed=4):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, 4, 8, 8)).astype(np.float32)} for _ in range(count)]


@pytest.mark.parametrize("pipeline,ops", [
    ("quantize", {"QuantizeLinear", "DequantizeLinear"}),
    ("quantize(symmetric=true,calibrate=percentile)", {"QuantizeLinear", "DequantizeLinear"}),
    ("quantize(mode=dynamic)", {"DynamicQuantizeLinear", "DequantizeLinear"}),
    ("quantize(mode=weight-only,bits=4,group=16)", {"Floor", "Cast"}),
    ("quantize(mode=weight-only,bits=3,rounding=nearest)", {"Floor", "Cast"}),
    ("quantize(mode=weight-only,bits=8)", {"Cast"}),
])
def test_every_layer_kind_quantizes_to_valid_onnx(pipeline, ops):
    g = _layers_model()
    res = graphopt.optimize(g, pipeline, data=DataSource(feeds=_feeds()))
    out = res.graph
    onnx.checker.check_model(out.model)
    assert ops <= {n.op_type for n in out.graph.node}
    details = res.records[0].details
    assert details["quantized"] == 4, details
    test = _feeds(4, seed=9)
    err = output_error(run_reference(g, test), run_reference(out, test), ["y"])
    assert err.cosine > (0.95 if "bits=3" in pipeline else 0.98 if "bits=4" in pipeline else 0.99), (pipeline, err)
    ratio = details["weight_bytes"]["ratio"]
    # 8-bit: 4x less the scales; 4-bit in groups of 16: 4 bits + 2 float16 per 16 weights; 3-bit per channel
    assert ratio > (3.0 if "bits=8" in pipeline or "weight-only" not in pipeline else 4.0 if "group=16" in pipeline
                    else 7.0), details
    # the float weights are gone from the file
    names = {t.name for t in out.graph.initializer}
    assert not names & {"w1", "w2", "w3", "w4"}


def test_static_qdq_form_is_what_onnx_runtime_expects():
    """Weights int8 per output channel, activations uint8 with one scale, biases int32 at s_x * s_w."""
    res = graphopt.optimize(_layers_model(), "quantize", data=DataSource(feeds=_feeds()))
    g = res.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.graph.initializer}
    producers = {o: n for n in g.graph.node for o in n.output}
    conv = next(n for n in g.graph.node if n.name == "conv_grouped")
    x_dq, w_dq, b_dq = (producers[i] for i in conv.input)
    assert w_dq.op_type == x_dq.op_type == b_dq.op_type == "DequantizeLinear"
    assert inits[w_dq.input[0]].dtype == np.int8 and inits[w_dq.input[1]].shape == (8,)
    assert producers[x_dq.input[0]].op_type == "QuantizeLinear" and inits[x_dq.input[2]].dtype == np.uint8
    assert inits[b_dq.input[0]].dtype == np.int32
    np.testing.assert_allclose(inits[b_dq.input[1]], inits[x_dq.input[1]] * inits[w_dq.input[1]], rtol=1e-6)


def _attention_model():
    """x [n, 6, 8] -> q, k, v projections -> softmax(q k^T / sqrt(8)) v: two MatMuls of activations."""
    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 8)) * 0.4).astype(np.float32), n) for n in ("wq", "wk", "wv")]
    inits.append(numpy_helper.from_array(np.array(8 ** -0.5, np.float32), "scale"))
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="proj_q"),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="proj_k"),
             helper.make_node("MatMul", ["x", "wv"], ["v"], name="proj_v"),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
             helper.make_node("Mul", ["s", "scale"], ["ss"]),
             helper.make_node("Softmax", ["ss"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["y"], name="context")]
    return graphopt.Graph(make_model(nodes, [vi("x", ["n", 6, 8])], [vi("y", ["n", 6, 8])], inits))


def test_static_mode_quantizes_matmuls_of_two_activations_unless_told_not_to():
    """Attention's Q x K^T and P x V get a QDQ pair on both inputs (as ONNX Runtime's quantizer does), calibrated
    like every activation; act_matmuls=false leaves them float and says why."""
    g = _attention_model()
    feeds = [{"x": np.random.default_rng(i).standard_normal((2, 6, 8)).astype(np.float32)} for i in range(6)]
    res = graphopt.optimize(g, "quantize", data=DataSource(feeds=feeds))
    out = res.graph
    onnx.checker.check_model(out.model)
    d = res.records[0].details
    assert d["quantized"] == 5 and d["activation_matmuls"] == 2, d
    producers = {o: n for n in out.graph.node for o in n.output}
    for name in ("scores", "context"):
        node = next(n for n in out.graph.node if n.name == name)
        assert [producers[i].op_type for i in node.input] == ["DequantizeLinear"] * 2
        assert [producers[producers[i].input[0]].op_type for i in node.input] == ["QuantizeLinear"] * 2
    err = output_error(run_reference(g, feeds), run_reference(out, feeds), ["y"])
    assert err.cosine > 0.99, err
    kept = graphopt.optimize(g, "quantize(act_matmuls=false)", data=DataSource(feeds=feeds)).records[0].details
    assert kept["quantized"] == 3 and "activation_matmuls" not in kept
    assert kept["not_quantized"]["scores"] == "a MatMul of two activations (act_matmuls=false)"


def test_old_opset_gets_per_tensor_weights_and_opset_9_is_refused():
    res = graphopt.optimize(_layers_model(opset=11), "quantize", data=DataSource(feeds=_feeds()))
    onnx.checker.check_model(res.graph.model)
    assert res.records[0].details["quantized"] == 4
    with pytest.raises(graphopt.ModelError, match="opset 10 or newer"):
        graphopt.optimize(_layers_model(opset=9), "quantize", data=DataSource(feeds=_feeds()))


def test_exclude_and_skip_reasons():
    g = _layers_model()
    res = graphopt.optimize(g, "quantize(mode=dynamic,exclude='gemm,matmul')")
    d = res.records[0].details
    assert d["quantized"] == 2 and d["not_quantized"] == {"gemm": "excluded", "matmul": "excluded"}


def test_layers_inside_subgraphs_are_listed_not_quantized():
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    branch = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["b"], name="inner_mm")], "then", [],
                               [vi("b", ["n", 4])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["c"], name="id")], "else", [], [vi("c", ["n", 4])])
    m = make_model([helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch, else_branch=other)],
                   [vi("x", ["n", 4]), vi("cond", [], TensorProto.BOOL)], [vi("y", ["n", 4])], [w])
    res = graphopt.optimize(graphopt.Graph(m), "quantize(mode=dynamic)")
    d = res.records[0].details
    assert d["quantized"] == 0 and "If/Loop/Scan body" in d["not_quantized"]["inner_mm"]


@pytest.mark.parametrize("mode", ["static", "dynamic", "weight-only"])
def test_weights_a_grid_cannot_hold_stay_float_with_the_reason(mode):
    """A weight with NaN/inf, or (weight-only: float16 grids) beyond float16's range, is not quantized into a
    model that computes NaN: the layer stays float and the record says why; the other layers are quantized."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32) * 1e6, "w_big"),
             numpy_helper.from_array(np.where(np.eye(8) > 0, np.inf, 1.0).astype(np.float32), "w_inf"),
             numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w_ok")]
    nodes = [helper.make_node("MatMul", ["x", "w_ok"], ["a"], name="ok"),
             helper.make_node("MatMul", ["a", "w_big"], ["b"], name="big"),
             helper.make_node("MatMul", ["x", "w_inf"], ["c"], name="inf")]
    g = graphopt.Graph(make_model(nodes, [vi("x", ["n", 8])], [vi("b", ["n", 8]), vi("c", ["n", 8])], inits))
    feeds = [{"x": rng.standard_normal((4, 8)).astype(np.float32)} for _ in range(4)]
    res = graphopt.optimize(g, f"quantize(mode={mode})", data=DataSource(feeds=feeds))
    d = res.records[0].details
    assert "NaN or infinity" in d["not_quantized"]["inf"]
    if mode == "weight-only":
        assert "float16" in d["not_quantized"]["big"] and d["quantized"] == 1
        err = output_error(run_reference(g, feeds), run_reference(res.graph, feeds), ["b"])
        assert np.isfinite(err.max_abs) and err.cosine > 0.99, err
    else:
        assert d["quantized"] == 2


def test_weight_only_without_data_rounds_to_nearest_and_needs_no_data():
    res = graphopt.optimize(_layers_model(), "quantize(mode=weight-only,bits=4,rounding=nearest)")
    assert res.records[0].details["quantized"] == 4


def test_activations_facility_reads_intermediate_values():
    from graphopt.activations import Activations

    g = _layers_model()
    feeds = _feeds(3)
    acts = Activations(g, feeds).collect(["r1", "g"])
    assert acts["r1"].shape == (12, 8, 4, 4) and acts["g"].shape == (12, 16)
    assert acts["r1"].min() >= 0
    # the MatMul's output equals g @ w4
    y = np.concatenate([o[0] for o in run_reference(g, feeds)])
    np.testing.assert_allclose(acts["g"] @ numpy_helper.to_array(g.initializers()["w4"]), y, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ budget
def test_budget_keeps_the_most_sensitive_layers_in_float():
    g = _layers_model()
    res = graphopt.optimize(g, "quantize(mode=weight-only,bits=2,rounding=nearest)",
                            data=DataSource(feeds=_feeds(16)), budget=0.0)
    d = res.records[0].details
    assert d["budget"]["drop_all_quantized"] > 0  # 2-bit costs something on this model
    assert d["kept_float"] and all("points quantized alone" in v for v in d["kept_float"].values())
    assert d["budget"]["drop"] <= 0.0
    assert res.report["accuracy"]["vs_float"]["top1_agreement"] == 100.0


# ------------------------------------------------------------------------------------ digits models
@pytest.fixture(scope="module")
def digits(tmp_path_factory, digits_trained):
    m = dict(digits_trained)
    d = tmp_path_factory.mktemp("digits")
    for name in ("cnn", "mlp"):
        m[name].save(d / f"{name}.onnx")
    np.savez(d / "calib.npz", **m["data"]["calib"])
    np.savez(d / "eval.npz", labels=m["data"]["labels"], **m["data"]["eval"])
    m["dir"] = d
    return m


@pytest.mark.torch
@pytest.mark.parametrize("pipeline,max_drop,min_ratio", [
    ("quantize(mode=static)", 0.5, 3.5),
    ("quantize(mode=weight-only,bits=4)", 1.0, 6.0),
    ("quantize(mode=weight-only,bits=2)", 2.0, 12.0),
])
def test_digits_cnn_accuracy_targets(digits, pipeline, max_drop, min_ratio):
    d = digits["data"]
    ev = EvalSet([d["eval"]], d["labels"], source="digits held-out")
    res = graphopt.optimize(digits["cnn"], pipeline, data=DataSource(feeds=[d["calib"]]), eval=ev)
    acc = res.report["accuracy"]
    assert acc["float"] > 95 and acc["drop"] <= max_drop, acc
    assert res.records[0].details["weight_bytes"]["ratio"] >= min_ratio, res.records[0].details
    assert res.records[0].accuracy["drop"] == acc["drop"]


@pytest.mark.torch
def test_quantized_digits_model_lowers_and_verifies_against_the_graph_it_compiled(digits, tmp_path, capsys):
    d = digits["dir"]
    code = run_cli("lower", d / "mlp.onnx", "--passes", "cleanup,quantize,cleanup", "--data", d / "calib.npz",
                   "--eval", d / "eval.npz", "-o", tmp_path / "art", "--verify", "--report", tmp_path / "r.json")
    out = capsys.readouterr().out
    assert code == 0, out
    assert "artifact vs the float model" in out and "top-1 accuracy on" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["accuracy"]["artifact_vs_float"]["top1_agreement"] >= 99.0
    # the default pipeline kept it quantized
    model = onnx.load(tmp_path / "art" / "model.onnx")
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    # did it pay off: both artifacts measured in one run, the lossy one kept (no --keep-if-faster)
    pay = report["payoff"]
    assert pay["kept"] == "with" and pay["latency_ms"]["with"] > 0 and pay["latency_ms"]["without"] > 0
    assert pay["size_bytes"]["with"] < pay["size_bytes"]["without"] and "did the lossy passes pay off" in out
    assert not (tmp_path / "art" / ".without-lossy").exists()


@pytest.mark.torch
def test_keep_if_faster_keeps_a_consistent_artifact(digits, tmp_path, capsys):
    d = digits["dir"]
    code = run_cli("lower", d / "mlp.onnx", "--passes", "quantize", "--data", d / "calib.npz", "--keep-if-faster",
                   "-o", tmp_path / "art", "--verify", "--report", tmp_path / "r.json")
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    pay = report["payoff"]
    faster = pay["latency_ms"]["with"] < pay["latency_ms"]["without"]
    assert pay["kept"] == ("with" if faster else "without")
    model = onnx.load(tmp_path / "art" / "model.onnx")
    quantized = any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert quantized == faster
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert ("quantize" in manifest["pipeline"]) == faster
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == ["main.so", "manifest.json", "model.onnx",
                                                                      "weights.bin"]
    graphopt.load(tmp_path / "art").run({"image": digits["data"]["eval"]["image"][:2]})


# --------------------------------------------------------------------------------------- bad input
@pytest.fixture
def mlp_files(tmp_path):
    rng = np.random.default_rng(5)
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                   [vi("x", ["n", 8])], [vi("y", ["n", 4])], [w])
    onnx.save(m, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 8)).astype(np.float32))
    return tmp_path


@pytest.mark.parametrize("extra,message", [
    (["--passes", "quantize"], "needs calibration data"),
    (["--passes", "quantize(mode=weight-only,bits=2)"], "needs calibration data"),
    (["--passes", "quantize(bits=4)", "--data", "{d}/calib.npz"], "applies to mode=weight-only"),
    (["--passes", "quantize(mode=weight-only,bits=5)", "--data", "{d}/calib.npz"], "must be one of 8, 4, 3, 2"),
    (["--passes", "quantize(mode=int8)"], "must be one of static"),
    (["--passes", "quantize(mode=weight-only,group=-1)"], "must be >= 0"),
    (["--passes", "quantize", "--data", "{d}/wrong_name.npz"], "missing ['x']"),
    (["--passes", "quantize", "--data", "{d}/wrong_shape.npz"], "has shape"),
    (["--passes", "quantize", "--data", "{d}/wrong_dtype.npz"], "has dtype float64"),
    (["--passes", "quantize", "--data", "{d}/empty.npz"], "empty batch"),
    (["--passes", "quantize", "--data", "{d}/calib.npz", "--eval", "{d}/calib.npz"], "holds no 'labels'"),
    (["--passes", "quantize", "--data", "{d}/calib.npz", "--eval", "{d}/short.npz"], "'labels' has 3 entries"),
    (["--passes", "quantize", "--data", "{d}/calib.npz", "--budget", "-1"], "budget"),
    (["--passes", "quantize(mode=dynamic)", "--budget", "1"], "--budget needs data"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(mlp_files, capsys, extra, message):
    d = mlp_files
    rng = np.random.default_rng(6)
    np.savez(d / "wrong_name.npz", z=rng.standard_normal((4, 8)).astype(np.float32))
    np.savez(d / "wrong_shape.npz", x=rng.standard_normal((4, 9)).astype(np.float32))
    np.savez(d / "wrong_dtype.npz", x=rng.standard_normal((4, 8)))
    np.savez(d / "empty.npz", x=np.zeros((0, 8), np.float32))
    np.savez(d / "short.npz", x=rng.standard_normal((4, 8)).astype(np.float32), labels=np.arange(3))
    args = [a.format(d=d) for a in extra]
    code = run_cli("optimize", d / "m.onnx", "-o", d / "out.onnx", *args)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert not (d / "out.onnx").exists()


def test_budget_exceeded_fails_with_exit_1(mlp_files, tmp_path):
    """A lossy pipeline whose measured drop is over --budget fails (VerificationError: exit 1), nothing written."""
    from graphopt.errors import VerificationError
    from graphopt.pipeline import Pipeline

    class Negate(graphopt.Pass):
        """A lossy pass that flips the weight's sign: top-1 collapses."""

        name = "negate"
        lossless = False

        def run(self, graph, ctx):
            w = graph.initializers()["w"]
            w.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(w), "w"))
            return graph

    d = mlp_files
    g = graphopt.Graph.load(d / "m.onnx")
    x = np.random.default_rng(7).standard_normal((64, 8)).astype(np.float32)
    labels = np.argmax(run_reference(g, [{"x": x}])[0][0], axis=1)
    ev = EvalSet([{"x": x}], labels)
    with pytest.raises(VerificationError, match="accuracy budget exceeded: top-1 accuracy dropped"):
        graphopt.optimize(g, Pipeline([Negate()]), eval=ev, budget=1.0, output=tmp_path / "o.onnx")
    assert not (tmp_path / "o.onnx").exists()
    res = graphopt.optimize(g, Pipeline([Negate()]), eval=ev)  # no budget: measured, not judged
    assert res.report["accuracy"]["float"] == 100.0 and res.report["accuracy"]["drop"] > 50


def test_top1_agreement_helper():
    a = np.array([[0.1, 0.9], [0.8, 0.2]])
    b = np.array([[0.2, 0.8], [0.1, 0.9]])
    assert top1_agreement([a], [b]) == 50.0
    assert top1_agreement([np.zeros((2,), np.int64)], [np.zeros((2,), np.int64)]) is None


def test_verify_layers_names_where_the_error_starts(capsys, tmp_path):
    from graphopt.accuracy import compare_layers

    g = _layers_model()
    same = compare_layers(g, g, _feeds(2))
    assert same["first_divergent"] is None and all(r["snr_db"] == "inf" for r in same["layers"])
    assert [r["value"] for r in same["layers"]] == ["c1", "r1", "c2", "f", "g", "y"]
    # Only the MatMul at the end is quantized, to 2 bits: everything before it is exact, so it is the first.
    res = graphopt.optimize(g, "quantize(mode=weight-only,bits=2,rounding=nearest,ops=MatMul)", verify_layers=True)
    layers = res.report["layers"]
    assert layers["first_divergent"]["node"] == "matmul", layers
    assert all(r["snr_db"] == "inf" for r in layers["layers"] if r["value"] != "y")
    g.save(tmp_path / "m.onnx")
    code = run_cli("optimize", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--passes",
                   "quantize(mode=weight-only,bits=2,rounding=nearest,ops=MatMul)", "--verify-layers")
    assert code == 0
    assert "first to diverge (SNR below 20 dB) is MatMul 'matmul'" in capsys.readouterr().out
