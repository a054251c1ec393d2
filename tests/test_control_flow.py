"""unroll-loops: Loop (constant trip count) and Scan (static length) unrolled match ONNX Runtime on the original."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.errors import LoweringError
from graphopt.graph import Graph
from graphopt.passbase import PassContext
from graphopt.passes.control_flow import UnrollLoops

from .test_recurrent import ort_run

F = TensorProto.FLOAT


def vi(name, shape, elem=F):
    return helper.make_tensor_value_info(name, elem, shape)


def model(nodes, inputs, outputs, inits=(), opset=17):
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                          opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def unroll(m, **opts) -> onnx.ModelProto:
    out = UnrollLoops(**opts).run(Graph(m), PassContext())
    out.check()
    return out.model


def ops_of(g: onnx.GraphProto) -> set[str]:
    out = set()
    for n in g.node:
        out.add(n.op_type)
        for a in n.attribute:
            if a.HasField("g"):
                out |= ops_of(a.g)
    return out


def assert_same(m, feeds, atol=1e-5, **opts):
    lowered = unroll(m, **opts)
    assert not ops_of(lowered.graph) & {"Loop", "Scan"}
    want, got = ort_run(m, feeds), ort_run(lowered, feeds)
    for k in want:
        assert got[k].shape == want[k].shape, k
        np.testing.assert_allclose(got[k], want[k], atol=atol, err_msg=k)
    return lowered


def loop_model(trip=4, cond_out="passthrough", trip_as_input=False, cond_value=True, opset=17):
    """acc += x * (i + 1) * w for i < trip; also scans out acc each step. w is read from the outer scope."""
    body_nodes = [
        helper.make_node("Cast", ["i"], ["i_f"], to=F),
        helper.make_node("Add", ["i_f", "one"], ["i1"]),
        helper.make_node("Mul", ["x", "i1"], ["xi"]),
        helper.make_node("Mul", ["xi", "w"], ["xiw"]),
        helper.make_node("Add", ["acc_in", "xiw"], ["acc_out"]),
        helper.make_node("Identity", ["acc_out"], ["scan_out"]),
    ]
    if cond_out == "passthrough":
        body_nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"]))
    else:  # early exit when acc grows past 3
        body_nodes.append(helper.make_node("ReduceSum", ["acc_out"], ["s"], keepdims=0))
        body_nodes.append(helper.make_node("Less", ["s", "three"], ["cond_out"]))
    body = helper.make_graph(
        body_nodes, "body",
        [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("acc_in", [2, 3])],
        [vi("cond_out", [], TensorProto.BOOL), vi("acc_out", [2, 3]), vi("scan_out", [2, 3])],
        [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
         numpy_helper.from_array(np.array(3.0, np.float32), "three")],
    )
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((2, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(cond_value), "cond")]
    inputs = [vi("x", [2, 3]), vi("acc0", [2, 3])]
    if trip_as_input:
        inputs.append(vi("M", [], TensorProto.INT64))
    else:
        inits.append(numpy_helper.from_array(np.array(trip, np.int64), "M"))
    m = model([helper.make_node("Loop", ["M", "cond", "acc0"], ["acc", "scans"], name="loop_0", body=body)],
              inputs, [vi("acc", [2, 3]), vi("scans", [trip, 2, 3])], inits, opset)
    feeds = {"x": rng.standard_normal((2, 3)).astype(np.float32), "acc0": rng.standard_normal((2, 3)).astype(np.float32)}
    return m, feeds


def test_loop_constant_trip_count_carried_scanned_and_outer_reads():
    m, feeds = loop_model(trip=4)
    lowered = assert_same(m, feeds)
    assert sum(n.op_type == "Mul" for n in lowered.graph.node) == 8  # two per iteration


def test_loop_old_opset_forms():
    m, feeds = loop_model(trip=3, opset=11)
    assert_same(m, feeds)


def test_loop_whose_condition_starts_false_runs_zero_times():
    m, feeds = loop_model(trip=0, cond_value=False)
    m.graph.output.pop()
    del m.graph.node[0].output[1]
    m.graph.node[0].attribute[0].g.output.pop()
    assert_same(m, feeds)


def test_loop_refusals_name_the_node():
    m, _ = loop_model(trip_as_input=True)
    with pytest.raises(LoweringError, match=r"Loop 'loop_0'.*trip count 'M' is not a constant"):
        unroll(m)
    m, _ = loop_model(cond_out="computed")
    with pytest.raises(LoweringError, match=r"Loop 'loop_0'.*early exit"):
        unroll(m)
    m, _ = loop_model(trip=50)
    with pytest.raises(LoweringError, match=r"Loop 'loop_0'.*max_iterations=10"):
        unroll(m, max_iterations=10)


def test_nested_loop_and_if_in_body():
    # Outer loop body holds an inner Loop and an If that reads a body-local value; both must survive cloning.
    inner_body = helper.make_graph(
        [helper.make_node("Add", ["a_in", "x"], ["a_out"]), helper.make_node("Identity", ["c_in"], ["c_out"])],
        "inner", [vi("j", [], TensorProto.INT64), vi("c_in", [], TensorProto.BOOL), vi("a_in", [2, 3])],
        [vi("c_out", [], TensorProto.BOOL), vi("a_out", [2, 3])])
    then = helper.make_graph([helper.make_node("Neg", ["t"], ["r1"])], "then", [], [vi("r1", [2, 3])])
    els = helper.make_graph([helper.make_node("Abs", ["t"], ["r2"])], "else", [], [vi("r2", [2, 3])])
    body = helper.make_graph(
        [helper.make_node("Loop", ["two", "", "acc_in"], ["t"], body=inner_body),
         helper.make_node("Equal", ["i", "zero"], ["is0"]),
         helper.make_node("If", ["is0"], ["acc_out"], then_branch=then, else_branch=els),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("acc_in", [2, 3])],
        [vi("cond_out", [], TensorProto.BOOL), vi("acc_out", [2, 3])],
        [numpy_helper.from_array(np.array(2, np.int64), "two"), numpy_helper.from_array(np.array(0, np.int64), "zero")])
    m = model([helper.make_node("Loop", ["M", "", "acc0"], ["acc"], name="outer", body=body)],
              [vi("x", [2, 3]), vi("acc0", [2, 3])], [vi("acc", [2, 3])],
              [numpy_helper.from_array(np.array(3, np.int64), "M")])
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((2, 3)).astype(np.float32), "acc0": rng.standard_normal((2, 3)).astype(np.float32)}
    lowered = assert_same(m, feeds)
    assert sum(n.op_type == "If" for n in lowered.graph.node) == 3


def scan_model(in_dir=0, out_dir=0, in_axis=0, out_axis=0, length=4, opset=17):
    """Running sum over x's scan axis; scans out the running sum and x*2 per step."""
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "xe"], ["s_out"]), helper.make_node("Mul", ["xe", "k"], ["ye"])],
        "body", [vi("s_in", [3]), vi("xe", [3])], [vi("s_out", [3]), vi("ye", [3])])
    x_shape = [length, 3] if in_axis in (0, -2) else [3, length]
    m = model([helper.make_node("Scan", ["s0", "x"], ["s", "ys"], name="scan_0", body=body, num_scan_inputs=1,
                                scan_input_directions=[in_dir], scan_output_directions=[out_dir],
                                scan_input_axes=[in_axis], scan_output_axes=[out_axis])],
              [vi("s0", [3]), vi("x", x_shape)], [vi("s", [3]), vi("ys", [length, 3] if out_axis in (0, -2) else [3, length])],
              [numpy_helper.from_array(np.array(2.0, np.float32), "k")], opset)
    rng = np.random.default_rng(2)
    return m, {"s0": rng.standard_normal(3).astype(np.float32), "x": rng.standard_normal(x_shape).astype(np.float32)}


