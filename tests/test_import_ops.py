"""How graphs reach TVM: graphopt's Gather and Clip converters and the cap on fused kernel size.

Both came from tashkeel (an unrolled bi-GRU): its per-step Gathers with
constant indices cost minutes in Relax's FoldConstant, and one kernel fusing a
hundred-odd ops took LLVM minutes to compile. The properties tested here are
the general ones: constant-index Gathers import as one ``take``; a runtime
index never reads outside the table; no fused kernel exceeds the cap.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.graph import Graph

from .conftest import init, make_model, ort_run, vi


def _gather_graph(indices_input: bool):
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    if indices_input:
        nodes = [helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)]
        inputs = [vi("ids", [3], TensorProto.INT64)]
        inits = [init("table", table)]
        outputs = [vi("y", [3, 4])]
    else:
        # x[5, 4]: rows 2 and -1 (the last), and column 1 of x: constant indices, runtime data
        nodes = [helper.make_node("Gather", ["x", "i2"], ["a"], axis=0),
                 helper.make_node("Gather", ["x", "im1"], ["b"], axis=0),
                 helper.make_node("Gather", ["x", "i1"], ["c"], axis=-1)]
        inputs = [vi("x", [5, 4])]
        inits = [init("i2", np.array(2, np.int64)), init("im1", np.array(-1, np.int64)),
                 init("i1", np.array([1], np.int64))]
        outputs = [vi("a", [4]), vi("b", [4]), vi("c", [5, 1])]
    return Graph(make_model(nodes, inputs, outputs, inits))


def test_constant_index_gathers_import_as_one_take_each_and_match_onnx_runtime(tmp_path):
    from graphopt.relax import import_graph

    g = _gather_graph(indices_input=False)
    text = import_graph(g, []).script()
    assert text.count("R.take(") == 3
    for generic in ("R.less(", "R.where(", "R.shape_to_tensor(", "R.shape_of("):  # the importer's index normalization
        assert generic not in text, generic
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    art = graphopt.load(graphopt.lower(g, "cpu", tmp_path / "a").artifact)
    got = art.run({"x": x})
    want = ort_run(g, {"x": x})
    for k, w in zip(("a", "b", "c"), want):
        np.testing.assert_array_equal(got[k], w)


def test_runtime_index_out_of_range_is_clamped_never_read_outside_the_table(tmp_path):
    g = _gather_graph(indices_input=True)
    art = graphopt.load(graphopt.lower(g, "cpu", tmp_path / "a", verify=True).artifact)
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    ok = art.run({"ids": np.array([0, 3, -1], np.int64)})["y"]
    np.testing.assert_array_equal(ok, table[[0, 3, 9]])  # in range, negative counted from the end
    # ONNX Runtime refuses these; a kernel cannot raise, so the index is clamped to the table.
    bad = art.run({"ids": np.array([10 ** 12, -10 ** 12, 10], np.int64)})["y"]
    np.testing.assert_array_equal(bad, table[[9, 0, 9]])


def test_no_fused_kernel_exceeds_the_cap():
    """80 element-wise ops in a chain fuse into several kernels of at most MAX_FUSED_OPS ops each."""
    import tvm

    from graphopt.targets.cpu import MAX_FUSED_OPS, host_cpu, llvm_target, pass_config
    from graphopt.relax import import_graph
    from graphopt.targets.schedules.report import fused_module

    n = 80
    nodes, prev = [], "x"
    for i in range(n):
        op = ("Add", "Mul")[i % 2]
        nodes.append(helper.make_node(op, [prev, f"c{i}"], [f"t{i}"]))
        prev = f"t{i}"
    inits = [init(f"c{i}", np.full((1, 8), 1.0 + i / 100, np.float32)) for i in range(n)]
    g = Graph(make_model(nodes, [vi("x", [4, 8])], [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [4, 8])],
                         inits))
    target = llvm_target(host_cpu(), 1)

    def sizes(config):
        with tvm.transform.PassContext(opt_level=3, config=config):
            mod = fused_module(import_graph(g, []), target)
        return [gv.name_hint.count("_") for gv, f in mod.functions_items()  # fused_add_multiply_add...: ops + 0
                if isinstance(f, tvm.tirx.PrimFunc)]

    capped = sizes(pass_config())
    assert max(capped) <= MAX_FUSED_OPS and len(capped) >= n // MAX_FUSED_OPS
    assert max(sizes({})) > MAX_FUSED_OPS  # TVM's default would make one kernel of them all


@pytest.mark.parametrize("opset,inputs,attrs", [
    (17, ["x", "lo", "hi"], {}),
    (17, ["x", "", "hi"], {}),          # no lower bound
    (17, ["x", "nan"], {}),             # a NaN bound is no bound (ONNX Runtime)
    (17, ["x", "ninf", "inf"], {}),     # infinite bounds: identity
    (17, ["x", "lo", "y0"], {}),        # a runtime bound: TVM's own converter
    (10, ["x"], {"min": -1.0}),         # opsets 1-10: bounds as attributes
])
def test_clip_converter_matches_onnxruntime(tmp_path, opset, inputs, attrs):
    """graphopt's Clip converter (constant float bounds -> Relax ``clip``), on a graph with no conv:
    every bound form gives ONNX Runtime's values exactly."""
    nodes = [helper.make_node("Clip", inputs, ["y"], **attrs)]
    graph_inputs = [vi("x", ["N", 7])] + ([vi("y0", [])] if "y0" in inputs else [])
    inits = [init(n, np.array(v, np.float32)) for n, v in
             (("lo", -0.5), ("hi", 0.7), ("nan", np.nan), ("ninf", -np.inf), ("inf", np.inf))]
    model = make_model(nodes, graph_inputs, [vi("y", ["N", 7])], inits, opset=opset)
    graphopt.lower(Graph(model), "cpu", tmp_path / "a")
    feed = {"x": (np.random.default_rng(0).standard_normal((3, 7)) * 3).astype(np.float32)}
    if "y0" in inputs:
        feed["y0"] = np.array(1.5, np.float32)
    np.testing.assert_array_equal(graphopt.load(tmp_path / "a").run(feed)["y"], ort_run(Graph(model), feed)[0])
