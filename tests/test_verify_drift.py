"""A quantized artifact is verified within the drift the model itself shows (graphopt.reference.reference_drift):
a QuantizeLinear whose inputs sit on rounding boundaries flips under rounding-sized perturbations, in ONNX
Runtime as in any other correct implementation."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.graph import Graph
from graphopt.reference import (DRIFT_FACTOR, compare_artifact_outputs, reference_drift, reference_session,
                                run_reference)

from .conftest import init, make_model, vi

QUANTIZED = {"target": {"quantize_nodes": 1}}
FLOAT = {"target": {"quantize_nodes": 0, "int8_matmuls": 0}}


def _qdq() -> Graph:
    """y = DequantizeLinear(QuantizeLinear(x, 0.1)): one quantization step is 0.1."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    return Graph(make_model(nodes, [vi("x", [1, 1000])], [vi("y", [1, 1000])],
                            [init("s", np.float32(0.1)), init("z", np.int8(0))]))


def _feeds():
    # Every value on a rounding boundary (k + 0.5 steps): a perturbation of 1e-6 flips about half of them;
    # the range (about 5) makes one step (0.1) 2 % of it: a drift, not a decision.
    k = np.arange(1000) % 100 - 50
    return [{"x": ((k + 0.5) * 0.1).astype(np.float32)[None]}]


def _check(manifest, got_shift, **tol):
    g = _qdq()
    feeds = _feeds()
    session = reference_session(g)
    ref = run_reference(g, feeds, session)
    got = [[r.copy() for r in outs] for outs in ref]
    got[0][0][0, :got_shift[0]] += got_shift[1]
    return compare_artifact_outputs(manifest, ref, got, ["y"], atol=tol.get("atol", 1e-4), rtol=tol.get("rtol", 1e-3),
                                    graph=g, feeds=feeds, session=session)


def test_drift_is_one_quantization_step_on_boundaries():
    g = _qdq()
    feeds = _feeds()
    session = reference_session(g)
    drift = reference_drift(session, g, feeds, run_reference(g, feeds, session))
    assert drift == [pytest.approx(0.1, rel=1e-5)]


def test_a_one_step_flip_passes_within_the_drift_and_says_so():
    c = _check(QUANTIZED, (5, 0.2))  # two steps: past 0.001 + 0.02 * 5, within 3 drifts
    assert c.ok and c.drift == pytest.approx(0.1, rel=1e-5)
    assert "drift" in c.summary() and c.to_json()["drift"] == c.drift


def test_errors_past_the_drift_fail():
    c = _check(QUANTIZED, (5, 0.1 * (DRIFT_FACTOR + 2)))
    assert not c.ok and c.drift is not None


def test_float_artifacts_and_explicit_tolerances_get_no_second_chance():
    c = _check(FLOAT, (5, 0.2))
    assert not c.ok and c.drift is None and "drift" not in c.to_json()
    c = _check(QUANTIZED, (5, 0.2), atol=1e-3, rtol=1e-2)
    assert not c.ok and c.drift is None


def test_no_float_input_no_drift():
    g = Graph(make_model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
                         [vi("x", [4], TensorProto.INT64)], [vi("y", [4])]))
    feeds = [{"x": np.arange(4, dtype=np.int64)}]
    session = reference_session(g)
    assert reference_drift(session, g, feeds, run_reference(g, feeds, session)) is None


def _check_graph(g, feeds, mutate, manifest=QUANTIZED):
    session = reference_session(g)
    ref = run_reference(g, feeds, session)
    got = [[r.copy() for r in outs] for outs in ref]
    mutate(got)
    return compare_artifact_outputs(manifest, ref, got, [o.name for o in g.outputs], atol=1e-4, rtol=1e-3,
                                    graph=g, feeds=feeds, session=session)


def test_index_like_float_inputs_are_not_perturbed():
    """A float input holding whole numbers (an index through Cast -> Gather) is not data: perturbing it would
    pick other rows, a 'drift' as large as the output. A broken artifact gets no second chance."""
    table = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32) * 5
    nodes = [helper.make_node("Cast", ["i"], ["ii"], to=TensorProto.INT64),
             helper.make_node("Gather", ["t", "ii"], ["y"])]
    g = Graph(make_model(nodes, [vi("i", [4])], [vi("y", [4, 16])], [init("t", table)]))
    feeds = [{"i": np.array([3, 1, 4, 1], np.float32)}]
    c = _check_graph(g, feeds, lambda got: got[0][0].__setitem__(Ellipsis, 0.0))
    assert not c.ok and c.drift is None


