"""The ``tpu`` target: regions partitioned out of Relax, run on the systolic-array simulator, checked against
ONNX Runtime (bit for bit for int8 regions on exactly representable models), the run report, bad options."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

import graphopt
from graphopt.graph import Graph

from .conftest import init, make_model, ort_run, run_cli, run_cli_subprocess, vi


def _lower(model, tmp_path, name, *extra, code=0):
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    out = tmp_path / f"{name}.art"
    got = run_cli("lower", path, "--target", "tpu", "-o", out, "-q", *extra)
    assert got == code
    return out


def _manifest_target(art) -> dict:
    return json.loads((art / "manifest.json").read_text())["target"]


# ------------------------------------------------------------------------------------ exact int8 regions
def _qdq_matmul_model(transposed: bool, per_tensor: bool = False):
    """x [5, 32] -> Q/DQ (scale 1/4, zero 128) -> MatMul / Gemm(transB) with int8 codes (scale 1/8 per channel,
    non-zero per-channel zero points): every value a small multiple of a power of two, so ONNX Runtime's
    float QDQ arithmetic is exact too."""
    rng = np.random.default_rng(1)
    k, n = 32, 24
    w = rng.integers(-8, 8, (n, k) if transposed else (k, n)).astype(np.int8)
    zw = rng.integers(-3, 4, n).astype(np.int8)
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["qx"]),
             helper.make_node("DequantizeLinear", ["qx", "sx", "zx"], ["dx"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["dw"], axis=0 if transposed else 1)]
    inits = [init("sx", np.float32(0.25)), init("zx", np.uint8(128)), init("w", w),
             init("sw", np.float32(0.125) if per_tensor else np.full(n, 0.125, np.float32)),
             init("zw", np.int8(-2) if per_tensor else zw)]
    if transposed:
        nodes.append(helper.make_node("Gemm", ["dx", "dw"], ["y"], transB=1))
    else:
        nodes.append(helper.make_node("MatMul", ["dx", "dw"], ["y"]))
    return make_model(nodes, [vi("x", [5, k])], [vi("y", [5, n])], inits)


def _qdq_conv_model():
    """x [2, 3, 9, 9] -> Q/DQ (int8 symmetric, scale 1/2) -> Conv 3x3 stride 2 pad 1 (int8 per channel)."""
    rng = np.random.default_rng(2)
    w = rng.integers(-6, 7, (8, 3, 3, 3)).astype(np.int8)
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["qx"]),
             helper.make_node("DequantizeLinear", ["qx", "sx", "zx"], ["dx"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["dw"], axis=0),
             helper.make_node("Conv", ["dx", "dw"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])]
    inits = [init("sx", np.float32(0.5)), init("zx", np.int8(0)), init("w", w),
             init("sw", np.array([0.25, 0.125] * 4, np.float32)), init("zw", np.zeros(8, np.int8))]
    return make_model(nodes, [vi("x", [2, 3, 9, 9])], [vi("y", [2, 8, 5, 5])], inits)


@pytest.mark.parametrize("kind", ["matmul", "matmul_per_tensor", "gemm_transposed", "conv"])
def test_int8_regions_match_onnx_runtime_bit_for_bit(tmp_path, kind):
    """Per-channel and per-tensor weight scales (one scalar scale and zero point for the whole weight)."""
    model = (_qdq_conv_model() if kind == "conv"
             else _qdq_matmul_model(kind == "gemm_transposed", per_tensor=kind == "matmul_per_tensor"))
    art = _lower(model, tmp_path, kind)
    t = _manifest_target(art)
    assert t["int8_regions"] == 1 and t["bf16_regions"] == 0 and t["offloaded_share"] == 1.0
    assert t["regions"][0]["kind"] == ("conv" if kind == "conv" else "gemm")
    rng = np.random.default_rng(3)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    step = 0.5 if kind == "conv" else 0.25
    x = (rng.integers(-40, 40, shape) * step).astype(np.float32)
    got = graphopt.load(art).run({"x": x})["y"]
    (ref,) = ort_run(Graph(model), {"x": x})
    assert got.dtype == np.float32 and np.array_equal(got, ref)


# ------------------------------------------------------------------------------------ float models: bf16 regions
def _cnn_model():
    """Conv 3->8 (3x3, pad 1) + Relu -> depthwise Conv (group 8) -> Conv 8->16 stride 2 -> GAP -> Gemm(transB)."""
    rng = np.random.default_rng(4)
    f = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "wd"], ["cd"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=8),
        helper.make_node("Conv", ["cd", "w2"], ["c2"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["fl"]),
        helper.make_node("Gemm", ["fl", "wf", "bf"], ["y"], transB=1),
    ]
    inits = [init("w1", f(8, 3, 3, 3)), init("b1", f(8)), init("wd", f(8, 1, 3, 3)), init("w2", f(16, 8, 3, 3)),
             init("wf", f(10, 16)), init("bf", f(10))]
    return make_model(nodes, [vi("x", ["n", 3, 12, 12])], [vi("y", ["n", 10])], inits)


def test_float_mlp_runs_as_bf16_regions_and_verifies(mlp_onnx, tmp_path):
    out = tmp_path / "mlp.art"
    assert run_cli("lower", mlp_onnx, "--target", "tpu", "-o", out, "--verify", "-q") == 0
    t = _manifest_target(out)
    assert t["bf16_regions"] == 2 and t["int8_regions"] == 0 and t["offloaded_share"] == 1.0
    assert t["array"]["rows"] == t["array"]["cols"] == 128
    # bf16 regions are lossy: the artifact is checked with the quantization tolerances
    from graphopt.reference import quantized_artifact

    assert quantized_artifact({"target": t})


def test_cnn_keeps_the_depthwise_conv_on_the_host_and_verifies(tmp_path, capsys):
    art = _lower(_cnn_model(), tmp_path, "cnn", "--verify", "--input-shape", "x:2,3,12,12",
                 "--target-opt", "array=32")
    t = _manifest_target(art)
    assert t["bf16_regions"] == 3 and [r["kind"] for r in t["regions"]] == ["conv", "conv", "gemm"]
    assert [h["op"] for h in t["host_ops"]] == ["conv2d"] and "grouped" in t["host_ops"][0]["reason"]
    assert 0 < t["offloaded_share"] < 1 and t["host_macs"] == 2 * 8 * 12 * 12 * 9
    assert t["array"]["rows"] == 32
    # (d) + (g): `graphopt run` in a fresh process: the per-region report and its JSON document
    res = run_cli_subprocess("run", art)
    assert res.returncode == 0, res.stderr
    assert "not a driver" in res.stdout and "tpu-sim 32x32" in res.stdout
    lines = [ln for ln in res.stdout.splitlines() if ln.split()[:1] in (["0"], ["1"], ["2"], ["total"])]
    assert len(lines) == 4, res.stdout
    res = run_cli_subprocess("run", art, "--json")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)["target_report"]
    assert [r["id"] for r in rep["regions"]] == [0, 1, 2] and all(r["calls"] == 1 for r in rep["regions"])
    assert all(r["cycles"] > 0 and 0 < r["utilization"] <= 1 for r in rep["regions"])
    assert rep["total"]["macs"] == sum(r["macs"] for r in rep["regions"]) and rep["offloaded_share"] < 1
    assert rep["regions"][0]["macs"] == 2 * 8 * 12 * 12 * 27


def test_float_regions_false_leaves_float_models_on_the_host(mlp_onnx, tmp_path):
    out = tmp_path / "mlp.art"
    assert run_cli("lower", mlp_onnx, "--target", "tpu", "--target-opt", "float_regions=false", "-o", out,
                   "--verify", "-q") == 0
    t = _manifest_target(out)
    assert t["bf16_regions"] == t["int8_regions"] == 0 and t["offloaded_share"] == 0
    assert len(t["host_ops"]) == 2 and all("float_regions=false" in h["reason"] for h in t["host_ops"])


# ------------------------------------------------------------------------------------ bad options
@pytest.mark.parametrize("opt,name", [("array=96", "array"), ("array=0", "array"), ("buffer_kib=1", "buffer_kib"),
                                      ("rows=3", "rows")])
def test_bad_array_options_exit_2_before_anything_is_written(mlp_onnx, tmp_path, capsys, opt, name):
    out = tmp_path / "art"
    assert run_cli("lower", mlp_onnx, "--target", "tpu", "--target-opt", opt, "-o", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"option '{name}'" in err[0], err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]


# ------------------------------------------------------------------------------------ static int8 digits CNN
@pytest.mark.torch
def test_static_int8_digits_cnn_lowers_to_int8_regions_and_verifies(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    from graphopt.testing import digits_models

    m = digits_models(epochs=3)
    m["cnn"].save(tmp_path / "cnn.onnx")
    np.savez(tmp_path / "calib.npz", **m["data"]["calib"])
    out = tmp_path / "art"
    report = tmp_path / "report.json"
    assert run_cli("lower", tmp_path / "cnn.onnx", "--target", "tpu", "--passes",
                   "cleanup,quantize(mode=static),cleanup", "--data", tmp_path / "calib.npz", "-o", out,
                   "--verify", "-q", "--report", report) == 0
    # Simulated: the payoff compares the array's modelled time (int8 moves half the bytes of bf16), not the
    # host's wall-clock time.
    payoff = json.loads(report.read_text())["payoff"]
    assert payoff["timed"] == "modelled" and "not measured" in payoff["note"]
    assert payoff["speedup"] > 1 and payoff["latency_ms"]["with"] < payoff["latency_ms"]["without"]
    t = _manifest_target(out)
    assert t["int8_regions"] == 5 and t["bf16_regions"] == 0 and t["offloaded_share"] == 1.0
    art = graphopt.load(out)
    art.run({"image": m["data"]["eval"]["image"][:4]})
    rep = art.target_cls.run_report(art)
    assert len(rep["regions"]) == 5 and rep["total"]["macs"] > 0
    assert rep["regions"][1]["macs"] == 4 * 64 * 144 * 32  # batch 4, 8x8 outputs, K = 16*3*3, N = 32


@pytest.mark.slow
@pytest.mark.realmodel
def test_real_model_runs_through_the_simulator_and_verifies(real_model, tmp_path, capsys):
    """orientation (PP-LCNet): its dense and pointwise convs on the array, depthwise ones on the host."""
    from graphopt.testing import REAL_MODELS

    spec = REAL_MODELS["orientation"]
    feeds = spec.write_feeds(tmp_path / "x.npz")
    out = tmp_path / "orientation.art"
    assert run_cli("lower", real_model("orientation"), "--target", "tpu", "-o", out, "-q", *spec.cli_args(),
                   "--data", feeds, "--verify") == 0
    t = _manifest_target(out)
    assert t["bf16_regions"] >= 10 and 0.5 < t["offloaded_share"] < 1.0
    assert any("grouped conv" in str(h) for h in t["host_ops"])
    assert run_cli("run", out, "--inputs", feeds) == 0
    assert "of matmul/conv MACs offloaded" in capsys.readouterr().out


def test_bench_refuses_a_simulated_artifact(mlp_onnx, tmp_path, capsys):
    """Timing the simulator's wall clock would say nothing about the array: bench says where the cycles are."""
    out = tmp_path / "mlp.art"
    assert run_cli("lower", mlp_onnx, "--target", "tpu", "-o", out, "-q") == 0
    assert run_cli("bench", out, "--seconds", "0.1") == 2
    err = capsys.readouterr().err
    assert "runs its accelerator on a simulator" in err and "graphopt run" in err


def test_payoff_that_moves_work_off_the_array_is_not_compared(mlp_onnx, tmp_path, capsys):
    """quantize(mode=dynamic) leaves no region on the array: 0 modelled ms is not "faster", the host's time
    is not modelled. The CLI says so instead of crashing on a missing speed-up."""
    out = tmp_path / "dyn.art"
    report = tmp_path / "r.json"
    assert run_cli("lower", mlp_onnx, "--target", "tpu", "--passes", "cleanup,quantize(mode=dynamic),cleanup",
                   "-o", out, "--keep-if-faster", "--report", report) == 0
    assert "speed-up n/a" in capsys.readouterr().out
    pay = json.loads(report.read_text())["payoff"]
    assert pay["speedup"] is None and pay["kept"] == "with" and "not comparable" in pay["note"]


def test_a_tpu_artifact_runs_on_the_one_cpu_device(mlp_onnx, tmp_path):
    from graphopt.errors import ArtifactError

    out = tmp_path / "m.art"
    assert run_cli("lower", mlp_onnx, "--target", "tpu", "-o", out, "-q") == 0
    graphopt.load(out, device="cpu:0")
    with pytest.raises(ArtifactError, match="one CPU device"):
        graphopt.load(out, device="cpu:1")
