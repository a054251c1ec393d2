"""Memory caps on hostile models: a tiny file that asks for gigabytes is refused, not obeyed.

Each run happens in a child process under an address-space limit (RLIMIT_AS), so a regression shows up
as a MemoryError / non-zero exit instead of taking the machine's memory.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt.testing import hostile_constant_model

from .conftest import make_model, vi

#: Address space the child may use: python + torch-free graphopt + onnxruntime + tvm fit well inside.
LIMIT = 3 << 30


def _hostile(tmp_path):
    """218 bytes: ConstantOfShape([2^30]) floats (4 GiB), sliced to 4 values and added to the input."""
    p = tmp_path / "hostile.onnx"
    onnx.save(hostile_constant_model(1 << 30, value=1.0), p)
    return p


def _limited(code: str, cwd):
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({LIMIT}, {LIMIT}))
        {textwrap.indent(textwrap.dedent(code), '        ').strip()}
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_shape_inference_allocates_nothing_big(tmp_path):
    p = _hostile(tmp_path)
    res = _limited(f"""
        import graphopt
        g = graphopt.Graph.load({str(p)!r}).infer_shapes()
        print(g.value_specs()["big"].shape)
    """, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == f"({1 << 30},)"


def test_reference_run_is_refused_by_size_before_running(tmp_path):
    from graphopt.errors import ModelError
    from graphopt.graph import Graph
    from graphopt.reference import reference_session

    with pytest.raises(ModelError, match=r"value 'big' \(made by ConstantOfShape 'big'\) of 4294967296 bytes"):
        reference_session(Graph.load(_hostile(tmp_path)))


def test_hostile_model_through_the_cli_stays_small(tmp_path):
    p = _hostile(tmp_path)
    res = _limited(f"""
        from graphopt.cli import main
        print("optimize", main(["optimize", {str(p)!r}, "-o", "out.onnx", "-q"]))
        print("lower", main(["lower", {str(p)!r}, "-o", "art", "-q"]))
    """, tmp_path)
    assert "MemoryError" not in res.stderr and "Unable to allocate" not in res.stderr, res.stderr[-2000:]
    lines = dict(line.split() for line in res.stdout.split("\n") if line.strip())
    # optimize cannot verify a model too big to run, and says so in its record; lower refuses it with exit 2.
    assert lines == {"optimize": "0", "lower": "2"}, (res.stdout, res.stderr)
    assert "over the 2147483648 byte cap for one value" in res.stderr
    assert not (tmp_path / "art").exists()


def test_the_cap_can_be_raised_for_a_model_that_really_needs_it(tmp_path, monkeypatch):
    from graphopt.errors import ModelError
    from graphopt.graph import Graph
    from graphopt.reference import reference_session, run_reference

    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [256, 256])], [vi("y", [256, 256])])
    g = Graph(m)
    monkeypatch.setenv("GRAPHOPT_MAX_TENSOR_BYTES", str(1000))
    with pytest.raises(ModelError, match="GRAPHOPT_MAX_TENSOR_BYTES"):
        reference_session(g)
    monkeypatch.setenv("GRAPHOPT_MAX_TENSOR_BYTES", str(1 << 20))
    x = np.ones((256, 256), np.float32)
    assert run_reference(g, [{"x": x}], reference_session(g))[0][0].shape == (256, 256)
