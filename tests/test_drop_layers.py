"""distill(method=drop-layers,count=K): which blocks are residual, the choice, the refit, refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import graphopt
from graphopt.data import DataSource
from graphopt.ir import IR
from graphopt.passes._drop_layers import residual_blocks

from .conftest import make_model, ort_run, run_cli, vi


def _resnet(blocks=3, c=8, seed=0, scales=(1.0, 0.05, 0.5)):
    """x -> Gemm -> [h + branch_i(h)] * blocks -> Gemm -> y, each branch MatMul -> Relu -> MatMul scaled by
    ``scales[i]`` (the second block matters least); a side Add of two graph inputs is not a block."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def w(name, shape, scale=0.4):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    nodes.append(helper.make_node("Gemm", ["x", w("w_in", (6, c)), w("b_in", (c,))], ["h0"], name="stem"))
    h = "h0"
    for i in range(blocks):
        nodes += [helper.make_node("MatMul", [h, w(f"w{i}a", (c, c))], [f"a{i}"], name=f"b{i}_fc1"),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"b{i}_relu"),
                  helper.make_node("MatMul", [f"r{i}", w(f"w{i}b", (c, c), 0.4 * scales[i])], [f"o{i}"],
                                   name=f"b{i}_fc2"),
                  helper.make_node("Add", [h, f"o{i}"], [f"h{i + 1}"], name=f"b{i}_add")]
        h = f"h{i + 1}"
    nodes.append(helper.make_node("Gemm", [h, w("w_out", (c, 4)), w("b_out", (4,))], ["y0"], name="head"))
    nodes.append(helper.make_node("Add", ["y0", "z"], ["y"], name="side_add"))
    g = graphopt.Graph(make_model(nodes, [vi("x", ["n", 6]), vi("z", ["n", 4])], [vi("y", ["n", 4])], inits))
    feeds = [{"x": rng.standard_normal((32, 6)).astype(np.float32), "z": np.zeros((32, 4), np.float32)}
             for _ in range(4)]
    return g, feeds


def test_residual_blocks_are_found_and_nothing_else():
    g, _ = _resnet()
    blocks = residual_blocks(IR(g).g, g.infer_shapes().value_specs())
    assert [b[0] for b in blocks] == ["b0_add", "b1_add", "b2_add"]
    assert all(b[1] == 0 and sorted(b[2]) == sorted([f"{b[0][:2]}_fc1", f"{b[0][:2]}_relu", f"{b[0][:2]}_fc2"])
               for b in blocks)


def test_broadcasting_and_integer_adds_are_not_blocks():
    """An Add that broadcasts its skip ([n, 1] + [n, 8]) or adds integers (shape arithmetic) is no residual
    block: without the branch the model would change shape."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((1, 8)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([8], np.int64), "eight")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["b"], name="narrow"),
             helper.make_node("MatMul", ["b", "w2"], ["c"], name="wide"),
             helper.make_node("Add", ["b", "c"], ["y"], name="bcast_add"),
             helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Add", ["s", "eight"], ["s8"], name="int_add"),
             helper.make_node("Reshape", ["y", "s8"], ["z"], name="reshape")]
    g = graphopt.Graph(make_model(nodes, [vi("x", [4, 8])], [vi("z", None)], inits))
    assert residual_blocks(IR(g).g, g.infer_shapes().value_specs()) == []


def test_the_block_that_matters_least_goes_and_the_head_is_refit():
    g, feeds = _resnet()
    res = graphopt.optimize(g, "distill(method=drop-layers,count=1)", data=DataSource(feeds=feeds))
    det = res.records[0].details
    assert list(det["dropped"]) == ["b1_add"]
    assert det["refit"] == ["b2_fc1", "head"]  # the layers first reached after the dropped block
    assert det["output_error"]["refit"] <= det["output_error"]["dropped"]
    out = res.graph
    onnx.checker.check_model(out.model, full_check=True)
    names = {n.name for n in out.graph.node}
    assert not names & {"b1_fc1", "b1_relu", "b1_fc2"} and "b0_fc1" in names
    y = ort_run(out, feeds[0])[0]
    assert y.shape == (32, 4)


def test_refit_lowers_the_output_error():
    g, feeds = _resnet(scales=(1.0, 1.0, 1.0))
    res = graphopt.optimize(g, "distill(method=drop-layers,count=2)", data=DataSource(feeds=feeds))
    det = res.records[0].details
    assert len(det["dropped"]) == 2 and det["refit"]
    assert det["output_error"]["refit"] < 0.9 * det["output_error"]["dropped"], det["output_error"]


def test_deterministic_and_input_untouched():
    g, feeds = _resnet()
    before = g.to_bytes()
    a = graphopt.optimize(g, "distill(method=drop-layers,count=2)", data=DataSource(feeds=feeds)).graph
    b = graphopt.optimize(g, "distill(method=drop-layers,count=2)", data=DataSource(feeds=feeds)).graph
    assert a.to_bytes() == b.to_bytes() and g.to_bytes() == before


@pytest.mark.torch
def test_torch_resnet_block_drop_lowers_and_verifies(torch_models, tmp_path):
    mod, ex = torch_models["cnn"]
    g = graphopt.capture(mod, ex)
    rng = np.random.default_rng(0)
    feeds = [{g.inputs[0].name: rng.standard_normal(tuple(ex[0].shape)).astype(np.float32)} for _ in range(2)]
    res = graphopt.optimize(g, "distill(method=drop-layers,count=1)", data=DataSource(feeds=feeds))
    assert len(res.graph.graph.node) < len(g.graph.node)
    art = graphopt.lower(res.graph, "cpu", tmp_path / "art", verify=True)
    assert (tmp_path / "art" / "manifest.json").exists() and art is not None


@pytest.mark.parametrize("model,passes,message", [
    ("res", "distill(method=drop-layers)", "method=drop-layers needs option 'count'"),
    ("res", "distill(method=drop-layers,count=0)", "method=drop-layers needs option 'count'"),
    ("res", "distill(method=drop-layers,count=1,ratio=0.3)", "option 'ratio' applies to method=low-rank"),
    ("res", "distill(ratio=0.3,count=1)", "option 'count' applies to method=drop-layers"),
    ("res", "distill(method=drop-layers,count=4)", "count=4 is more than the 3 residual block(s)"),
    ("plain", "distill(method=drop-layers,count=1)", "has no residual block"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, model, passes, message):
    if model == "res":
        g, feeds = _resnet()
    else:
        w = numpy_helper.from_array(np.ones((6, 4), np.float32), "w")
        g = graphopt.Graph(make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                                      [vi("x", ["n", 6])], [vi("y", ["n", 4])], [w]))
        feeds = [{"x": np.ones((2, 6), np.float32)}]
    g.save(tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", **feeds[0])
    code = run_cli("optimize", tmp_path / "m.onnx", "--passes", passes, "--data", tmp_path / "calib.npz",
                   "-o", tmp_path / "out.onnx")
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "out.onnx").exists()
