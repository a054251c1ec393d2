"""`graphopt bench`: the artifact next to ONNX Runtime, same inputs and threads, outputs checked before timing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

import graphopt
from graphopt.target import THREADS_ENV

from .conftest import run_cli

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
QUICK = ["--seconds", "0.2", "--warmup", "1"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "digits"
    graphopt.lower(EXAMPLES / "digits_mlp.onnx", "cpu", out)
    return out


def test_bench_reports_both_runtimes_and_their_ratio(digits, monkeypatch, capsys):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    inputs = EXAMPLES / "digits_inputs.npz"
    assert run_cli("bench", digits, "--inputs", inputs, "--threads", "1", "--profile", "--json", *QUICK) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["threads"] == 1 and doc["agreement"]["ok"]
    with np.load(inputs) as z:
        batch = z["image"].shape[0]
    assert doc["batch"] == batch and doc["rounds"] >= 5
    for side in ("graphopt", "onnxruntime"):
        s = doc[side]
        assert 0 < s["p10_ms"] <= s["median_ms"] <= s["p90_ms"]
        assert s["runs"] >= 5
        assert s["throughput_per_s"] == pytest.approx(batch / (s["median_ms"] / 1e3))
        # Each runtime in its own process: a real resident set, at least what it had before loading.
        assert s["peak_rss_bytes"] >= s["base_rss_bytes"] > 1 << 20
    assert doc["ratio"] == pytest.approx(doc["graphopt"]["median_ms"] / doc["onnxruntime"]["median_ms"])
    prof = doc["profile"]
    assert prof and sum(k["share"] for k in prof) == pytest.approx(1.0)
    assert any(k["name"].startswith("fused_") for k in prof)  # the model's own kernels, not only VM builtins
    from graphopt.bench import format_report

    text = "\n".join(format_report(doc))  # what the command prints without --json
    assert f"graphopt / onnxruntime: {doc['ratio']:.2f}x" in text and "samples/s" in text and "fused_" in text


def _retarget(art: Path, edit) -> None:
    """Edit the artifact's model.onnx and re-hash the manifest (a consistent but wrong artifact)."""
    from graphopt.artifact import MANIFEST, write_manifest

    model = onnx.load(art / "model.onnx", load_external_data=False)
    edit(model)
    (art / "model.onnx").write_bytes(model.SerializeToString())
    manifest = json.loads((art / MANIFEST).read_text())
    write_manifest(art, manifest)


