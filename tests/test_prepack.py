"""Prepacked weights: weight-only computations run once at lower time; the artifact stores their results."""

import json

import numpy as np
import onnx
import pytest
from onnx import helper

import graphopt
from graphopt.artifact import program_weights
from graphopt.errors import ArtifactError
from graphopt.graph import Graph
from tests.conftest import init, make_model, ort_run, vi

RNG = np.random.default_rng(0)


def _gemm_model(tmp_path):
    w = RNG.standard_normal((16, 32)).astype(np.float32)
    b = RNG.standard_normal(16).astype(np.float32)
    w2 = RNG.standard_normal((8, 16)).astype(np.float32)
    m = make_model([helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1),
                    helper.make_node("Relu", ["y"], ["r"]),
                    helper.make_node("Gemm", ["r", "W2"], ["z"], transB=1)],
                   [vi("x", ["N", 32])], [vi("z", ["N", 8])], [init("W", w), init("b", b), init("W2", w2)])
    p = tmp_path / "gemm.onnx"
    onnx.save(m, p)
    return p, m


def test_transposed_weights_are_packed_at_lower_time(tmp_path):
    path, model = _gemm_model(tmp_path)
    res = graphopt.lower(str(path), "cpu", tmp_path / "art", verify=True)
    man = res.manifest
    names = [w["name"] for w in man["weights"]]
    # The originals stay (model.onnx reads them), the transposed copies follow, and main takes the copies.
    assert names[:3] == ["W", "b", "W2"]
    packed = [w for w in man["weights"] if w["name"].startswith("main.packed.")]
    assert sorted(tuple(w["shape"]) for w in packed) == [(16, 8), (32, 16)]
    params = man["programs"][0]["params"]
    assert [man["weights"][i]["name"] for i in params if not man["weights"][i]["name"].startswith("main.packed.")] == ["b"]
    assert len(params) == 3
    art = graphopt.load(tmp_path / "art")
    x = RNG.standard_normal((5, 32)).astype(np.float32)  # another batch size than verify used
    got = art.run({"x": x})["z"]
    np.testing.assert_allclose(got, ort_run(Graph(model), {"x": x})[0], rtol=1e-5, atol=1e-5)
    # The reference graph in the artifact still reads the original weights.
    ref = art.reference_graph()
    np.testing.assert_allclose(ort_run(ref, {"x": x})[0], got, rtol=1e-5, atol=1e-5)


def test_weight_transforms_that_grow_the_weights_stay_in_the_program(tmp_path):
    # Expand(W) makes a 64x bigger tensor from weights alone: storing it would inflate the artifact.
    w = RNG.standard_normal((1, 256)).astype(np.float32)
    shape = np.array([64, 256], np.int64)
    m = make_model([helper.make_node("Expand", ["W", "s"], ["e"]), helper.make_node("Add", ["x", "e"], ["y"])],
                   [vi("x", [64, 256])], [vi("y", [64, 256])], [init("W", w), init("s", shape)])
    p = tmp_path / "expand.onnx"
    onnx.save(m, p)
    res = graphopt.lower(str(p), "cpu", tmp_path / "art", verify=True)
    assert not any(e["name"].startswith("main.packed.") for e in res.manifest["weights"])
    assert "not lifted" in res.native_log


def test_params_index_is_checked_when_loading(tmp_path):
    path, _ = _gemm_model(tmp_path)
    graphopt.lower(str(path), "cpu", tmp_path / "art")
    mpath = tmp_path / "art" / "manifest.json"
    doc = json.loads(mpath.read_text())
    doc["programs"][0]["params"] = [0, 99]
    mpath.write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match=r"params holds 99"):
        graphopt.load(tmp_path / "art")


def test_programs_without_params_take_every_weight_in_order():
    # Artifacts written before prepacking have no "params": their program takes all weights.
    weights = ["a", "b", "c"]
    assert program_weights({}, {"name": "main"}, weights) == weights
    assert program_weights({}, {"name": "main", "params": [2, 0]}, weights) == ["c", "a"]


def test_weight_transform_through_a_function_of_the_module_is_packed(tmp_path):
    # The importer emits Einsum as a TE kernel (a function of the module), which the lifted transform calls.
    w = RNG.standard_normal((16, 32)).astype(np.float32)
    m = make_model([helper.make_node("Einsum", ["W"], ["Wt"], equation="ij->ji"),
                    helper.make_node("MatMul", ["x", "Wt"], ["y"])],
                   [vi("x", [3, 32])], [vi("y", [3, 16])], [init("W", w)], opset=17)
    onnx.save(m, tmp_path / "einsum.onnx")
    # (no fold-constants: it would fold the weight-only Einsum in the graph already)
    res = graphopt.lower(str(tmp_path / "einsum.onnx"), "cpu", tmp_path / "art", pipeline="eliminate-identity",
                         verify=True)
    assert any(e["name"].startswith("main.packed.") for e in res.manifest["weights"])


def test_zero_dim_weight_transform_results_keep_their_rank(tmp_path):
    """A weight-only computation whose result is a scalar (0-d) is stored and passed as a scalar.

    The Relax importer normalizes a Gather's negative indices with the table's
    size, ``shape_of(W)[0]``: a 0-d int64 computed from a weight alone, which the
    prepack step lifts. Stored as shape [1] (numpy's ``ascontiguousarray`` makes
    every 0-d array 1-d) the program refused it at its first call ("Mismatched
    ndim ... expected 0"): tashkeel's embeddings did exactly that.
    """
    emb = RNG.standard_normal((54, 8)).astype(np.float32)
    m = make_model([helper.make_node("Gather", ["E", "ids"], ["y"], axis=0)],
                   [vi("ids", [1, 6], onnx.TensorProto.INT64)], [vi("y", [1, 6, 8])], [init("E", emb)])
    p = tmp_path / "gather.onnx"
    onnx.save(m, p)
    res = graphopt.lower(str(p), "cpu", tmp_path / "art", verify=True)
    scalars = [w for w in res.manifest["weights"] if w["name"].startswith("main.packed.") and w["shape"] == []]
    assert scalars, "expected a lifted 0-d weight (the table size); the importer changed"
    ids = np.array([[0, 5, -1, 53, -54, 7]], dtype=np.int64)
    out = graphopt.load(tmp_path / "art").run({"ids": ids})["y"]
    np.testing.assert_array_equal(out, emb[ids])
