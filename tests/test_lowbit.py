"""Weight-only low-bit weights lowered packed: the decode fused into the GEMM (targets/lowbit.py, lowbit.c).

Each case quantizes a small model once (no lowering) and lowers the quantized graph with the default,
lossless pipeline, verified against ONNX Runtime on that graph (decode, then float MatMul / Gemm).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import graphopt
from graphopt.data import DataSource
from graphopt.graph import Graph
from graphopt.targets import lowbit

from .conftest import init, make_model, vi

K, H, N = 72, 264, 24  # N and H not multiples of the kernel's 32-column blocks; K not a multiple of 16


def _model(batch="b") -> Graph:
    """x [batch, 3, K] -> MatMul (3-D activation, symbolic batch) -> Relu -> Gemm transB=1 with a bias."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((K, H)).astype(np.float32) / 8
    w2 = rng.standard_normal((N, H)).astype(np.float32) / 6
    b2 = rng.standard_normal(N).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "flat"], ["r2"], name="flatten"),
             helper.make_node("Gemm", ["r2", "w2", "b2"], ["y"], name="gemm", transB=1)]
    m = make_model(nodes, [vi("x", [batch, 3, K])], [vi("y", [None, N])],
                   [init("w1", w1), init("w2", w2), init("b2", b2),
                    init("flat", np.array([-1, H], dtype=np.int64))])
    return Graph(m)


def _feeds(count=4, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((5, 3, K)).astype(np.float32)} for _ in range(count)]


def _quantized(bits: int, group: int) -> Graph:
    q = f"quantize(mode=weight-only,bits={bits},rounding=nearest" + (f",group={group}" if group else "") + ")"
    return graphopt.optimize(_model(), q).graph


@pytest.mark.parametrize("bits,group,mcpu,kernel", [
    (4, 16, "host", None),
    (2, 0, "host", None),
    (3, 16, "x86-64-v3", "avx2"),
    (8, 0, "portable", "generic"),
])
def test_lowbit_matmul_and_gemm_match_onnx_runtime_and_stay_packed(tmp_path, bits, group, mcpu, kernel):
    import platform

    if mcpu == "x86-64-v3" and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("an x86 CPU name")
    g = _quantized(bits, group)
    res = graphopt.lower(g, "cpu", tmp_path / "a", target_options={"mcpu": mcpu}, verify=True,
                         data=DataSource(feeds=_feeds()))
    assert res.verification.ok, res.verification.summary()
    t = res.manifest["target"]
    assert t["lowbit_matmuls"] == 2, t
    if kernel is not None:
        assert t["lowbit_kernel"] == kernel
    # No float copy of a weight anywhere: weights.bin holds the codes twice (as the graph stores them, for the
    # reference, and in the kernel's containers) and the float16 scale and offset per group, twice; the
    # float weights would be 4 * (K*H + N*H) bytes. 0.15 of slack for padding, alignment and the skeleton.
    float_bytes = 4 * (K * H + N * H)
    grid_bits = 2 * 16 / group if group else 0
    art = Path(res.artifact)
    stored = (art / "weights.bin").stat().st_size + (art / "model.onnx").stat().st_size
    assert stored < float_bytes * ((bits + lowbit.container_bits(bits) + 2 * grid_bits) / 32 + 0.15), (stored, float_bytes)
    big_floats = [w for w in res.manifest["weights"] if w["dtype"] == "float32" and w["nbytes"] >= 4 * N * H]
    assert not big_floats, big_floats
    assert (art / "main.so").stat().st_size < 200_000  # no folded float weights compiled in either
    # The repacked codes reached the program as weights, not as constants compiled into main.so.
    assert any(w["name"].startswith("main.packed") for w in res.manifest["weights"])
    # Other batch sizes (the batch is symbolic: one row task, several, and a partial one).
    a = graphopt.load(art)
    for batch in (1, 30):
        x = np.random.default_rng(batch).standard_normal((batch, 3, K)).astype(np.float32)
        got = a.run({"x": x})
        got = got["y"] if isinstance(got, dict) else got[0]
        import onnxruntime as ort

        ref = ort.InferenceSession(g.model.SerializeToString()).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-4)


