"""Clean-up passes and the pass manager: each test builds a graph, runs a pass, checks a number."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import helper

import graphopt
from graphopt.errors import VerificationError
from graphopt.passbase import PassContext
from graphopt.plugins import Registry

from .conftest import init, make_model, ops, ort_run, vi


def shape_chain_model():
    """x[N,3,4,4] -> Shape -> Gather(0) -> Concat([n, -1]) -> Reshape: the pattern real exporters emit."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0, name="gather"),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"], name="unsq"),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0, name="concat"),
        helper.make_node("Reshape", ["x", "target"], ["flat"], name="reshape"),
        helper.make_node("MatMul", ["flat", "w"], ["y"], name="mm"),
    ]
    w = np.random.default_rng(1).standard_normal((48, 5)).astype(np.float32)
    return make_model(nodes, [vi("x", ["N", 3, 4, 4])], [vi("y", ["N", 5])],
                      [init("zero", np.array(0, np.int64)), init("axes", np.array([0], np.int64)),
                       init("minus1", np.array([-1], np.int64)), init("w", w)])


def test_fold_constants_folds_shape_arithmetic_once_dims_are_fixed():
    g = graphopt.Graph(shape_chain_model())
    res = graphopt.optimize(g, "fold-constants", input_shapes={"x": [2, 3, 4, 4]})
    assert ops(res.graph) == ["Reshape", "MatMul"]
    target = next(n for n in res.graph.graph.node if n.op_type == "Reshape").input[1]
    np.testing.assert_array_equal(res.graph.array(target), [2, -1])
    rec = res.records[0]
    assert rec.details["folded_nodes"] == 4
    assert rec.verification["max_abs"] == 0.0 and rec.verification["ok"]


def test_fold_constants_leaves_symbolic_shapes_alone():
    res = graphopt.optimize(graphopt.Graph(shape_chain_model()), "fold-constants")
    assert "Shape" in ops(res.graph)


def test_fold_constants_respects_size_cap():
    """A 2 MiB folded result (a transposed weight) is left alone under a 1 MiB cap and folded under 4 MiB."""
    w = np.random.default_rng(0).standard_normal((1024, 512)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["w"], ["big"], perm=[1, 0], name="t"),
             helper.make_node("MatMul", ["x", "big"], ["y"])]
    m = make_model(nodes, [vi("x", [1, 1024])], [vi("y", [1, 512])], [init("w", w)])
    res = graphopt.optimize(graphopt.Graph(m), "fold-constants(max_mb=1)")
    assert "Transpose" in ops(res.graph)
    assert res.records[0].details["left_unfolded_too_large"] == ["big"]
    res = graphopt.optimize(graphopt.Graph(m), "fold-constants(max_mb=4)")
    assert "Transpose" not in ops(res.graph)
    np.testing.assert_array_equal(res.graph.array("big"), w.T)


def test_eliminate_identity_keeps_input_to_output_copy():
    nodes = [helper.make_node("Identity", ["x"], ["a"], name="id1"),
             helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("Identity", ["b"], ["y"], name="id_out"),
             helper.make_node("Identity", ["x"], ["z"], name="passthrough")]
    m = make_model(nodes, [vi("x", [4])], [vi("y", [4]), vi("z", [4])])
    res = graphopt.optimize(graphopt.Graph(m), "eliminate-identity")
    assert ops(res.graph) == ["Relu", "Identity"]
    assert [n.name for n in res.graph.graph.node] == ["relu", "passthrough"]
    assert res.graph.graph.node[0].output[0] == "y"  # the graph output keeps its name
    assert res.records[0].details["removed_nodes"] == 2


def test_eliminate_dead_removes_unused_nodes_and_weights():
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("MatMul", ["x", "w"], ["unused"])]
    m = make_model(nodes, [vi("x", [1, 4])], [vi("y", [1, 4])], [init("w", np.ones((4, 4), np.float32))])
    res = graphopt.optimize(graphopt.Graph(m), "eliminate-dead")
    assert ops(res.graph) == ["Relu"] and len(res.graph.graph.initializer) == 0
    assert res.records[0].after["bytes"] < res.records[0].before["bytes"]


