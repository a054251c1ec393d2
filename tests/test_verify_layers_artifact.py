"""``lower --verify-layers``'s artifact section: the compiled code's intermediate values (a probe artifact that
exposes them) against ONNX Runtime's on the graph it compiled."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import helper, numpy_helper

import graphopt
from graphopt import api
from graphopt.accuracy import ARTIFACT_DIVERGENCE_SNR_DB, ARTIFACT_INT8_DIVERGENCE_SNR_DB, probe_graph
from graphopt.cli import _layer_lines
from graphopt.data import DataSource
from graphopt.reference import quantized_artifact

from .conftest import init, make_model, run_cli, vi

#: The tiny MLP's float intermediate values in node order (every node's output depends on x).
VALUES = ["h", "h2", "h3", "h4", "y"]


def _mlp() -> graphopt.Graph:
    """x[n,16] -> MatMul -> Add -> Relu -> MatMul -> Add -> y[n,8]."""
    rng = np.random.default_rng(0)
    return graphopt.Graph(make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
         helper.make_node("Add", ["h", "b1"], ["h2"], name="add1"),
         helper.make_node("Relu", ["h2"], ["h3"], name="relu"),
         helper.make_node("MatMul", ["h3", "w2"], ["h4"], name="mm2"),
         helper.make_node("Add", ["h4", "b2"], ["y"], name="add2")],
        [vi("x", ["n", 16])], [vi("y", ["n", 8])],
        [init("w1", rng.standard_normal((16, 32)).astype(np.float32)),
         init("b1", rng.standard_normal(32).astype(np.float32)),
         init("w2", rng.standard_normal((32, 8)).astype(np.float32)),
         init("b2", rng.standard_normal(8).astype(np.float32))]))


def _feeds(count=4, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(count)]


def _snrs(section) -> dict:
    return {r["value"]: float(r["snr_db"]) for r in section["layers"]}


@pytest.fixture
def mlp_path(tmp_path):
    return _mlp().save(tmp_path / "mlp.onnx")


def test_probe_graph_exposes_the_intermediate_values_and_caps_them():
    probe, values, total = probe_graph(_mlp())
    assert [v for v, _, _ in values] == VALUES and total == 5
    assert [(op, node) for _, op, node in values][:2] == [("MatMul", "mm1"), ("Add", "add1")]
    assert [o.name for o in probe.outputs] == ["y", "h", "h2", "h3", "h4"]  # y was an output already
    capped, values, total = probe_graph(_mlp(), cap=3)
    assert [v for v, _, _ in values] == ["h", "h3", "y"] and total == 5  # evenly spaced in node order
    assert [o.name for o in capped.outputs] == ["y", "h", "h3"]


def test_float_artifact_agrees_layer_by_layer(tmp_path):
    res = graphopt.lower(_mlp(), "cpu", tmp_path / "art", data=DataSource(feeds=_feeds()), verify=True,
                         verify_layers=True)
    art = res.report["layers"]["artifact"]
    assert "skipped" not in art, art
    assert [r["value"] for r in art["layers"]] == VALUES
    assert art["first_divergent"] is None and art["threshold_db"] == ARTIFACT_DIVERGENCE_SNR_DB == 40.0
    assert art["samples"] == 4 and art["values"] == art["total_values"] == 5
    assert all(s > 40.0 for s in _snrs(art).values()), art  # float rounding only: far above 40 dB
    assert all(r["cosine"] > 0.999999 and r["max_abs"] < 1e-3 for r in art["layers"])
    assert "layers" in res.report["layers"]  # the graph-vs-float section is still there
    assert not (tmp_path / "art" / api.PROBE_DIR).exists()


def _no_payoff_timing(monkeypatch):
    """The lossy pipeline's payoff times both artifacts in worker processes (seconds): not what is tested."""
    import graphopt.bench

    monkeypatch.setattr(graphopt.bench, "measure", lambda *a, **k: {
        "runtimes": {"with": {"median_ms": 1.0}, "without": {"median_ms": 2.0}}, "threads": 1})


def test_static_int8_artifact_agrees_with_onnx_runtime_qdq(tmp_path, monkeypatch):
    _no_payoff_timing(monkeypatch)
    res = graphopt.lower(_mlp(), "cpu", tmp_path / "art", pipeline="cleanup,quantize(mode=static),cleanup",
                         data=DataSource(feeds=_feeds()), verify=True, verify_layers=True)
    assert quantized_artifact(res.manifest), res.manifest["target"]  # integer kernels or compiled quantize nodes
    art = res.report["layers"]["artifact"]
    assert "skipped" not in art, art
    assert art["threshold_db"] == ARTIFACT_INT8_DIVERGENCE_SNR_DB
    assert art["first_divergent"] is None, art
    # The quantized graph's values: the float ones and the dequantized activations in front of each MatMul.
    values = [r["value"] for r in art["layers"]]
    assert set(VALUES) <= set(values) and sum(r["op"] == "DequantizeLinear" for r in art["layers"]) == 2
    # A flip of one quantization step in these 4 x 4 x 32 values would still leave about 55 dB.
    assert min(_snrs(art).values()) > max(40.0, ARTIFACT_INT8_DIVERGENCE_SNR_DB), art
    assert "build_differs" not in art  # the probe ran the same integer kernels as the artifact