@pytest.mark.parametrize("in_dir,out_dir,in_axis,out_axis", [(0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 1, 1), (1, 1, -1, -1)])
def test_scan_directions_and_axes(in_dir, out_dir, in_axis, out_axis):
    assert_same(*scan_model(in_dir, out_dir, in_axis, out_axis))


def test_scan_old_opset_and_wrong_length_caught_at_run_time():
    m, feeds = scan_model(1, 1, 0, 0, opset=11)
    lowered = assert_same(m, feeds)
    # Were the inferred length wrong, the unrolled graph must fail rather than silently drop steps:
    # declare x's length symbolic (as a wrong inference would leave it) and feed a longer x.
    lowered.graph.input[1].type.tensor_type.shape.dim[0].dim_param = "n"
    del lowered.graph.value_info[:]
    with pytest.raises(Exception, match="split"):
        ort_run(lowered, {"s0": feeds["s0"], "x": np.concatenate([feeds["x"], feeds["x"]])})


def test_scan_symbolic_length_is_refused_with_hint():
    m, _ = scan_model()
    m.graph.input[1].type.tensor_type.shape.dim[0].dim_param = "n"
    with pytest.raises(LoweringError, match=r"Scan 'scan_0'.*--input-shape"):
        unroll(m)


def test_no_loops_is_a_cheap_no_op(mlp_onnx):
    g = Graph.load(mlp_onnx)
    assert UnrollLoops().run(g, PassContext()) is g