def test_dedup_initializers_merges_identical_weights():
    w = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("MatMul", ["a", "w2"], ["y"])]
    m = make_model(nodes, [vi("x", [1, 16])], [vi("y", [1, 16])], [init("w1", w), init("w2", w.copy())])
    res = graphopt.optimize(graphopt.Graph(m), "dedup-initializers")
    assert [t.name for t in res.graph.graph.initializer] == ["w1"]
    assert res.records[0].details["merged_initializers"] == 1
    assert res.records[0].details["bytes_saved"] == w.nbytes


def bn_model():
    rng = np.random.default_rng(0)
    c = 4

    def bn(prefix, n):
        return [init(f"{prefix}_g", rng.uniform(0.5, 1.5, n).astype(np.float32)),
                init(f"{prefix}_b", rng.uniform(-1, 1, n).astype(np.float32)),
                init(f"{prefix}_m", rng.uniform(-1, 1, n).astype(np.float32)),
                init(f"{prefix}_v", rng.uniform(0.5, 2, n).astype(np.float32))]

    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "bn1_g", "bn1_b", "bn1_m", "bn1_v"], ["c2"], epsilon=1e-3, name="bn1"),
        helper.make_node("Relu", ["c2"], ["r"], name="relu"),
        helper.make_node("BatchNormalization", ["r", "bn3_g", "bn3_b", "bn3_m", "bn3_v"], ["r2"], name="bn_after_relu"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "gw"], ["gout"], transB=1, alpha=0.5, name="gemm"),
        helper.make_node("BatchNormalization", ["gout", "bn2_g", "bn2_b", "bn2_m", "bn2_v"], ["y"], name="bn2"),
    ]
    inits = [init("cw", rng.standard_normal((c, 3, 3, 3)).astype(np.float32)),
             init("cb", rng.standard_normal(c).astype(np.float32)),
             init("gw", rng.standard_normal((6, c * 8 * 8)).astype(np.float32))]
    inits += bn("bn1", c) + bn("bn3", c) + bn("bn2", 6)
    return make_model(nodes, [vi("x", [2, 3, 8, 8])], [vi("y", [2, 6])], inits)


def test_fold_batchnorm_into_conv_and_gemm():
    g = graphopt.Graph(bn_model())
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    res = graphopt.optimize(g, "fold-batchnorm")
    assert ops(res.graph).count("BatchNormalization") == 1  # the one after Relu cannot fold
    rec = res.records[0]
    assert rec.details["folded"] == 2
    assert "Relu" in rec.details["not_folded"]["bn_after_relu"]
    np.testing.assert_allclose(ort_run(res.graph, {"x": x})[0], ort_run(g, {"x": x})[0], rtol=1e-4, atol=1e-5)
    assert rec.verification["ok"]


def test_cleanup_records_substeps_and_reports_json(tmp_path):
    g = graphopt.Graph(shape_chain_model())
    report = tmp_path / "report.json"
    res = graphopt.optimize(g, "cleanup", input_shapes={"x": [1, 3, 4, 4]}, report=report,
                            dump_after=["cleanup"], dump_dir=tmp_path)
    doc = json.loads(report.read_text())
    assert doc["pipeline"] == "cleanup"
    assert doc["passes"][0]["details"]["fold-constants.folded_nodes"] == 4
    assert doc["passes"][0]["verification"]["ok"] is True
    assert doc["after"]["nodes"] == 2 and doc["before"]["nodes"] == 6
    assert (tmp_path / "01-cleanup.onnx").is_file()
    assert res.graph.to_bytes() == graphopt.Graph.load(tmp_path / "01-cleanup.onnx").to_bytes()


class _BreaksOutputs(graphopt.Pass):
    """Claims to be lossless but negates the first initializer."""

    name = "liar"
    lossless = True

    def run(self, graph, ctx):
        t = graph.graph.initializer[0]
        from onnx import numpy_helper

        t.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(t), t.name))
        return graph


class _Lossy(_BreaksOutputs):
    """The same change, declared lossy."""

    name = "lossy-liar"
    lossless = False


def _registry_with(*classes):
    reg = Registry()
    reg.load_entry_points()

    class Plugin:
        @graphopt.hookimpl
        def graphopt_register_passes(self):
            return list(classes)

    reg.register(Plugin(), "test-plugin")
    return reg


