"""The use-def IR (graphopt.ir) and the passes' view of whole graphs: subgraphs, graph I/O, scale.

Each model is built for the property it checks. Passes are run through the
PassManager (graphopt.optimize), which also checks them numerically on ONNX Runtime.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
from onnx import TensorProto, helper

import graphopt

from .conftest import init, make_model, ops, vi
from .conftest import ort_run as run


def if_model(outer_only_in_branch: bool = True):
    """y = If(c, then: x*k, else: x+1) where k is a main-graph initializer read only in the then-branch."""
    k = np.arange(4, dtype=np.float32) + 2
    then_g = helper.make_graph([helper.make_node("Mul", ["x", "k"], ["t_out"], name="t_mul")], "then", [],
                               [vi("t_out", [4])])
    else_g = helper.make_graph([helper.make_node("Add", ["x", "one"], ["e_out"], name="e_add")], "else", [],
                               [vi("e_out", [4])], [init("one", np.ones(4, np.float32))])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g, name="if")]
    return make_model(nodes, [vi("x", [4]), vi("c", [], TensorProto.BOOL)], [vi("y", [4])], [init("k", k)])


def test_export_keeps_model_fields_and_is_deterministic():
    m = if_model()
    m.doc_string, m.domain, m.model_version = "doc", "org.example", 7
    m.graph.doc_string = "graph doc"
    m.graph.name = "my_graph"
    onnx.helper.set_model_props(m, {"author": "tests", "license": "MIT"})
    fn = helper.make_function("custom.fns", "Twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                              [helper.make_opsetid("", 17)])
    m.functions.append(fn)
    m.opset_import.append(helper.make_opsetid("custom.fns", 1))
    m.ir_version = 8
    g = graphopt.Graph(m)
    a = graphopt.optimize(g, "eliminate-identity").graph
    b = graphopt.optimize(g, "eliminate-identity").graph
    assert a.to_bytes() == b.to_bytes()
    out = a.model
    assert out.ir_version == 8 and out.doc_string == "doc" and out.domain == "org.example" and out.model_version == 7
    assert out.graph.name == "my_graph" and out.graph.doc_string == "graph doc"
    assert {p.key: p.value for p in out.metadata_props} == {"author": "tests", "license": "MIT"}
    assert [f.name for f in out.functions] == ["Twice"] and out.functions[0] == fn
    assert {(o.domain, o.version) for o in out.opset_import} == {("", 17), ("custom.fns", 1)}
    assert out.producer_name == "graphopt-tests"


def test_outer_initializer_read_only_in_a_branch_stays_in_the_main_graph():
    g = graphopt.Graph(if_model())
    for pipeline in ("fold-batchnorm", "eliminate-dead", "cleanup", "dedup-initializers"):
        res = graphopt.optimize(g, pipeline)
        main_inits = [t.name for t in res.graph.graph.initializer]
        assert main_inits == ["k"], pipeline
        branches = {a.name: a.g for a in res.graph.graph.node[0].attribute}
        assert [t.name for t in branches["then_branch"].initializer] == [], pipeline
        assert [t.name for t in branches["else_branch"].initializer] == ["one"], pipeline
        x = np.arange(4, dtype=np.float32)
        np.testing.assert_array_equal(run(res.graph, {"x": x, "c": np.array(True)})[0], x * (np.arange(4) + 2))


def test_fold_batchnorm_keeps_branch_weights_and_sorts():
    """A Conv+BN next to an If whose branch reads a main-graph weight; the result stays valid and sorted."""
    rng = np.random.default_rng(0)
    then_g = helper.make_graph([helper.make_node("Mul", ["p", "k"], ["t_out"])], "then", [], [vi("t_out", [1, 2, 4, 4])])
    else_g = helper.make_graph([helper.make_node("Identity", ["p"], ["e_out"])], "else", [], [vi("e_out", [1, 2, 4, 4])])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["p"], name="bn"),
        helper.make_node("If", ["flag"], ["y"], then_branch=then_g, else_branch=else_g, name="if"),
    ]
    inits = [init("w", rng.standard_normal((2, 3, 1, 1)).astype(np.float32)),
             init("g", np.array([1.5, 0.5], np.float32)), init("b", np.array([0.1, -0.2], np.float32)),
             init("m", np.array([0.3, 0.1], np.float32)), init("v", np.array([1.2, 0.8], np.float32)),
             init("k", rng.standard_normal((1, 2, 4, 4)).astype(np.float32))]
    m = make_model(nodes, [vi("x", [1, 3, 4, 4]), vi("flag", [], TensorProto.BOOL)], [vi("y", [1, 2, 4, 4])], inits)
    res = graphopt.optimize(graphopt.Graph(m), "fold-batchnorm")
    assert res.records[0].details["folded"] == 1
    assert "k" in {t.name for t in res.graph.graph.initializer}
    assert ops(res.graph) == ["Conv", "If"]
    x = rng.standard_normal((1, 3, 4, 4)).astype(np.float32)
    for flag in (True, False):
        np.testing.assert_allclose(run(res.graph, {"x": x, "flag": np.array(flag)})[0],
                                   run(graphopt.Graph(m), {"x": x, "flag": np.array(flag)})[0], rtol=1e-5, atol=1e-5)


def test_dedup_keeps_an_initializer_that_is_a_graph_output():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    nodes = [helper.make_node("Add", ["x", "w1"], ["y"])]
    m = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3]), vi("w2", [2, 3])], [init("w1", w), init("w2", w.copy())])
    res = graphopt.optimize(graphopt.Graph(m), "dedup-initializers")
    assert [o.name for o in res.graph.graph.output] == ["y", "w2"]
    out = run(res.graph, {"x": np.zeros((2, 3), np.float32)})
    np.testing.assert_array_equal(out[1], w)


def test_dedup_merges_across_scopes_only_where_visible():
    """Equal constants in two sibling branches are not merged; a branch copy of a main-graph one is."""
    c = np.full(4, 3.0, np.float32)
    then_g = helper.make_graph([helper.make_node("Mul", ["x", "kt"], ["t_out"])], "then", [], [vi("t_out", [4])],
                               [init("kt", c)])
    else_g = helper.make_graph([helper.make_node("Add", ["x", "ke"], ["e_out"])], "else", [], [vi("e_out", [4])],
                               [init("ke", c.copy())])
    nodes = [helper.make_node("If", ["flag"], ["y"], then_branch=then_g, else_branch=else_g)]
    m = make_model(nodes, [vi("x", [4]), vi("flag", [], TensorProto.BOOL)], [vi("y", [4])])
    res = graphopt.optimize(graphopt.Graph(m), "dedup-initializers")
    assert res.records[0].details["merged_initializers"] == 0
    x = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(run(res.graph, {"x": x, "flag": np.array(False)})[0], x + 3)


def test_eliminate_dead_sees_reads_from_nested_subgraphs():
    """'r' is read only two levels down (an If inside a branch): its producer stays, a dead node goes."""
    inner_then = helper.make_graph([helper.make_node("Neg", ["r"], ["it_out"])], "inner_then", [], [vi("it_out", [4])])
    inner_else = helper.make_graph([helper.make_node("Abs", ["x"], ["ie_out"])], "inner_else", [], [vi("ie_out", [4])])
    then_g = helper.make_graph([helper.make_node("If", ["flag"], ["t_out"], then_branch=inner_then,
                                                 else_branch=inner_else)], "then", [], [vi("t_out", [4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e_out"])], "else", [], [vi("e_out", [4])])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Sigmoid", ["x"], ["unused"], name="dead"),
             helper.make_node("If", ["flag"], ["y"], then_branch=then_g, else_branch=else_g, name="if")]
    m = make_model(nodes, [vi("x", [4]), vi("flag", [], TensorProto.BOOL)], [vi("y", [4])])
    res = graphopt.optimize(graphopt.Graph(m), "eliminate-dead")
    assert ops(res.graph) == ["Relu", "If"]
    assert res.records[0].details["removed_nodes"] == 1


def test_eliminate_identity_renames_reads_inside_subgraphs():
    then_g = helper.make_graph([helper.make_node("Mul", ["a", "a"], ["t_out"])], "then", [], [vi("t_out", [4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["a"], ["e_out"])], "else", [], [vi("e_out", [4])])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["a"]),
             helper.make_node("If", ["flag"], ["y"], then_branch=then_g, else_branch=else_g)]
    m = make_model(nodes, [vi("x", [4]), vi("flag", [], TensorProto.BOOL)], [vi("y", [4])])
    res = graphopt.optimize(graphopt.Graph(m), "eliminate-identity")
    assert ops(res.graph) == ["Relu", "If"]
    inner = {i for a in res.graph.graph.node[1].attribute for n in a.g.node for i in n.input}
    assert inner == {"r"}


def test_initializers_listed_as_inputs_stay_overridable():
    """Old exporters list initializers as graph inputs; they stay inputs (a caller may feed them)."""
    m = make_model([helper.make_node("Add", ["x", "b"], ["y"])], [vi("x", [2]), vi("b", [2])], [vi("y", [2])],
                   [init("b", np.ones(2, np.float32))])
    res = graphopt.optimize(graphopt.Graph(m), "cleanup")
    assert [i.name for i in res.graph.graph.input] == ["x", "b"]
    assert [t.name for t in res.graph.graph.initializer] == ["b"]


def identity_chain(n: int):
    nodes = [helper.make_node("Identity", [f"t{i}"], [f"t{i + 1}"]) for i in range(n)]
    nodes.append(helper.make_node("Relu", [f"t{n}"], ["y"]))
    return make_model(nodes, [vi("t0", [4])], [vi("y", [4])])


def test_cleanup_is_near_linear_on_a_20000_identity_chain():
    g = graphopt.Graph(identity_chain(20_000))
    t0 = time.perf_counter()
    res = graphopt.optimize(g, "cleanup", verify=False)
    seconds = time.perf_counter() - t0
    assert ops(res.graph) == ["Relu"]
    assert seconds < 30, f"cleanup took {seconds:.1f}s on 20k nodes"


def test_weights_pass_through_without_a_numpy_round_trip():
    """int4 and bfloat16 weights (no numpy dtype) keep their exact bytes through cleanup; int4 is not dequantized."""
    rng = np.random.default_rng(0)
    q = helper.make_tensor("q", TensorProto.INT4, [8, 8], rng.integers(-8, 8, 64).tolist())
    bf = helper.make_tensor("bf", TensorProto.BFLOAT16, [8], rng.standard_normal(8).astype(np.float32).tolist())
    nodes = [helper.make_node("DequantizeLinear", ["q", "scale"], ["w"]),
             helper.make_node("MatMul", ["x", "w"], ["a"]),
             helper.make_node("Cast", ["bf"], ["b"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["a", "b"], ["y"])]
    m = make_model(nodes, [vi("x", [1, 8])], [vi("y", [1, 8])], [q, bf, init("scale", np.array(0.1, np.float32))],
                   opset=21)
    m.ir_version = 10
    res = graphopt.optimize(graphopt.Graph(m), "cleanup")
    out = {t.name: t for t in res.graph.graph.initializer}
    assert out["q"].data_type == TensorProto.INT4 and out["q"].SerializeToString() == q.SerializeToString()
    assert out["bf"].SerializeToString() == bf.SerializeToString()
    assert "DequantizeLinear" in ops(res.graph)
    assert res.graph.model.ir_version == 10


def test_constant_nodes_become_initializers_with_their_exact_bytes():
    """A bfloat16 weight held in a Constant node (old exporters) becomes an initializer, bytes unchanged."""
    bf = helper.make_tensor("bfw", TensorProto.BFLOAT16, [4], [0.5, -1.25, 3.0, 0.1])
    nodes = [helper.make_node("Constant", [], ["w"], value=bf),
             helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT), helper.make_node("Add", ["x", "wf"], ["y"])]
    m = make_model(nodes, [vi("x", [4])], [vi("y", [4])])
    res = graphopt.optimize(graphopt.Graph(m), "fold-constants")
    w = {t.name: t for t in res.graph.graph.initializer}["w"]
    assert w.data_type == TensorProto.BFLOAT16
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(w), onnx.numpy_helper.to_array(bf))
