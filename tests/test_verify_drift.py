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
    # Every value on a rounding boundary (k + 0.5 steps): a perturbation of 1e-6 flips about half of them.
    k = np.arange(1000) % 10 - 5
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
    assert drift == pytest.approx(0.1, rel=1e-5)


def test_a_one_step_flip_passes_within_the_drift_and_says_so():
    c = _check(QUANTIZED, (5, 0.1))
    assert c.ok and c.drift == pytest.approx(0.1, rel=1e-5)
    assert "drift" in c.summary() and c.to_json()["drift"] == c.drift


def test_errors_past_the_drift_fail():
    c = _check(QUANTIZED, (5, 0.1 * (DRIFT_FACTOR + 2)))
    assert not c.ok and c.drift is not None


def test_float_artifacts_and_explicit_tolerances_get_no_second_chance():
    c = _check(FLOAT, (5, 0.1))
    assert not c.ok and c.drift is None and "drift" not in c.to_json()
    c = _check(QUANTIZED, (5, 0.1), atol=1e-3, rtol=1e-2)
    assert not c.ok and c.drift is None


def test_no_float_input_no_drift():
    g = Graph(make_model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
                         [vi("x", [4], TensorProto.INT64)], [vi("y", [4])]))
    feeds = [{"x": np.arange(4, dtype=np.int64)}]
    session = reference_session(g)
    assert reference_drift(session, g, feeds, run_reference(g, feeds, session)) is None