def test_each_output_gets_its_own_drift():
    """Large logits drift more than the probabilities next to them: the logits' drift does not widen the
    probabilities' tolerance (a uniform distribution instead of the softmax fails)."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["logits"]),
             helper.make_node("Softmax", ["x"], ["p"], axis=-1)]
    g = Graph(make_model(nodes, [vi("x", [1, 1000])], [vi("logits", [1, 1000]), vi("p", [1, 1000])],
                         [init("s", np.float32(0.1)), init("z", np.int8(0))]))
    feeds = _feeds()

    def mutate(got):
        got[0][0][0, :5] += 0.2  # two steps on the logits: within their drift
        got[0][1][...] = np.float32(1 / 1000)  # the probabilities flattened: far past their drift

    c = _check_graph(g, feeds, mutate)
    assert not c.ok and c.worst_output == "p"
    c = _check_graph(g, feeds, lambda got: got[0][0][0, :5].__iadd__(0.2))
    assert c.ok and c.drift == pytest.approx(0.1, rel=1e-5)


def test_a_perturbation_the_model_cannot_take_is_no_second_chance():
    """A float input feeding a Reshape target: the perturbed run fails in ONNX Runtime; the comparison
    stays a failed comparison (no crash)."""
    nodes = [helper.make_node("Mul", ["a", "half"], ["h"]),
             helper.make_node("Cast", ["h"], ["shape"], to=TensorProto.INT64),
             helper.make_node("Reshape", ["d", "shape"], ["y"])]
    g = Graph(make_model(nodes, [vi("a", [2]), vi("d", [2, 3])], [vi("y", None)],
                         [init("half", np.float32(0.5))]))
    # 3.0000002 * 2 -> shape [2, 3]; perturbed by 1e-6 below, the Cast truncates to 2 and the Reshape fails.
    feeds = [{"a": np.array([4.0, 6.0000005], np.float32), "d": np.arange(6, dtype=np.float32).reshape(2, 3) + 0.25}]
    session = reference_session(g)
    assert reference_drift(session, g, feeds, run_reference(g, feeds, session)) is None
    c = _check_graph(g, feeds, lambda got: got[0][0].__iadd__(1.0))
    assert not c.ok


# ------------------------------------------------------------------------------------ bf16 artifacts (tpu)
def _cancelling() -> Graph:
    """y = x @ W1 - x @ W2 with W2 = W1 + 0.05 noise: the outputs are small, bf16 rounding of the weights is
    not (it moves them past the int8 tolerances), as it does on a deep network's softmax."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((256, 8)).astype(np.float32)
    w2 = (w1 + 0.05 * rng.standard_normal((256, 8))).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("MatMul", ["x", "w2"], ["b"]),
             helper.make_node("Sub", ["a", "b"], ["y"])]
    return Graph(make_model(nodes, [vi("x", [4, 256])], [vi("y", [4, 8])], [init("w1", w1), init("w2", w2)]))


@pytest.mark.parametrize("excess, ok", [(0.0, True), (5.0, False)])
def test_bf16_artifact_is_checked_within_the_drift_of_bf16_weights(excess, ok):
    from graphopt.reference import bf16_weights

    g = _cancelling()
    feeds = [{"x": np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)}]
    session = reference_session(g)
    ref = run_reference(g, feeds, session)
    rounded = run_reference(bf16_weights(g), feeds)  # what an array multiplying bf16 weights computes
    drift = float(np.abs(rounded[0][0] - ref[0][0]).max())
    got = [[rounded[0][0] + excess * drift]]
    manifest = {"target": {"bf16_regions": 2}}
    cmp = compare_artifact_outputs(manifest, ref, got, ["y"], atol=1e-4, rtol=1e-3, graph=g, feeds=feeds,
                                   session=session)
    assert cmp.drift == pytest.approx(drift) and cmp.drift_kind == "bf16 drift"
    assert cmp.ok is ok and "bf16 drift" in cmp.summary()
    assert drift > 1e-3 + 2e-2 * float(np.abs(ref[0][0]).max())  # the int8 tolerances alone refuse it