def test_lowbit_kernels_off_decodes_once_at_lower_time(tmp_path):
    """Unfused, the decode is a weight transform run once at lower time: the float weights are stored (laid
    out for their kernel) instead of compiled into main.so as constants, where their GEMMs were ~7x slower."""
    g = _quantized(4, 0)
    res = graphopt.lower(g, "cpu", tmp_path / "a", target_options={"lowbit_kernels": False}, verify=True,
                         data=DataSource(feeds=_feeds()))
    assert res.verification.ok
    assert res.manifest["target"]["lowbit_matmuls"] == 0
    assert res.manifest["target"]["lowbit_kernel"] is None
    decoded = [w for w in res.manifest["weights"] if w["name"].startswith("main.packed") and w["dtype"] == "float32"]
    assert sum(w["nbytes"] for w in decoded) >= 4 * (K * H + N * H)
    assert (Path(res.artifact) / "main.so").stat().st_size < 200_000
    # ... and laid out in the GEMM's panels [N/c, K, c] like a float weight (targets/schedules/gemm.py)
    assert any(len(w["shape"]) == 3 and w["shape"][1] == K for w in decoded), decoded


def test_recognition_is_numerical_not_by_shape():
    """A decode whose scale is altered after the multiply (an extra Mul) is not the quantizer's decode:
    the recognized reading would compute a different weight, so nothing is fused."""
    g = lowbit.named(_quantized(4, 0))
    assert len(lowbit.find_decodes(g)) == 2
    mm = next(n for n in g.graph.node if n.name == "mm")
    w = mm.input[1]
    g.graph.initializer.append(onnx.numpy_helper.from_array(np.array(1.001, np.float32), "tweak"))
    g.graph.node.insert(list(g.graph.node).index(mm),
                        helper.make_node("Mul", [w, "tweak"], ["w_tweaked"], name="tweak_mul"))
    mm.input[1] = "w_tweaked"
    found = lowbit.find_decodes(g)
    assert [d.node for d in found] == ["gemm"]


def test_fused_graph_drops_the_decode_and_keeps_the_codes():
    g = lowbit.named(_quantized(2, 16))
    decodes = lowbit.find_decodes(g)
    fused = lowbit.fuse_decodes(g, decodes)
    kinds = [n.op_type for n in fused.graph.node]
    assert kinds.count(lowbit.OP) == 2 and "Floor" not in kinds and "MatMul" not in kinds, kinds
    names = {t.name for t in fused.graph.initializer}
    assert {d.codes for d in decodes} <= names
    # The graph given stays as it was (the artifact's model.onnx keeps the decode).
    assert "Floor" in {n.op_type for n in g.graph.node}