def test_lossless_pass_that_changes_outputs_is_caught(mlp_onnx):
    reg = _registry_with(_BreaksOutputs, _Lossy)
    with pytest.raises(VerificationError, match="lossless pass 'liar' changed the model's outputs"):
        graphopt.optimize(mlp_onnx, "liar", registry=reg)
    res = graphopt.optimize(mlp_onnx, "lossy-liar", registry=reg)
    v = res.records[0].verification
    assert not v["ok"] and v["cosine"] < 0.99 and v["max_abs"] > 0.1


def test_pass_input_graph_is_never_modified(mlp_onnx):
    reg = _registry_with(_Lossy)
    g = graphopt.Graph.load(mlp_onnx)
    before = g.to_bytes()
    graphopt.optimize(g, "lossy-liar", registry=reg)
    assert g.to_bytes() == before


def test_pass_context_generates_seeded_data(mlp_onnx):
    g = graphopt.Graph.load(mlp_onnx)
    a = PassContext().data.samples(g)
    b = PassContext().data.samples(g)
    np.testing.assert_array_equal(a[0]["x"], b[0]["x"])


def test_wrong_artifact_from_an_unchecked_lying_pass_is_caught_by_verify(tmp_path, mlp_onnx, monkeypatch, capsys):
    """Pass checks off, a 'lossless' pass perturbs a weight: the artifact is genuinely wrong, and
    `lower --verify` (artifact vs ONNX Runtime on the *input* model) catches it: exit 1, no artifact."""
    from graphopt import cli, plugins

    reg = _registry_with(_BreaksOutputs)
    with pytest.raises(VerificationError, match="lowered artifact does not match ONNX Runtime") as e:
        graphopt.lower(mlp_onnx, "cpu", tmp_path / "api", pipeline="liar", registry=reg,
                       verify=True, verify_passes=False)
    assert e.value.exit_code == 1 and not (tmp_path / "api").exists()
    # The same through the command line, with the pass provided by a registered plugin.
    monkeypatch.setattr(plugins, "_REGISTRY", reg)
    monkeypatch.setattr(plugins, "get_registry", lambda *a, **k: reg)
    monkeypatch.setattr(cli, "get_registry", lambda *a, **k: reg, raising=False)
    code = cli.main(["lower", str(mlp_onnx), "-o", str(tmp_path / "cli"), "--passes", "liar",
                     "--no-verify-passes", "--verify", "-q"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "does not match ONNX Runtime" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cli").exists()


def test_nan_outputs_in_the_same_places_verify(tmp_path):
    """A model whose outputs are NaN on some inputs (log of a negative) still verifies a lossless pass.

    Generated inputs made tashkeel's logits NaN; identical NaNs failed the
    comparison, so every lossless pass on that model was reported as breaking it.
    """
    from graphopt.reference import compare_outputs

    nodes = [helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Log", ["i"], ["y"])]
    m = make_model(nodes, [vi("x", [1, 4])], [vi("y", [1, 4])])
    path = tmp_path / "m.onnx"
    path.write_bytes(m.SerializeToString())
    res = graphopt.optimize(path, "eliminate-identity", data=None)
    assert res.records[0].verification["ok"] and "Identity" not in ops(res.graph)

    ref = [[np.array([np.nan, 1.0, -np.inf], np.float32)]]
    assert compare_outputs(ref, [[np.array([np.nan, 1.0, -np.inf], np.float32)]], ["y"]).ok
    assert not compare_outputs(ref, [[np.array([0.0, 1.0, -np.inf], np.float32)]], ["y"]).ok
    assert not compare_outputs(ref, [[np.array([np.nan, np.nan, -np.inf], np.float32)]], ["y"]).ok


def test_an_invalid_in_memory_graph_is_blamed_on_the_input_not_the_first_pass():
    """Graph.load checks files; a Graph built in memory is checked before the first pass runs."""
    from onnx import TensorProto

    m = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [vi("x", [2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])  # an output type without a shape
    g = graphopt.Graph(m, "in-memory.onnx")
    with pytest.raises(graphopt.ModelError, match="in-memory.onnx: invalid ONNX model"):
        graphopt.optimize(g, "cleanup")
