"""Models over 2 GiB (weights as ONNX external data) go through load, every pass, the reference and lowering.

Protobuf cannot hold more than 2 GiB, so no step may serialize such a model
into one message; weights stay memory-mapped (see :mod:`graphopt.graph`).
The small tests below exercise the same code paths on a model made lazy by
lowering the thresholds; the slow test runs the real thing in a subprocess and
records its time and peak memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import graphopt
from graphopt import graph as graph_mod
from graphopt.graph import Graph, is_lazy

from .conftest import make_model, vi


def _write_matmul_chain(folder: Path, n: int, layers: int, seed: int = 0) -> Path:
    """x[1, n] -> (MatMul W_i[n, n], Add b_i) * layers -> y, the weights streamed into model.onnx.data.

    Weights are written one row block at a time, so building the model never
    holds a whole weight in memory; blocks cycle through a few random ones
    (scaled per layer) because generating gigabytes of random numbers is slow.
    """
    rng = np.random.default_rng(seed)
    data = folder / "model.onnx.data"
    inits, nodes, offset = [], [], 0
    rows = max(1, (64 << 20) // (4 * n))
    pool = [rng.uniform(-1, 1, size=(rows, n)).astype(np.float32) * np.float32(np.sqrt(3.0 / n)) for _ in range(3)]
    with open(data, "wb") as f:
        for i in range(layers):
            t = onnx.TensorProto(name=f"w{i}", data_type=onnx.TensorProto.FLOAT, dims=[n, n])
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, r in enumerate(range(0, n, rows)):
                block = pool[(i + k) % len(pool)][:min(rows, n - r)] * np.float32(1.0 + 0.1 * i)
                f.write(block.tobytes())
            for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(4 * n * n))):
                e = t.external_data.add()
                e.key, e.value = k, v
            offset += 4 * n * n
            inits.append(t)
            inits.append(onnx.numpy_helper.from_array(rng.standard_normal(n).astype(np.float32) * 0.1, f"b{i}"))
            src = "x" if i == 0 else f"h{i - 1}"
            nodes.append(helper.make_node("MatMul", [src, f"w{i}"], [f"m{i}"], name=f"mm{i}"))
            nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], ["y" if i == layers - 1 else f"a{i}"],
                                          name=f"add{i}"))
            if i < layers - 1:
                nodes.append(helper.make_node("Tanh", [f"a{i}"], [f"h{i}"], name=f"tanh{i}"))
    model = make_model(nodes, [vi("x", [1, n])], [vi("y", [1, n])], inits)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def lazy_thresholds(monkeypatch):
    """Make a small model 'large': every external tensor of 4 KiB or more stays on disk."""
    monkeypatch.setattr(graph_mod, "LAZY_EXTERNAL_BYTES", 1)
    monkeypatch.setattr(graph_mod, "LAZY_TENSOR_BYTES", 4096)


def test_large_model_keeps_weights_on_disk_and_reads_them_only_through_graphopt(tmp_path, lazy_thresholds):
    path = _write_matmul_chain(tmp_path, 64, 2)
    g = Graph.load(path)
    lazy = [t.name for t in g.graph.initializer if is_lazy(t)]
    assert lazy == ["w0", "w1"]  # the 256-byte biases are read inline
    assert len(g.to_bytes()) < 4096  # the protobuf is the skeleton only
    w0 = g.array("w0")
    assert isinstance(w0, np.memmap) and not w0.flags.writeable
    raw = np.fromfile(tmp_path / "model.onnx.data", dtype=np.float32, count=64 * 64).reshape(64, 64)
    np.testing.assert_array_equal(w0, raw)
    # A naive reader fails loudly instead of resolving the file against the working directory.
    with pytest.raises(Exception, match="relative path"):
        onnx.numpy_helper.to_array(g.initializers()["w0"])
    # The copy a pass gets does not copy the weights.
    assert g.copy().model.ByteSize() == g.model.ByteSize()
    # Shape inference and the checker run on the skeleton.
    specs = g.infer_shapes().value_specs()
    assert specs["m0"].shape == (1, 64)
    g.check()


def test_large_model_saves_with_external_data_and_reloads_identical(tmp_path, lazy_thresholds):
    g = Graph.load(_write_matmul_chain(tmp_path, 64, 2))
    out = tmp_path / "out" / "saved.onnx"
    g.save(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["saved.onnx", "saved.onnx.data"]
    h = Graph.load(out)
    for name in ("w0", "w1", "b0", "b1"):
        np.testing.assert_array_equal(h.array(name), g.array(name))
    # Saving over the file that holds the weights would destroy them: refused, nothing written.
    with pytest.raises(graphopt.ModelError, match="holds this model's weights"):
        h.save(out)


def test_large_model_reference_stats_and_lowering(tmp_path, lazy_thresholds):
    """The reference runtime, stats and lowering read lazy weights without loading the model into one protobuf."""
    from graphopt.reference import run_reference
    from graphopt.stats import graph_stats

    path = _write_matmul_chain(tmp_path, 64, 2)
    g = Graph.load(path)
    eager = onnx.load(path)  # the same model with its weights inline, as onnx itself reads it
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    got = run_reference(g, [{"x": x}])[0][0]
    want = run_reference(Graph(eager), [{"x": x}])[0][0]
    # ONNX Runtime may pre-pack a constant weight and sum in another order than for a fed one.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    st, st_eager = graph_stats(g), graph_stats(Graph(eager))
    assert (st.params, st.nonzeros, st.flops) == (st_eager.params, st_eager.nonzeros, st_eager.flops)
    assert abs(st.bytes - st_eager.bytes) < 1024
    res = graphopt.lower(g, "cpu", tmp_path / "art", verify=True)
    assert res.verification.ok and res.verification.max_abs < 1e-4
    weights = {w["name"]: w for w in res.manifest["weights"]}
    blob = (tmp_path / "art" / "weights.bin").read_bytes()
    w0 = weights["w0"]
    assert blob[w0["offset"]:w0["offset"] + w0["nbytes"]] == np.asarray(g.array("w0")).tobytes()


_LOWER_LARGE = r"""
import sys
from graphopt import cli
sys.exit(cli.main(["lower", sys.argv[1], "-o", sys.argv[2], "--verify", "--json"]))
"""


@pytest.mark.slow
def test_model_over_2gib_lowers_and_verifies_within_twice_its_weights(tmp_path):
    """3 x 784 MiB fp32 MatMul weights (2.3 GiB): `graphopt lower --verify`, default pipeline, in a subprocess."""
    n, layers = 14336, 3
    path = _write_matmul_chain(tmp_path, n, layers)
    weight_bytes = layers * 4 * n * n
    assert weight_bytes > 2 << 30
    t0 = time.perf_counter()
    with open(tmp_path / "out.json", "w") as out, open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _LOWER_LARGE, str(path), str(tmp_path / "art")],
                                stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS
    seconds = time.perf_counter() - t0
    peak = usage.ru_maxrss * 1024  # Linux reports KiB
    code = os.waitstatus_to_exitcode(status)
    assert code == 0, (tmp_path / "err.txt").read_text()[-3000:]
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["report"]["verification"]["ok"] is True
    # Measured, not estimated: printed so the figures can be quoted (pytest -s, or -rA).
    print(f"\nlarge model: {weight_bytes / 2**30:.2f} GiB of weights, lower --verify {seconds:.0f} s, "
          f"peak RSS {peak / 2**30:.2f} GiB ({peak / weight_bytes:.2f}x the weights)")
    assert peak < 2.5 * weight_bytes, f"peak RSS {peak / 2**30:.2f} GiB for {weight_bytes / 2**30:.2f} GiB of weights"
    assert (tmp_path / "art" / "weights.bin").stat().st_size >= weight_bytes


def test_large_model_artifact_does_not_depend_on_where_the_model_lives(tmp_path, lazy_thresholds):
    """Lazy tensors point at absolute paths in memory; nothing of that may reach the artifact."""
    arts = []
    for where in ("one", "two/deeper"):
        folder = tmp_path / where
        folder.mkdir(parents=True)
        path = _write_matmul_chain(folder, 64, 2)
        arts.append(graphopt.lower(Graph.load(path), "cpu", tmp_path / f"art-{len(arts)}").artifact)
    for f in ("main.so", "manifest.json", "model.onnx", "weights.bin"):
        assert (arts[0] / f).read_bytes() == (arts[1] / f).read_bytes(), f


def _write_lazy_lstm(folder: Path, in_branch: bool = False) -> Path:
    """y = LSTM(x; W, R lazy), t = x @ Transpose(P lazy), z = x @ Q (lazy), weights in model.onnx.data.

    P feeds only a Transpose (cleanup folds it, so must read it); Q only a
    MatMul (no pass reads it, so it must stay on disk). With ``in_branch`` the
    LSTM sits in the then-branch of an If on input ``c`` (else: y = h), so W
    and R are read only inside a subgraph.
    """
    rng = np.random.default_rng(3)
    T, B, I, H = 4, 2, 32, 32
    arr = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    inits = [onnx.numpy_helper.from_array(a, n) for n, a in
             (("W", arr(2, 4 * H, I)), ("R", arr(2, 4 * H, H)), ("B", arr(2, 8 * H)), ("P", arr(2 * I, I)),
              ("Q", arr(I, I)))]
    lstm = helper.make_node("LSTM", ["x", "W", "R", "B"], ["", "y" if not in_branch else "y_then"], name="lstm",
                            hidden_size=H, direction="bidirectional")
    inputs = [vi("x", [T, B, I])]
    if in_branch:
        then_g = helper.make_graph([lstm], "then", [], [vi("y_then", [2, B, H])])
        else_g = helper.make_graph([helper.make_node("Identity", ["h"], ["y_else"])], "else", [],
                                   [vi("y_else", [2, B, H])])
        lstm = helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g)
        inputs += [vi("c", [], onnx.TensorProto.BOOL), vi("h", [2, B, H])]
    nodes = [lstm,
             helper.make_node("Transpose", ["P"], ["Pt"], name="tr", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "Pt"], ["t"], name="mm_p"),
             helper.make_node("MatMul", ["x", "Q"], ["z"], name="mm_q")]
    model = make_model(nodes, inputs, [vi("y", [2, B, H]), vi("t", [T, B, 2 * I]), vi("z", [T, B, I])], inits)
    path = folder / "model.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data",
              size_threshold=1024)
    return path


def _same_as_onnxruntime(path: Path, out: Graph, feed: dict) -> None:
    """``out`` computes what ONNX Runtime computes on the model at ``path`` (weights read inline by onnx)."""
    from graphopt.reference import run_reference

    want = run_reference(Graph(onnx.load(path)), [feed])[0]
    got = run_reference(out, [feed])[0]
    for w, o in zip(want, got):
        np.testing.assert_allclose(o, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_branch", [False, True])
def test_lower_recurrent_reads_lazy_weights_from_disk_and_leaves_the_others_lazy(tmp_path, lazy_thresholds,
                                                                                 in_branch):
    """W and R (read in the main graph or only inside an If branch) read as memory maps; Q stays on disk."""
    path = _write_lazy_lstm(tmp_path, in_branch)
    g = Graph.load(path)
    assert sorted(t.name for t in g.graph.initializer if is_lazy(t)) == ["P", "Q", "R", "W"]
    before = g.to_bytes()
    res = graphopt.optimize(g, "lower-recurrent")  # also checked against ONNX Runtime on random inputs
    assert g.to_bytes() == before  # the input Graph is not modified
    out = res.graph
    assert res.records[0].details["rewritten"] == 1
    inits = {t.name: t for t in out.graph.initializer}
    assert "W" not in inits and "R" not in inits  # only their per-direction, transposed pieces are left
    for name in ("P", "Q"):  # untouched: the same EXTERNAL proto, still on disk
        assert is_lazy(inits[name]) and inits[name].SerializeToString() == g.initializers()[name].SerializeToString()
    rng = np.random.default_rng(4)
    feed = {"x": rng.standard_normal((4, 2, 32)).astype(np.float32)}
    if in_branch:
        feed |= {"c": np.array(True), "h": rng.standard_normal((2, 2, 32)).astype(np.float32)}
    _same_as_onnxruntime(path, out, feed)


def test_cleanup_folds_through_a_lazy_weight_and_leaves_the_others_lazy(tmp_path, lazy_thresholds):
    """fold-constants reads P (lazy) through a memory map to fold Transpose(P); Q, untouched, stays on disk."""
    path = _write_lazy_lstm(tmp_path)
    g = Graph.load(path)
    res = graphopt.optimize(g, "cleanup")
    out = res.graph
    assert res.records[0].details["fold-constants.folded_nodes"] == 1
    assert "Transpose" not in {n.op_type for n in out.graph.node}
    inits = {t.name: t for t in out.graph.initializer}
    assert "P" not in inits
    for name in ("W", "R", "Q"):
        assert is_lazy(inits[name]) and inits[name].SerializeToString() == g.initializers()[name].SerializeToString()
    _same_as_onnxruntime(path, out, {"x": np.random.default_rng(5).standard_normal((4, 2, 32)).astype(np.float32)})


def test_fold_constants_proves_shapes_on_a_model_with_lazy_weights(tmp_path, lazy_thresholds):
    """Shape(r) folds once two ONNX Runtime runs confirm r's inferred shape; the runs feed the lazy weight."""
    w = onnx.numpy_helper.from_array(np.random.default_rng(6).standard_normal((64, 64)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Shape", ["r"], ["s"]), helper.make_node("Reshape", ["r", "s"], ["y"])]
    path = tmp_path / "model.onnx"
    onnx.save(make_model(nodes, [vi("x", ["n", 64])], [vi("y", ["n", 64])], [w]), path, save_as_external_data=True,
              location="model.onnx.data", size_threshold=1024)
    g = Graph.load(path).with_input_shapes({"x": [2, 64]})
    assert is_lazy(g.initializers()["w"])
    res = graphopt.optimize(g, "fold-constants")
    assert res.records[0].details["folded_nodes"] == 1, res.records[0].details
    assert "Shape" not in {n.op_type for n in res.graph.graph.node}
    assert is_lazy({t.name: t for t in res.graph.graph.initializer}["w"])


def test_generated_integer_inputs_follow_a_comparison_with_a_lazy_constant(tmp_path, lazy_thresholds):
    """integer_domains reads the lazy table ids are compared with (it raised onnx's ValidationError)."""
    from graphopt.data import integer_domains

    table = onnx.numpy_helper.from_array(np.arange(7, 2055, 2, dtype=np.int64), "table")  # 8 KiB: lazy
    nodes = [helper.make_node("Unsqueeze", ["ids", "ax"], ["ids2"]),
             helper.make_node("Equal", ["ids2", "table"], ["hit"]),
             helper.make_node("Cast", ["hit"], ["y"], to=onnx.TensorProto.FLOAT)]
    model = make_model(nodes, [vi("ids", [4], onnx.TensorProto.INT64)], [vi("y", [4, 1024])],
                       [table, onnx.numpy_helper.from_array(np.array([1], np.int64), "ax")])
    path = tmp_path / "model.onnx"
    onnx.save(model, path, save_as_external_data=True, location="model.onnx.data", size_threshold=1024)
    g = Graph.load(path)
    assert is_lazy(g.initializers()["table"])
    assert integer_domains(g)["ids"].choices == tuple(range(7, 2055, 2))
