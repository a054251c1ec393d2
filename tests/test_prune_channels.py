"""prune(structure=channel): which channels are tied together, the valid smaller graph, the refit, refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import graphopt
from graphopt.data import DataSource
from graphopt.stats import graph_stats

from .conftest import make_model, ort_run, run_cli, vi


def _conv(name, x, w, out, group=1, pads=1, bias=None):
    ins = [x, w] + ([bias] if bias else [])
    return helper.make_node("Conv", ins, [out], name=name, group=group, pads=[pads] * 4)


def _branchy(seed=0, grouped=True):
    """stem Conv -> BatchNorm -> Relu -> two Convs concatenated -> depthwise Conv -> Relu -> Conv -> Relu ->
    grouped Conv (group=2) -> Flatten (Reshape) -> Gemm -> logits. Exercises coupled BatchNorm, Concat, depthwise
    and a grouped Conv that stops its input's channels."""
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    inits = {
        "w0": w(8, 3, 3, 3), "b0": w(8),
        "bn_s": (rng.uniform(0.5, 1.5, 8)).astype(np.float32), "bn_b": w(8), "bn_m": w(8),
        "bn_v": rng.uniform(0.5, 2, 8).astype(np.float32),
        "wa": w(6, 8, 1, 1), "ba": w(6), "wb": w(6, 8, 3, 3), "bb": w(6),
        "wd": w(12, 1, 3, 3), "bd": w(12),
        "wc": w(16, 12, 3, 3), "bc": w(16),
        "wg": w(8, 8 if grouped else 16, 3, 3), "bg": w(8),
        "shape": np.array([-1, 8 * 8 * 8], np.int64),
        "wf": w(8 * 8 * 8, 10, scale=0.05), "bf": w(10),
    }
    nodes = [
        _conv("stem", "x", "w0", "s0", bias="b0"),
        helper.make_node("BatchNormalization", ["s0", "bn_s", "bn_b", "bn_m", "bn_v"], ["s1"], name="bn"),
        helper.make_node("Relu", ["s1"], ["s"], name="r0"),
        _conv("a", "s", "wa", "ya", pads=0, bias="ba"),
        _conv("b", "s", "wb", "yb", bias="bb"),
        helper.make_node("Concat", ["ya", "yb"], ["cat"], name="cat", axis=1),
        _conv("dw", "cat", "wd", "d0", group=12, bias="bd"),
        helper.make_node("Relu", ["d0"], ["d"], name="r1"),
        _conv("c", "d", "wc", "c0", bias="bc"),
        helper.make_node("Relu", ["c0"], ["c1"], name="r2"),
        _conv("g", "c1", "wg", "g0", group=2 if grouped else 1, bias="bg"),
        helper.make_node("Reshape", ["g0", "shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc"),
    ]
    g = graphopt.Graph(make_model(nodes, [vi("x", ["n", 3, 8, 8])], [vi("logits", ["n", 10])],
                                  [numpy_helper.from_array(v, k) for k, v in inits.items()]))
    feeds = [{"x": rng.standard_normal((16, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    return g, feeds


def _inits(g):
    return {k: numpy_helper.to_array(v) for k, v in g.initializers().items()}


def test_coupled_tensors_are_pruned_together_and_the_graph_stays_valid():
    g, feeds = _branchy()
    before = g.to_bytes()
    res = graphopt.optimize(g, "prune(structure=channel,ratio=0.34)", data=DataSource(feeds=feeds))
    assert g.to_bytes() == before  # the input graph is not changed
    out = res.graph
    onnx.checker.check_model(out.model, full_check=True)
    w = _inits(out)
    node = {n.name: n for n in out.graph.node}
    # stem's 8 channels: 3 go from its filters, the BatchNorm's four vectors and both branch convs' inputs
    assert w[node["stem"].input[1]].shape[0] == 5
    for i in range(1, 5):
        assert w[node["bn"].input[i]].shape == (5,)
    assert w[node["a"].input[1]].shape == (4, 5, 1, 1) and w[node["b"].input[1]].shape == (4, 5, 3, 3)
    # the concat of 6 + 6 channels keeps 4 + 4; the depthwise conv follows with its weight, bias and group
    assert w[node["dw"].input[1]].shape == (8, 1, 3, 3) and w[node["dw"].input[2]].shape == (8,)
    assert {a.name: a.i for a in node["dw"].attribute}["group"] == 8
    assert w[node["c"].input[1]].shape == (16, 8, 3, 3)  # c's filters feed a grouped conv: kept
    det = res.records[0].details
    assert "feed Conv g with group=2" in det["not_pruned"]["c"]
    assert "reach graph output" in det["not_pruned"]["fc"]
    assert det["flops"]["after"] < det["flops"]["before"] == graph_stats(g).flops
    y = ort_run(out, feeds[0])[0]
    assert y.shape == (16, 10) and np.isfinite(y).all()


def test_flatten_reshape_follows_the_channels():
    """Reshape [N, C, H, W] -> [N, C*H*W] before a Gemm: the Gemm loses H*W rows per channel and the shape
    constant is rewritten (the same model without the grouped conv)."""
    g, feeds = _branchy(grouped=False)
    res = graphopt.optimize(g, "prune(structure=channel,ratio=0.25)", data=DataSource(feeds=feeds))
    w = _inits(res.graph)
    node = {n.name: n for n in res.graph.graph.node}
    assert w[node["g"].input[1]].shape[0] == 6
    assert w[node["fc"].input[1]].shape == (6 * 64, 10)
    assert w[node["flatten"].input[1]].tolist() == [-1, 6 * 64]
    assert ort_run(res.graph, feeds[0])[0].shape == (16, 10)


@pytest.mark.parametrize("keep,total,multiple,expected", [
    (11, 16, 8, 8), (12, 16, 8, 8), (13, 16, 8, 16), (22, 32, 8, 24), (45, 64, 8, 48), (3, 32, 8, 8),
    (5, 8, 8, 5), (11, 16, 1, 11), (45, 64, 4, 44)])
def test_kept_channels_round_to_vector_friendly_counts(keep, total, multiple, expected):
    from graphopt.passes._structured import kept_channels

    assert kept_channels(keep, total, multiple) == expected


def test_a_single_channel_layer_is_left_whole():
    """A 1-channel bottleneck cannot lose a channel: it is listed, the other groups are pruned."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (8, 16)), ("w2", (16, 1)), ("w3", (1, 3)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["b"], name="bottleneck"),
             helper.make_node("MatMul", ["b", "w3"], ["y"], name="fc3")]
    g = graphopt.Graph(make_model(nodes, [vi("x", ["n", 8])], [vi("y", ["n", 3])], inits))
    res = graphopt.optimize(g, "prune(structure=channel,ratio=0.5,compensate=false)")
    det = res.records[0].details
    assert det["groups"] == [{"layers": ["fc1"], "channels": 16, "removed": 8}]
    assert "single output channel" in det["not_pruned"]["bottleneck"]
    assert ort_run(res.graph, {"x": np.ones((2, 8), np.float32)})[0].shape == (2, 3)


def _rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.torch
def test_residual_adds_join_their_layers_and_the_refit_cuts_the_error(torch_models):
    mod, ex = torch_models["cnn"]
    g = graphopt.capture(mod, ex)
    rng = np.random.default_rng(0)
    feeds = [{g.inputs[0].name: rng.standard_normal((2, 3, 32, 32)).astype(np.float32)} for _ in range(4)]
    ref = ort_run(g, feeds[0])[0]
    out = {}
    for comp in ("true", "false"):
        res = graphopt.optimize(g, f"fold-batchnorm,prune(structure=channel,ratio=0.25,multiple=1,"
                                   f"compensate={comp})",
                                data=DataSource(feeds=feeds))
        out[comp] = ort_run(res.graph, feeds[0])[0]
        det = res.records[1].details
    groups = {tuple(gr["layers"]) for gr in det["groups"]}
    # the stem and both blocks' second convs add into one residual stream: one group of three
    assert any(len(gr) == 3 for gr in groups), groups
    assert all(gr["removed"] == 4 for gr in det["groups"])
    e_fit, e_raw = _rel_err(out["true"], ref), _rel_err(out["false"], ref)
    assert e_fit < 0.7 * e_raw, (e_fit, e_raw)


@pytest.mark.torch
def test_transformer_prunes_mlp_hidden_units_and_lists_the_rest(torch_models):
    mod, ex = torch_models["transformer"]
    g = graphopt.capture(mod, ex)
    rng = np.random.default_rng(0)
    feeds = [{g.inputs[0].name: rng.standard_normal((2, 16, 64)).astype(np.float32)} for _ in range(4)]
    res = graphopt.optimize(g, "prune(structure=channel,ratio=0.5)", data=DataSource(feeds=feeds))
    det = res.records[0].details
    assert [gr["channels"] for gr in det["groups"]] == [128, 128]  # each layer's feed-forward hidden units
    assert det["not_pruned"]  # attention projections and the residual stream, each with its reason
    assert all(isinstance(v, str) and v for v in det["not_pruned"].values())
    assert ort_run(res.graph, feeds[0])[0].shape == (2, 16, 64)


def test_deterministic_bytes():
    g, feeds = _branchy()
    a = graphopt.optimize(g, "prune(structure=channel,ratio=0.3)", data=DataSource(feeds=feeds)).graph
    b = graphopt.optimize(g, "prune(structure=channel,ratio=0.3)", data=DataSource(feeds=feeds)).graph
    assert a.to_bytes() == b.to_bytes()


def test_pruned_graph_lowers_and_verifies(tmp_path):
    g, feeds = _branchy()
    res = graphopt.optimize(g, "prune(structure=channel,ratio=0.3)", data=DataSource(feeds=feeds))
    graphopt.lower(res.graph, "cpu", tmp_path / "art", verify=True)
    assert (tmp_path / "art" / "manifest.json").exists()


# ------------------------------------------------------------------------------------------ refusals
def _mlp(hidden=4):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (8, hidden)), ("w2", (hidden, 3)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    return graphopt.Graph(make_model(nodes, [vi("x", ["n", 8])], [vi("y", ["n", 3])], inits))


@pytest.mark.parametrize("model,passes,message", [
    ("mlp", "prune(structure=channel)", "structure=channel needs option 'ratio'"),
    ("mlp", "prune(structure=channel,ratio=0)", "option 'ratio' must be in (0, 1)"),
    ("mlp", "prune(structure=channel,ratio=1)", "option 'ratio' must be in (0, 1)"),
    ("mlp", "prune(structure=channel,ratio=0.5,sparsity=0.5)", "option 'sparsity' applies to single weights"),
    ("mlp", "prune(ratio=0.5)", "option 'ratio' applies to structure=channel"),
    ("mlp", "prune(structure=filter,ratio=0.5)", "option 'structure' must be one of weight, channel"),
    ("mlp", "prune(structure=channel,ratio=0.9,compensate=false)", "would remove all 4 output channels of fc1"),
    ("mlp", "prune(structure=channel,ratio=0.01,compensate=false)", "removes no channel of any group"),
    ("mlp", "prune(sparsity=0.5,multiple=4)", "option 'multiple' applies to structure=channel"),
    ("single", "prune(structure=channel,ratio=0.5,compensate=false)", "found no channel group it can prune"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, model, passes, message):
    if model == "mlp":
        _mlp().save(tmp_path / "m.onnx")
    else:
        w = numpy_helper.from_array(np.ones((8, 3), np.float32), "w")
        graphopt.Graph(make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                                  [vi("x", ["n", 8])], [vi("y", ["n", 3])], [w])).save(tmp_path / "m.onnx")
    code = run_cli("optimize", tmp_path / "m.onnx", "--passes", passes, "-o", tmp_path / "out.onnx")
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "out.onnx").exists()