def test_weight_only_conv_is_decoded_once_at_lower_time(tmp_path):
    """Only MatMul / Gemm weights are fused; a weight-only conv's decode runs once at lower time (its float
    weight stored in the conv kernel's layout), and the artifact verifies."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    m = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
                   [vi("x", [1, 4, 8, 8])], [vi("y", [1, 8, 8, 8])], [init("w", w)])
    g = graphopt.optimize(Graph(m), "quantize(mode=weight-only,bits=4,rounding=nearest)").graph
    res = graphopt.lower(g, "cpu", tmp_path / "a", verify=True)
    assert res.verification.ok and res.manifest["target"]["lowbit_matmuls"] == 0
    assert lowbit.decode_codes(g) and set(lowbit.decode_codes(g)) <= {w["name"] for w in res.manifest["weights"]}
    decoded = [w for w in res.manifest["weights"] if w["name"].startswith("main.packed") and w["dtype"] == "float32"]
    assert sum(w["nbytes"] for w in decoded) >= w.nbytes


def test_large_models_are_checked_a_batch_at_a_time(monkeypatch):
    """The decodes are evaluated in batches bounded by MAX_CONE_BYTES; one weight past it is not fused."""
    g = lowbit.named(_quantized(4, 0))
    calls = []
    real = lowbit._evaluate
    monkeypatch.setattr(lowbit, "_evaluate", lambda *a: calls.append(a[3]) or real(*a))
    monkeypatch.setattr(lowbit, "MAX_CONE_BYTES", 4 * K * H)  # room for the first decoded weight only
    assert [d.node for d in lowbit.find_decodes(g)] == ["mm", "gemm"]
    assert len(calls) == 2
    monkeypatch.setattr(lowbit, "MAX_CONE_BYTES", 4 * N * H)  # the second (smaller) weight only
    assert [d.node for d in lowbit.find_decodes(g)] == ["gemm"]


def test_small_layers_whose_grid_casts_were_folded_are_fused(tmp_path):
    """The default lower pipeline folds small constants: a narrow layer's float16 grids arrive as float32
    (holding float16 values) and are still recognized; a float32 grid that is not float16 is not."""
    rng = np.random.default_rng(0)
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="narrow")], [vi("x", [2, 40])],
                   [vi("y", [2, 8])], [init("w", rng.standard_normal((40, 8)).astype(np.float32))])
    g = graphopt.optimize(Graph(m), "quantize(mode=weight-only,bits=4,rounding=nearest)").graph
    res = graphopt.lower(g, "cpu", tmp_path / "a", verify=True)
    assert res.verification.ok and res.manifest["target"]["lowbit_matmuls"] == 1
    folded = lowbit.named(res.graph)
    grids = [t for t in folded.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and list(t.dims) == [8, 1, 1]]
    assert len(grids) == 2 and len(lowbit.find_decodes(folded)) == 1
    bumped = onnx.numpy_helper.to_array(grids[0]) * np.float32(1 + 2 ** -20)  # not a float16 value any more
    grids[0].CopyFrom(onnx.numpy_helper.from_array(bumped.astype(np.float32), grids[0].name))
    assert lowbit.find_decodes(folded) == []


def test_activation_of_unknown_shape_decodes_at_lower_time(tmp_path):
    """x from a Slice with a run-time end: the importer does not know its shape, so the node is a decode
    (at lower time) and an ordinary matmul instead of the fused call; it still verifies."""
    from onnx import TensorProto

    rng = np.random.default_rng(0)
    m = make_model([helper.make_node("MatMul", ["x2", "w"], ["y"], name="mm")], [vi("x2", [3, K])],
                   [vi("y", [3, H])], [init("w", (rng.standard_normal((K, H)) / 4).astype(np.float32))])
    g = graphopt.optimize(Graph(m), "quantize(mode=weight-only,bits=4,rounding=nearest)").graph.model
    del g.graph.input[:]
    g.graph.input.extend([vi("x", [6, K]), vi("end", [1], TensorProto.INT64)])
    g.graph.initializer.extend([init("start", np.array([0], np.int64)), init("axis", np.array([0], np.int64))])
    g.graph.node.insert(0, helper.make_node("Slice", ["x", "start", "end", "axis"], ["x2"], name="slice"))
    g.graph.output[0].CopyFrom(vi("y", ["a", H]))
    feeds = [{"x": rng.standard_normal((6, K)).astype(np.float32), "end": np.array([e], np.int64)} for e in (3, 5)]
    res = graphopt.lower(Graph(g), "cpu", tmp_path / "a", verify=True, data=DataSource(feeds=feeds))
    assert res.verification.ok and res.manifest["target"]["lowbit_matmuls"] == 0


def test_one_group_wider_than_k_is_recognized():
    """group=1000 on K=72: one group whose codes are padded to 1000 columns."""
    g = lowbit.named(graphopt.optimize(_model(), "quantize(mode=weight-only,bits=4,rounding=nearest,group=1000)").graph)
    found = {d.node: d for d in lowbit.find_decodes(g)}
    assert set(found) == {"mm", "gemm"}
    assert found["mm"].cols == 1000 and found["mm"].group == 1000 and found["mm"].k == K


def test_duplicate_node_names_are_made_unique():
    g = lowbit.named(_quantized(4, 0))
    names = [n.name for n in g.graph.node]
    g.graph.node[0].name = g.graph.node[1].name  # two nodes of one name
    again = [n.name for n in lowbit.named(g).graph.node]
    assert len(set(again)) == len(again) and again[0] == names[1] and again[2:] == names[2:]


def test_a_decoded_weight_read_in_a_nested_subgraph_stays():
    """The fused MatMul's decoded weight is also read two subgraph levels down: its decode is kept."""
    from onnx import TensorProto

    g = lowbit.named(_quantized(4, 0))
    mm = next(n for n in g.graph.node if n.name == "mm")
    w = mm.input[1]
    inner = helper.make_graph([helper.make_node("ReduceSum", [w], ["s_in"], keepdims=0)], "inner", [],
                              [vi("s_in", [], TensorProto.FLOAT)])
    cond = init("cond", np.array(True))
    middle = helper.make_graph([helper.make_node("If", ["cond"], ["s_mid"], then_branch=inner, else_branch=inner)],
                               "middle", [], [vi("s_mid", [], TensorProto.FLOAT)])
    g.graph.initializer.append(cond)
    g.graph.node.append(helper.make_node("If", ["cond"], ["s"], name="outer", then_branch=middle, else_branch=middle))
    g.graph.output.append(vi("s", [], TensorProto.FLOAT))
    fused = lowbit.fuse_decodes(g, lowbit.find_decodes(g))
    assert w in {o for n in fused.graph.node for o in n.output}