def test_outputs_that_disagree_are_not_timed(digits, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    art = tmp_path / "wrong"
    shutil.copytree(digits, art)

    def relu_to_sigmoid(model):
        node = next(n for n in model.graph.node if n.op_type == "Relu")
        node.op_type = "Sigmoid"

    _retarget(art, relu_to_sigmoid)
    assert run_cli("bench", art, *QUICK) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "outputs differ from ONNX Runtime" in err and "not timed" in err


@pytest.mark.parametrize("case, message", [
    ("tampered", "does not match its hash"),
    ("bad_inputs", "image"),
    ("not_artifact", "not a graphopt artifact"),
    ("zero_seconds", "must be a positive number"),
    ("zero_threads", "must be an integer of at least 1"),
])
def test_bad_artifact_or_arguments_exit_2_with_one_line(digits, tmp_path, capsys, case, message):
    args = []
    art = digits
    if case == "tampered":
        art = tmp_path / "tampered"
        shutil.copytree(digits, art)
        with open(art / "weights.bin", "r+b") as f:
            f.write(b"\x7f\x7f\x7f\x7f")
    elif case == "bad_inputs":
        np.savez(tmp_path / "x.npz", pixels=np.zeros((1, 64), np.float32))
        args = ["--inputs", tmp_path / "x.npz"]
    elif case == "not_artifact":
        art = tmp_path
    elif case == "zero_seconds":
        args = ["--seconds", "0"]
    elif case == "zero_threads":
        args = ["--threads", "0"]
    assert run_cli("bench", art, *args, "--json") == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert json.loads(captured.out)["ok"] is False


@pytest.mark.slow  # ~12 s on a quiet 2-core machine, much more on a busy one (three processes start)
def test_benchmark_script_smoke(tmp_path):
    """benchmarks/bench_cpu.py on the tiny digits model: a table row with both runtimes and the ratio."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cpu.py"
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, str(script), "--models", "digits", "--seconds", "0.1", "--warmup", "1",
                           "--threads", "1", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| digits | 1 |" in proc.stdout and "not run" in proc.stdout and "geometric mean" in proc.stdout
    row = json.loads(out.read_text())["rows"][0]
    assert row["threads"] == 1 and set(row["runtimes"]) == {"graphopt", "ort"}
    assert row["ratio_vs_ort"]["graphopt"] == pytest.approx(
        row["runtimes"]["graphopt"]["median_ms"] / row["runtimes"]["ort"]["median_ms"])
    assert row["lower"]["artifact_bytes"] > 0 and row["agreement"]["graphopt"]["ok"]


def test_bench_keeps_scalar_inputs_scalar(tmp_path, capsys):
    """A 0-d input reaches both runtimes as a 0-d array (numpy's ascontiguousarray would make it [1])."""
    from onnx import helper

    from .conftest import make_model, vi

    m = make_model([helper.make_node("Mul", ["x", "s"], ["y"])],
                   [vi("x", [2, 3]), vi("s", [])], [vi("y", [2, 3])])
    onnx.save(m, tmp_path / "scale.onnx")
    graphopt.lower(tmp_path / "scale.onnx", "cpu", tmp_path / "art")
    np.savez(tmp_path / "in.npz", x=np.ones((2, 3), np.float32), s=np.float32(3.0))
    assert run_cli("bench", tmp_path / "art", "--inputs", tmp_path / "in.npz", "--json", *QUICK) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["inputs"]["s"]["shape"] == []


def _schedstat_readable() -> bool:
    import os

    from graphopt.bench import _cpu_seconds

    return _cpu_seconds(os.getpid()) is not None


@pytest.mark.skipif(not _schedstat_readable(), reason="needs per-thread CPU time from Linux /proc/PID/task/*/schedstat")
def test_next_runtime_waits_until_the_last_ones_threads_stop_spinning():
    """A worker still burning CPU after its turn (ONNX Runtime spins ~40 ms) delays the next turn until it stops."""
    import subprocess
    import sys
    import time

    from graphopt import bench

    spin = subprocess.Popen([sys.executable, "-c",
                             "import sys, time\n"
                             "sys.stdout.write('go\\n'); sys.stdout.flush()\n"
                             "t = time.perf_counter()\n"
                             "while time.perf_counter() - t < 0.25: pass\n"
                             "time.sleep(30)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert spin.stdout.readline() == "go\n"
        started = time.perf_counter()
        waited = bench._wait_quiet([spin.pid])
        # It spins for 0.25 s from 'go': the wait ends after that, and well before the cap.
        assert time.perf_counter() - started >= 0.2
        assert waited < bench.QUIET_MAX_SECONDS
        # Once it sleeps, the wait is the short fixed pause and little more.
        assert bench._wait_quiet([spin.pid]) < bench.SETTLE_SECONDS + 0.1
    finally:
        spin.kill()
        spin.wait()


def _qdq_matmul(m=16, k=256, n=64):
    """A QDQ MatMul on full-range uint8 activation codes, the case where a saturating integer GEMM is off."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    wq = rng.integers(-127, 128, (k, n)).astype(np.int8)
    inits = [numpy_helper.from_array(np.array(1 / 64, np.float32), "sx"),
             numpy_helper.from_array(np.array(128, np.uint8), "zx"),
             numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(np.full(n, 1 / 127, np.float32), "sw")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "sw"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    g = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = (rng.integers(0, 256, (m, k)).astype(np.float32) - 128) / 64  # every code 0..255 occurs
    return model, x


def test_onnx_runtime_kernels_that_are_off_do_not_fail_an_exact_artifact(tmp_path, capsys):
    """ONNX Runtime's optimized session fuses QDQ into its integer kernels; on AVX2 without VNNI they saturate.
    bench settles who is off with ONNX Runtime's unoptimized run, times anyway and says so."""
    import onnxruntime as ort

    model, x = _qdq_matmul()
    path = tmp_path / "qdq.onnx"
    onnx.save(model, path)
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    fused = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    exact = ort.InferenceSession(str(path), plain, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    if np.abs(fused - exact).max() <= 1e-3 + 2e-2 * np.abs(exact).max():
        pytest.skip("ONNX Runtime's integer kernels are exact on this CPU (VNNI): nothing to settle")
    art = tmp_path / "art"
    graphopt.lower(graphopt.Graph(model), "cpu", art)
    np.savez(tmp_path / "x.npz", x=x)
    assert run_cli("bench", art, "--inputs", tmp_path / "x.npz", *QUICK) == 0
    cap = capsys.readouterr()
    assert "unoptimized run agrees with the artifact" in cap.err and "timed anyway" in cap.err
    assert "onnxruntime" in cap.out  # both runtimes were timed