def _probe_built_from(change):
    """``api._build_artifact`` whose probe build (only) compiles ``change(graph)``: a compiler that gets the
    probe's values wrong, while ONNX Runtime and the artifact itself stay right."""
    real = api._build_artifact

    def build(graph, original, pipe, tgt, dest, lctx):
        return real(change(graph) if dest.name == api.PROBE_DIR else graph, original, pipe, tgt, dest, lctx)

    return build


def _bias_off(graph: graphopt.Graph) -> graphopt.Graph:
    """The first Add's bias off by 0.5 in the compiled code (its MatMul stays right)."""
    g = graph.copy()
    b1 = next(t for t in g.graph.initializer if t.name == "b1")
    b1.CopyFrom(numpy_helper.from_array(graph.array("b1") + np.float32(0.5), "b1"))
    return g


def test_a_value_the_artifact_gets_wrong_is_named_where_it_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(api, "_build_artifact", _probe_built_from(_bias_off))
    path = _mlp().save(tmp_path / "mlp.onnx")
    report = tmp_path / "r.json"
    code = run_cli("lower", path, "-o", tmp_path / "art", "--verify-layers", "--report", report)
    out = capsys.readouterr().out
    assert code == 0, out
    art = json.loads(report.read_text())["layers"]["artifact"]
    first = art["first_divergent"]
    assert first is not None and (first["value"], first["op"], first["node"]) == ("h2", "Add", "add1"), art
    snr = _snrs(art)
    assert snr["h"] > 100.0  # the MatMul in front of it agrees: where the error starts, not where it shows
    assert snr["h2"] < 30.0 and first["max_abs"] == pytest.approx(0.5, abs=1e-4)
    assert ("artifact layers: first to diverge from ONNX Runtime on the compiled graph (SNR below 40 dB, "
            "5 values compared) is Add 'add1' (value 'h2': SNR ") in out


def _wrong_channel_scales(graph: graphopt.Graph) -> graphopt.Graph:
    """mm1's weight dequantized with its per-channel scales reversed (each column the scale of another)."""
    g = graph.copy()
    mm1 = next(n for n in g.graph.node if n.name == "mm1")
    dq = next(n for n in g.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == mm1.input[1])
    scale = next(t for t in g.graph.initializer if t.name == dq.input[1])
    assert graph.array(scale.name).shape == (32,)
    scale.CopyFrom(numpy_helper.from_array(graph.array(scale.name)[::-1].copy(), scale.name))
    return g


def test_an_int8_layer_the_artifact_gets_wrong_is_named(tmp_path, monkeypatch):
    _no_payoff_timing(monkeypatch)
    monkeypatch.setattr(api, "_build_artifact", _probe_built_from(_wrong_channel_scales))
    res = graphopt.lower(_mlp(), "cpu", tmp_path / "art", pipeline="cleanup,quantize(mode=static),cleanup",
                         data=DataSource(feeds=_feeds()), verify_layers=True)
    art = res.report["layers"]["artifact"]
    first = art["first_divergent"]
    assert art["threshold_db"] == ARTIFACT_INT8_DIVERGENCE_SNR_DB and first is not None, art
    assert (first["value"], first["node"]) == ("h", "mm1") and float(first["snr_db"]) < 12.0, art
    assert all(float(r["snr_db"]) > 40.0 for r in art["layers"][: art["layers"].index(first)])


def test_a_low_snr_within_atol_does_not_diverge():
    """A value near zero everywhere (a sigmoid's background, here x * 1e-6) has a low SNR from differences that
    --verify's absolute tolerance accepts: reported, not the first to diverge."""
    from graphopt.accuracy import compare_artifact_layers
    from graphopt.activations import Activations

    g = graphopt.Graph(make_model([helper.make_node("Mul", ["x", "tiny"], ["s"], name="scale"),
                                   helper.make_node("Relu", ["s"], ["y"], name="relu")],
                                  [vi("x", ["n", 16])], [vi("y", ["n", 16])], [init("tiny", np.float32(1e-6))]))
    _, values, _ = probe_graph(g)
    assert [v for v, _, _ in values] == ["s", "y"]

    def run(feed):  # ONNX Runtime's values, 's' off by 5e-6
        got = next(iter(Activations(g, [feed]).stream(["s", "y"])))
        return {**got, "s": got["s"] + np.float32(5e-6)}

    res = compare_artifact_layers(g, values, _feeds(2), run, threshold_db=40.0, atol=1e-4)
    snr = _snrs(res)
    assert snr["s"] < 20.0 and snr["y"] == float("inf") and res["layers"][0]["max_abs"] == pytest.approx(5e-6)
    assert res["first_divergent"] is None and res["atol"] == 1e-4
    assert "within atol 0.0001" in list(_layer_lines({"artifact": res}))[0]
    assert compare_artifact_layers(g, values, _feeds(2), run, threshold_db=40.0)["first_divergent"]["value"] == "s"


