"""Loading, validating and saving Graphs: bad files fail cleanly, external data stays inside the folder."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import graphopt
from graphopt.errors import ModelError, OptionError
from graphopt.graph import parse_input_shapes

from .conftest import init, make_model, vi


def test_load_reports_inputs_outputs(mlp_onnx):
    g = graphopt.Graph.load(mlp_onnx)
    assert [(s.name, s.dtype, s.shape) for s in g.inputs] == [("x", "float32", (1, 8))]
    assert [s.name for s in g.outputs] == ["y"]
    assert g.opset == 17


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        (b"", "file is empty"),
        (b"\x08\x07\x12\xff\xff\xff\xff\x0fgarbage", "not a valid ONNX model"),
    ],
)
def test_bad_files_raise_model_error(tmp_path, content, message):
    p = tmp_path / "bad.onnx"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(ModelError, match=message) as e:
        graphopt.Graph.load(p)
    assert str(p) in str(e.value)


def test_truncated_model(tmp_path, mlp_onnx):
    data = mlp_onnx.read_bytes()
    p = tmp_path / "truncated.onnx"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated|invalid|not a valid"):
        graphopt.Graph.load(p)


def _external_model(tmp_path, location, length=None):
    w = np.arange(16, dtype=np.float32)
    t = init("w", w)
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(length or w.nbytes))):
        e = t.external_data.add()
        e.key, e.value = k, v
    m = make_model([helper.make_node("Add", ["x", "w"], ["y"])], [vi("x", [16])], [vi("y", [16])], [t])
    sub = tmp_path / "model"
    sub.mkdir(exist_ok=True)
    (tmp_path / "secret.bin").write_bytes(w.tobytes())
    (sub / "weights.bin").write_bytes(w.tobytes())
    p = sub / "model.onnx"
    p.write_bytes(m.SerializeToString())
    return p


def test_external_data_inside_folder_loads(tmp_path):
    g = graphopt.Graph.load(_external_model(tmp_path, "weights.bin"))
    np.testing.assert_array_equal(g.array("w"), np.arange(16, dtype=np.float32))


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd"])
def test_external_data_escaping_folder_is_refused(tmp_path, location):
    with pytest.raises(ModelError, match="outside the model's folder"):
        graphopt.Graph.load(_external_model(tmp_path, location))


def test_external_data_symlink_is_refused(tmp_path):
    p = _external_model(tmp_path, "link.bin")
    (p.parent / "link.bin").symlink_to(tmp_path / "secret.bin")
    with pytest.raises(ModelError, match="link or resolves outside"):
        graphopt.Graph.load(p)


def test_external_data_out_of_range_is_refused(tmp_path):
    with pytest.raises(ModelError, match="outside 'weights.bin'"):
        graphopt.Graph.load(_external_model(tmp_path, "weights.bin", length=1 << 20))


def test_with_input_shapes_fixes_symbolic_dims(tmp_path):
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", ["N", 3])], [vi("y", ["N", 3])])
    g = graphopt.Graph(m).with_input_shapes({"x": [4, 3]})
    assert g.inputs[0].shape == (4, 3)
    assert g.outputs[0].shape == (4, 3)
    with pytest.raises(OptionError, match="no input 'nope'.*inputs: x"):
        graphopt.Graph(m).with_input_shapes({"nope": [1]})
    with pytest.raises(OptionError, match="rank 2"):
        graphopt.Graph(m).with_input_shapes({"x": [1, 3, 3]})
    with pytest.raises(OptionError, match="fixed to 3"):
        graphopt.Graph(m).with_input_shapes({"x": [1, 4]})


def test_parse_input_shapes():
    assert parse_input_shapes(["x:1,3,320,320", "a:b:2"]) == {"x": [1, 3, 320, 320], "a:b": [2]}
    with pytest.raises(OptionError, match="NAME:D1"):
        parse_input_shapes(["x"])
    with pytest.raises(OptionError, match="integers"):
        parse_input_shapes(["x:1,a"])


def test_save_is_atomic_and_roundtrips(tmp_path, mlp_onnx):
    g = graphopt.Graph.load(mlp_onnx)
    out = g.save(tmp_path / "out" / "copy.onnx")
    assert sorted(p.name for p in out.parent.iterdir()) == ["copy.onnx"]
    assert graphopt.Graph.load(out).to_bytes() == g.to_bytes()


def test_inspect_counts(mlp_onnx):
    doc = graphopt.inspect_graph(graphopt.Graph.load(mlp_onnx))
    assert doc["params"] == 8 * 16 + 16 + 16 * 4
    assert doc["ops"] == {"Add": 1, "MatMul": 2, "Relu": 1}
    # 2*1*8*16 + 16 (add) + 16 (relu) + 2*1*16*4
    assert doc["flops"] == 2 * 8 * 16 + 16 + 16 + 2 * 16 * 4


def test_all_tensors_sees_every_tensor_of_a_model():
    """Initializers, sparse initializers (values + indices), Constant value/sparse_value, If bodies, functions."""
    from onnx import TensorProto

    from graphopt.graph import _all_tensors

    def t(name):
        return init(name, np.zeros(2, np.float32))

    def sparse(name):
        return helper.make_sparse_tensor(t(name), init(name + "_idx", np.array([0], np.int64)), [2])

    then_g = helper.make_graph([helper.make_node("Constant", [], ["a"], value=t("in_then"))], "then", [],
                               [vi("a", [2])], [t("then_init")])
    else_g = helper.make_graph([helper.make_node("Constant", [], ["b"], sparse_value=sparse("in_else"))], "else",
                               [], [vi("b", [2])])
    fn = helper.make_function("local", "F", ["p"], ["q"],
                              [helper.make_node("Constant", [], ["k"], value=t("in_function")),
                               helper.make_node("Add", ["p", "k"], ["q"])], [helper.make_opsetid("", 17)])
    g = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=t("const")),
         helper.make_node("If", ["cond"], ["z"], then_branch=then_g, else_branch=else_g),
         helper.make_node("F", ["c"], ["y"], domain="local")],
        "g", [vi("cond", [], TensorProto.BOOL)], [vi("y", [2]), vi("z", [2])], [t("init")],
        sparse_initializer=[sparse("sparse_init")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                          functions=[fn])
    names = sorted(x.name for x in _all_tensors(m))
    assert names == sorted(["init", "sparse_init", "sparse_init_idx", "const", "then_init", "in_then", "in_else",
                            "in_else_idx", "in_function"])
    assert sorted(x.name for x in _all_tensors(m.graph)) == sorted(set(names) - {"in_function"})