def test_loop_lowers_through_tvm_and_verifies(tmp_path):
    m, feeds = loop_model(trip=3)
    src = tmp_path / "loop.onnx"
    onnx.save(m, src)
    np.savez(tmp_path / "x.npz", **feeds)
    res = graphopt.lower(src, "cpu", tmp_path / "art", verify=True, data=graphopt.DataSource(tmp_path / "x.npz"))
    assert res.verification.ok


def test_unrolled_bodies_keep_reading_outer_values_as_the_same_tensors():
    """An If in a Loop body reads x2, computed in the main graph: the If's copies must read that very tensor.

    gs's Graph.copy turns an outer value missing from its tensor map into a
    detached tensor of the same name; the ONNX export still resolves it, but
    graphopt.ir's liveness, outer reads and toposort work by identity, so a
    later step on the same IR (here eliminate-dead) would drop x2's producer.
    """
    from graphopt.ir import IR, live_nodes
    from graphopt.passes.eliminate_dead import eliminate_dead

    then = helper.make_graph([helper.make_node("Add", ["acc_in", "x2"], ["r1"])], "then", [], [vi("r1", [2, 3])])
    els = helper.make_graph([helper.make_node("Sub", ["acc_in", "x2"], ["r2"])], "else", [], [vi("r2", [2, 3])])
    body = helper.make_graph(
        [helper.make_node("Equal", ["i", "zero"], ["is0"]),
         helper.make_node("If", ["is0"], ["acc_out"], then_branch=then, else_branch=els),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("acc_in", [2, 3])],
        [vi("cond_out", [], TensorProto.BOOL), vi("acc_out", [2, 3])],
        [numpy_helper.from_array(np.array(0, np.int64), "zero")])
    m = model([helper.make_node("Mul", ["x", "x"], ["x2"], name="square"),
               helper.make_node("Loop", ["M", "", "acc0"], ["acc"], name="loop_0", body=body)],
              [vi("x", [2, 3]), vi("acc0", [2, 3])], [vi("acc", [2, 3])],
              [numpy_helper.from_array(np.array(3, np.int64), "M")])
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((2, 3)).astype(np.float32),
             "acc0": rng.standard_normal((2, 3)).astype(np.float32)}

    ir = IR(Graph(m).infer_shapes())
    UnrollLoops().rewrite(ir, PassContext())
    square = [n for n in ir.g.nodes if n.name == "square"]
    assert len(square) == 1 and id(square[0]) in live_nodes(ir.g)
    eliminate_dead(ir.g)
    out = ir.to_graph()
    out.check()
    assert "Mul" in {n.op_type for n in out.graph.node}
    want, got = ort_run(m, feeds), ort_run(out.model, feeds)
    np.testing.assert_allclose(got["acc"], want["acc"], atol=1e-6)