def test_cli_prints_the_artifact_line_quiet_and_json_as_the_rest(mlp_path, tmp_path, capsys):
    code = run_cli("lower", mlp_path, "-o", tmp_path / "a", "--verify-layers")
    out = capsys.readouterr().out
    assert code == 0, out
    line = next(ln for ln in out.splitlines() if ln.startswith("artifact layers:"))
    assert line.startswith("artifact layers: 5 values agree with ONNX Runtime on the compiled graph (")
    assert line.endswith("; threshold 40 dB)")
    # after the graph-vs-float section's lines
    assert out.index("layers: 5 values compared with the input model") < out.index("artifact layers:")

    code = run_cli("lower", mlp_path, "-o", tmp_path / "b", "--verify-layers", "-q")
    assert code == 0 and capsys.readouterr().out == ""

    code = run_cli("lower", mlp_path, "-o", tmp_path / "c", "--verify-layers", "--json")
    out = capsys.readouterr().out
    assert code == 0
    doc = json.loads(out)  # nothing but the JSON document
    art = doc["report"]["layers"]["artifact"]
    assert art["first_divergent"] is None and [r["value"] for r in art["layers"]] == VALUES


def test_layer_lines_with_only_the_artifact_section():
    row = {"value": "v", "op": "Conv", "node": "c", "cosine": 0.9, "snr_db": 12.345, "max_abs": 0.5}
    ok = {"layers": [{**row, "snr_db": "inf"}, {**row, "value": "w", "snr_db": 52.11}], "first_divergent": None,
          "threshold_db": 40.0, "values": 2, "total_values": 300}
    assert list(_layer_lines({"artifact": ok})) == [
        "artifact layers: 2 of 300 values agree with ONNX Runtime on the compiled graph "
        "(worst SNR 52.1 dB, 'w'; threshold 40 dB)"]
    bad = {**ok, "first_divergent": row, "build_differs": {"int8_matmuls": [3, 2]}}
    assert list(_layer_lines({"artifact": bad})) == [
        "artifact layers: first to diverge from ONNX Runtime on the compiled graph (SNR below 40 dB, 2 of 300 "
        "values compared) is Conv 'c' (value 'v': SNR 12.3 dB, cosine 0.90000, max|Δ| 0.5); the probe's build differs: "
        "int8_matmuls 2 (the artifact: 3)"]
    shape = {**row, "snr_db": "-inf", "cosine": 0.0, "max_abs": None, "mismatch": "shape [2], ONNX Runtime's [3]"}
    assert list(_layer_lines({"artifact": {**ok, "first_divergent": shape}}))[0].endswith(
        "is Conv 'c' (value 'v': shape [2], ONNX Runtime's [3])")
    skipped = {"layers": [], "first_divergent": None, "threshold_db": 40.0, "skipped": "could not compile: boom"}
    assert list(_layer_lines({"artifact": skipped})) == ["artifact layers: not compared (could not compile: boom)"]
    assert list(_layer_lines({})) == [] and list(_layer_lines(None)) == []


@pytest.mark.parametrize("stage", ["compile", "run"])
def test_a_probe_that_fails_leaves_the_run_successful(stage, tmp_path, monkeypatch, capsys, mlp_path):
    if stage == "compile":
        def fail(graph):
            raise RuntimeError("probe build exploded\nsecond line")

        monkeypatch.setattr(api, "_build_artifact", _probe_built_from(fail))
    else:
        import graphopt.accuracy

        def fail(*a, **k):
            raise RuntimeError("probe run exploded")

        monkeypatch.setattr(graphopt.accuracy, "compare_artifact_layers", fail)
    report = tmp_path / "r.json"
    code = run_cli("lower", mlp_path, "-o", tmp_path / "art", "--verify", "--verify-layers", "--report", report)
    out = capsys.readouterr().out
    assert code == 0, out
    doc = json.loads(report.read_text())
    assert doc["ok"] is True and doc["verification"]["ok"] is True
    art = doc["layers"]["artifact"]
    what = ("compile the graph with its intermediate values as outputs: probe build exploded" if stage == "compile"
            else "run the compiled graph with its intermediate values as outputs: probe run exploded")
    assert art["skipped"] == f"could not {what}" and art["layers"] == [] and art["first_divergent"] is None
    assert f"artifact layers: not compared (could not {what})" in out
    assert doc["layers"]["layers"]  # the graph-vs-float section is unaffected
    assert not (tmp_path / "art" / api.PROBE_DIR).exists()
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == ["main.so", "manifest.json", "model.onnx",
                                                                   "weights.bin"]
