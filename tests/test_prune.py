"""The prune pass: options and refusals, exact sparsity and N:M structure, compensation, accuracy on digits."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import graphopt
from graphopt.accuracy import EvalSet
from graphopt.data import DataSource
from graphopt.errors import ModelError
from graphopt.passes import _prune_math as pm
from graphopt.passes import _sparse as sp
from graphopt.passes.prune import GLOBAL_CAP
from graphopt.reference import run_reference

from .conftest import make_model, ort_run, run_cli, vi
from .test_quantize import _feeds, _layers_model

LAYER_WEIGHTS = {"conv_grouped": "w1", "conv_1x1": "w2", "gemm": "w3", "matmul": "w4"}


def _w2(g: graphopt.Graph, name: str) -> np.ndarray:
    """A layer's weight of :func:`_layers_model` as [out, in] (MatMul's is stored [in, out])."""
    w = numpy_helper.to_array(g.initializers()[name])
    return w.T if name == "w4" else w.reshape(w.shape[0], -1)


def _single_matmul(k=24, n=12, seed=0):
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")
    g = graphopt.Graph(make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                                  [vi("x", ["n", k])], [vi("y", ["n", n])], [w]))
    mix = rng.standard_normal((k * 2 // 3, k))  # correlated inputs (as activations are): what compensation exploits
    feeds = [{"x": (rng.standard_normal((128, k * 2 // 3)) @ mix * 0.3 + 0.1 * rng.standard_normal((128, k))
                    + 0.5).astype(np.float32)} for _ in range(4)]
    return g, feeds


# --------------------------------------------------------------------------------------- refusals
@pytest.fixture
def mm_file(tmp_path):
    g, feeds = _single_matmul()
    g.save(tmp_path / "m.onnx")
    return tmp_path


@pytest.mark.parametrize("passes,message", [
    ("prune(sparsity=1.0)", "option 'sparsity' must be in [0, 1)"),
    ("prune(sparsity=-0.1)", "option 'sparsity' must be in [0, 1)"),
    ("prune(sparsity=abc)", "option 'sparsity' expects float"),
    ("prune", "option 'sparsity'"),
    ("prune(pattern=4:4)", "option 'pattern'"),
    ("prune(pattern=0:4)", "option 'pattern'"),
    ("prune(pattern=5:4)", "option 'pattern'"),
    ("prune(pattern=x)", "option 'pattern' must be N:M"),
    ("prune(pattern=2:)", "option 'pattern' must be N:M"),
    ("prune(sparsity=0.5,pattern=2:4)", "'sparsity' or option 'pattern', not both"),
    ("prune(sparsity=0.5,importance=hessian)", "option 'importance' must be one of auto, magnitude, activation"),
    ("prune(sparsity=0.5,scope=model)", "option 'scope' must be one of auto, layer, global"),
    ("prune(pattern=2:4,scope=global)", "option 'scope' applies to 'sparsity'"),
    ("prune(sparsity=0.5,compensate=true)", "needs calibration data"),
    ("prune(sparsity=0.5,importance=activation)", "needs calibration data"),
    ("prune(sparsity=0.5,storage=csr)", "option 'storage' must be one of auto, dense, sparse"),
])
def test_bad_options_are_one_line_exit_2_and_write_nothing(mm_file, capsys, passes, message):
    d = mm_file
    code = run_cli("optimize", d / "m.onnx", "--passes", passes, "-o", d / "out.onnx")
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert not (d / "out.onnx").exists()


def test_magnitude_without_compensation_needs_no_data(mm_file, capsys):
    d = mm_file
    assert run_cli("optimize", d / "m.onnx", "--passes", "prune(sparsity=0.5,storage=dense)", "-o", d / "out.onnx") == 0
    w = numpy_helper.to_array(onnx.load(d / "out.onnx").graph.initializer[0])
    assert np.count_nonzero(w == 0) == w.size // 2


def test_a_graph_without_layers_comes_back_unchanged():
    m = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [vi("x", [2, 3])], [vi("y", [2, 3])])
    g = graphopt.Graph(m)
    res = graphopt.optimize(g, "prune(sparsity=0.5)")
    assert res.records[0].details["pruned_layers"] == 0
    assert "0 layer(s) pruned" in res.records[0].details["summary"]
    assert [n.op_type for n in res.graph.graph.node] == ["Relu"]


# ------------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("extra", ["compensate=false,importance=magnitude", "importance=activation"])
@pytest.mark.parametrize("sparsity", [0.3, 0.75])
def test_scope_layer_prunes_every_layer_exactly(sparsity, extra):
    g = _layers_model()
    res = graphopt.optimize(g, f"prune(sparsity={sparsity},{extra},scope=layer,storage=dense)",
                            data=DataSource(feeds=_feeds()))
    details = res.records[0].details
    assert details["pruned_layers"] == 4 and details["compensate"] == ("activation" in extra)
    total = 0
    for key, name in LAYER_WEIGHTS.items():
        w = _w2(res.graph, name)
        k = int(sparsity * w.size + 0.5)
        assert np.count_nonzero(w == 0) == k, key
        assert not np.signbit(w[w == 0]).any()  # +0.0, not -0.0
        assert details["layers"][key]["pruned"] == k and details["layers"][key]["sparsity"] == round(k / w.size, 6)
        total += w.size
    assert details["weights_total"] == total
    assert details["sparsity"] == round(details["weights_pruned"] / total, 6)
    if "compensate=false" in extra:  # the survivors are untouched and are the largest of each layer
        for name in LAYER_WEIGHTS.values():
            before, after = _w2(g, name), _w2(res.graph, name)
            kept = after != 0
            np.testing.assert_array_equal(after[kept], before[kept])
            assert np.abs(before[kept]).min() >= np.abs(before[~kept]).max()


def test_scope_global_hits_the_overall_sparsity():
    g = _layers_model()
    res = graphopt.optimize(g, "prune(sparsity=0.6,scope=global,storage=dense)")
    details = res.records[0].details
    ws = [_w2(res.graph, n) for n in LAYER_WEIGHTS.values()]
    total = sum(w.size for w in ws)
    zeros = sum(np.count_nonzero(w == 0) for w in ws)
    assert zeros == details["weights_pruned"] == int(0.6 * total + 0.5)
    per = [details["layers"][k]["sparsity"] for k in LAYER_WEIGHTS]
    assert len(set(per)) > 1 and max(per) <= GLOBAL_CAP  # one threshold: the layers differ


def test_scope_global_with_data_spends_the_budget_where_the_output_error_grows_least():
    """With data, the defaults are scope=global (budget by output error), activation importance and
    compensation; the overall count is exact and no layer goes past the cap."""
    g = _layers_model()
    res = graphopt.optimize(g, "prune(sparsity=0.6,storage=dense)", data=DataSource(feeds=_feeds()))
    details = res.records[0].details
    assert details["scope"] == "global" and details["importance"] == "activation" and details["compensate"]
    ws = [_w2(res.graph, n) for n in LAYER_WEIGHTS.values()]
    assert sum(np.count_nonzero(w == 0) for w in ws) == int(0.6 * sum(w.size for w in ws) + 0.5)
    assert max(details["layers"][k]["sparsity"] for k in LAYER_WEIGHTS) <= GLOBAL_CAP


def test_error_counts_follow_the_cheapest_curve():
    flat = [(0, 0.0), (50, 0.01), (90, 0.02), (98, 0.5)]  # cheap to prune
    steep = [(0, 0.0), (50, 0.3), (90, 0.9), (98, 1.0)]
    assert pm.error_counts([flat, steep], 90) == [90, 0]
    assert pm.error_counts([flat, steep], 120) == [90, 30]
    assert pm.error_counts([flat, steep], 0) == [0, 0]
    assert pm.error_counts([steep, flat], 196) == [98, 98]  # the whole budget when it is all there is


def test_global_counts_never_empty_a_layer():
    """A layer whose scores are all below the others' would be removed whole; it is held at the cap."""
    small = np.full((10, 10), 0.01) + np.arange(100).reshape(10, 10) * 1e-4
    big = np.random.default_rng(0).uniform(1.0, 2.0, (20, 20))
    counts = pm.global_counts([small, big], total=150, cap=0.98)
    assert counts == [98, 52]
    assert pm.global_counts([small, big], total=50, cap=0.98) == [50, 0]


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:8"])
@pytest.mark.parametrize("compensate", [False, True])
def test_n_m_pattern_holds_group_by_group(pattern, compensate):
    n, m = map(int, pattern.split(":"))
    g = _layers_model()
    res = graphopt.optimize(g, f"prune(pattern={pattern},compensate={str(compensate).lower()},"
                               "importance=magnitude,storage=dense)",
                            data=DataSource(feeds=_feeds()))
    assert res.records[0].details["pattern"] == pattern
    for key, name in LAYER_WEIGHTS.items():
        w = _w2(res.graph, name)
        before = _w2(g, name)
        cols = w.shape[1]
        for c0 in range(0, cols, m):
            grp = w[:, c0:c0 + m]
            t = grp.shape[1]
            keep = n if t == m else -(-n * t // m)  # a short last group keeps ceil(n * t / m)
            assert (np.count_nonzero(grp, axis=1) == keep).all(), (key, c0)
            if not compensate:  # the kept ones are the largest of their group
                b = np.abs(before[:, c0:c0 + m])
                kept = grp != 0
                assert (np.where(kept, b, np.inf).min(axis=1) >= np.where(kept, -np.inf, b).max(axis=1)).all()
    # conv_grouped has 18 columns: four groups of 4 and a tail of 2 (1:4 and 2:4 keep 1 of those, 3:8 keeps 1)
    assert _w2(g, "w1").shape[1] == 18


def test_nm_mask_tail():
    score = np.arange(10, dtype=float)[None, :].repeat(3, axis=0)
    mask = pm.nm_mask(score, 2, 4)
    assert mask[0].tolist() == [True, True, False, False, True, True, False, False, True, False]


# ---------------------------------------------------------------------------------- compensation
def test_compensation_reduces_the_layer_output_error_at_the_same_mask():
    g, feeds = _single_matmul()
    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    w = numpy_helper.to_array(g.initializers()["w"]).astype(np.float64)
    err = {}
    for comp in ("false", "true"):
        res = graphopt.optimize(g, f"prune(sparsity=0.5,compensate={comp},storage=dense)", data=DataSource(feeds=feeds))
        wp = numpy_helper.to_array(res.graph.initializers()["w"]).astype(np.float64)
        err[comp] = (np.linalg.norm(x @ w - x @ wp), wp == 0)
        # the layer's output on the calibration data, as ONNX Runtime computes it
        y = np.concatenate([ort_run(res.graph, f)[0] for f in feeds])
        np.testing.assert_allclose(y, x @ wp, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(err["false"][1], err["true"][1])  # same mask (magnitude)
    assert err["true"][0] < 0.7 * err["false"][0], err


def test_obs_compensate_numerics(monkeypatch):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1024, 40)) @ rng.standard_normal((40, 40))
    w = rng.standard_normal((16, 40))
    for n, m in ((2, 4), (1, 4)):
        mask = pm.nm_mask(pm.importance(w, None), n, m)
        plain = np.linalg.norm(x @ (w - np.where(mask, 0.0, w)).T)
        exact = pm.obs_compensate(w, x.T @ x, mask)  # small: every row solved exactly
        assert (exact[mask] == 0).all() and (exact[~mask] != 0).all()
        assert np.linalg.norm(x @ (w - exact).T) < 0.9 * plain
        monkeypatch.setattr(pm, "EXACT_FLOPS", 0)  # large layers: column by column (SparseGPT)
        seq = pm.obs_compensate(w, x.T @ x, mask, block=16)  # blocks smaller than the row: the lazy updates
        assert (seq[mask] == 0).all() and (seq[~mask] != 0).all()
        assert np.linalg.norm(x @ (w - exact).T) <= np.linalg.norm(x @ (w - seq).T) < plain
        np.testing.assert_allclose(seq, pm.obs_compensate(w, x.T @ x, mask, block=128), rtol=1e-9, atol=1e-9)
        monkeypatch.undo()


# ------------------------------------------------------------------------ determinism and validity
def test_deterministic_bytes():
    g = _layers_model()
    outs = [graphopt.optimize(g, "prune(sparsity=0.5,importance=activation)", data=DataSource(feeds=_feeds()))
            .graph.to_bytes() for _ in range(2)]
    assert outs[0] == outs[1]


def test_pruned_model_runs_in_onnx_runtime_and_lowers(tmp_path):
    g = _layers_model()
    res = graphopt.optimize(g, "prune(pattern=2:4,importance=activation)", data=DataSource(feeds=_feeds()))
    onnx.checker.check_model(res.graph.model)
    feed = _feeds(1, seed=11)[0]
    y = ort_run(res.graph, feed)[0]
    assert y.shape == (4, 10) and np.isfinite(y).all()
    art = graphopt.lower(res.graph, "cpu", tmp_path / "art", verify=True)
    assert art is not None
    out = graphopt.load(tmp_path / "art").run(feed)
    out = out["y"] if isinstance(out, dict) else out[0]
    np.testing.assert_allclose(out, y, rtol=1e-3, atol=1e-3)


# -------------------------------------------------------------------------------- sparse storage
def _run_decode(w: np.ndarray) -> np.ndarray:
    """The emitted decode alone, as ONNX Runtime runs it (the model's only output is the decoded weight)."""
    import onnx_graphsurgeon as gs
    import onnxruntime as ort

    from graphopt.passes._emit import Builder, Namer

    g = gs.Graph(opset=17)
    out = sp.emit_decode(Builder(g, Namer(set(), 17), "w", np.float32), *sp.encode(w), w.shape)
    out.dtype, out.shape = np.float32, list(w.shape)
    g.outputs = [out]
    sess = ort.InferenceSession(gs.export_onnx(g).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {})[0]


def test_sparse_decode_is_bit_exact():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((7, 3, 5)).astype(np.float32)  # 105 weights: not a multiple of 8
    w[rng.random(w.shape) < 0.6] = 0.0
    w.flat[[1, 2, 50]] = [-0.0, np.float32(1e-45), -np.float32(3e38)]  # a kept -0.0, a denormal, a large one
    for case in (w, np.zeros((4, 4), np.float32), np.ones((3, 8), np.float32), w.reshape(-1)[:1]):
        values, packed = sp.encode(case)
        assert values.dtype == np.float32 and packed.dtype == np.uint8 and packed.size == -(-case.size // 8)
        assert values.size == 1 + np.count_nonzero(case.view(np.uint32))
        for got in (sp.decode(values, packed, case.shape), _run_decode(case)):
            assert got.shape == case.shape
            np.testing.assert_array_equal(got.view(np.uint32), case.view(np.uint32))


@pytest.mark.parametrize("spec", ["sparsity=0.5,importance=activation", "pattern=2:4"])
def test_sparse_storage_runs_identically_to_dense(spec):
    g = _layers_model()
    feed = _feeds(1, seed=11)[0]
    res = {st: graphopt.optimize(g, f"prune({spec},storage={st})", data=DataSource(feeds=_feeds()))
           for st in ("dense", "sparse")}
    d = res["sparse"].records[0].details
    assert d["sparse_layers"] == 4 and all(v["storage"] == "sparse" for v in d["layers"].values())
    assert res["dense"].records[0].details["weight_bytes"]["ratio"] == 1.0
    assert d["weight_bytes"]["before"] == 4 * d["weights_total"] and d["weight_bytes"]["ratio"] > 1.4, d
    onnx.checker.check_model(res["sparse"].graph.model)
    assert not {t.name for t in res["sparse"].graph.graph.initializer} & set(LAYER_WEIGHTS.values())
    assert np.array_equal(ort_run(res["sparse"].graph, feed)[0], ort_run(res["dense"].graph, feed)[0])


def test_sparse_model_lowers_and_verifies_and_is_deterministic(tmp_path):
    g = _layers_model()
    a, b = (graphopt.optimize(g, "prune(sparsity=0.9,storage=sparse)").graph for _ in range(2))
    assert a.to_bytes() == b.to_bytes()
    feed = _feeds(1, seed=11)[0]
    y = ort_run(a, feed)[0]
    res = graphopt.lower(a, "cpu", tmp_path / "art", verify=True)
    out = graphopt.load(tmp_path / "art").run(feed)
    out = out["y"] if isinstance(out, dict) else out[0]
    np.testing.assert_allclose(out, y, rtol=1e-4, atol=1e-5)
    # The CPU target decodes the weights once, at lower time (stored dense for the kernels), not every run.
    assert "not lifted" not in res.native_log
    assert any(w["name"].startswith("main.packed") for w in res.manifest["weights"])
    # ... and says so: dense kernels, not sparse ones
    assert res.manifest["target"]["decoded_weight_bytes"] > 0 and "run on the dense float kernels" in res.native_log


def test_sparse_storage_needs_opset_11():
    g = _layers_model(opset=10)
    with pytest.raises(ModelError, match="storage=sparse"):
        graphopt.optimize(g, "prune(sparsity=0.9,storage=sparse)")
    d = graphopt.optimize(g, "prune(sparsity=0.9)").records[0].details
    assert d["sparse_layers"] == 0 and "opset 10" in d["storage_dense_why"]


# ---------------------------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def digits(digits_trained):
    return digits_trained


def _accuracy(digits, model, pipeline) -> dict:
    d = digits["data"]
    ev = EvalSet([d["eval"]], d["labels"], source="digits held-out")
    res = graphopt.optimize(digits[model], pipeline, data=DataSource(feeds=[d["calib"]]), eval=ev)
    return res.report["accuracy"]


@pytest.mark.torch
def test_digits_cnn_half_sparse_keeps_its_accuracy(digits):
    acc = _accuracy(digits, "cnn", "prune(sparsity=0.5,importance=activation,compensate=true)")
    print("cnn 0.5 activation+compensate:", acc["float"], "->", acc["final"])
    assert acc["float"] > 95 and acc["drop"] <= 1.0, acc


@pytest.mark.torch
def test_digits_cnn_90_percent_within_three_points_and_three_times_smaller(digits, tmp_path):
    """The issue's bar: prune(sparsity=0.9) with data (global budget by output error, activation importance,
    compensation) loses at most 3 points, and the file is at least 3x smaller; plain magnitude per layer
    is far worse."""
    d = digits["data"]
    ev = EvalSet([d["eval"]], d["labels"], source="digits held-out")
    res = graphopt.optimize(digits["cnn"], "prune(sparsity=0.9)", data=DataSource(feeds=[d["calib"]]), eval=ev)
    good = res.report["accuracy"]
    plain = _accuracy(digits, "cnn", "prune(sparsity=0.9,compensate=false,importance=magnitude,scope=layer)")
    digits["cnn"].save(tmp_path / "float.onnx")
    res.graph.save(tmp_path / "pruned.onnx")
    ratio = (tmp_path / "float.onnx").stat().st_size / (tmp_path / "pruned.onnx").stat().st_size
    print("cnn 0.9:", good["float"], "->", good["final"], f"file {ratio:.2f}x smaller; magnitude/layer",
          plain["final"])
    assert good["drop"] <= 3.0 and ratio >= 3.0, (good, ratio)
    assert good["final"] > plain["final"] + 5, (good, plain)


@pytest.mark.torch
@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_digits_sparse_storage_shrinks_the_file(digits, model, tmp_path):
    g = digits[model]
    g.save(tmp_path / "float.onnx")
    size = {"float": (tmp_path / "float.onnx").stat().st_size}
    for spec in ("sparsity=0.9", "sparsity=0.5"):
        for st in ("dense", "sparse", "auto"):
            res = graphopt.optimize(g, f"prune({spec},storage={st}),cleanup")
            assert res.records[0].details["storage"] == st
            res.graph.save(tmp_path / f"{spec}-{st}.onnx")
            size[spec, st] = (tmp_path / f"{spec}-{st}.onnx").stat().st_size
        cleaned = graphopt.optimize(graphopt.Graph(res.graph.model), "cleanup").graph  # cleanup keeps the decode
        assert len(cleaned.to_bytes()) <= size[spec, "auto"] and "CumSum" in {n.op_type for n in cleaned.graph.node}
        # auto picks per layer what is smaller: never above both forms
        assert size[spec, "auto"] <= min(size[spec, "dense"], size[spec, "sparse"]) * 1.01, size
    ratio = size["float"] / size["sparsity=0.9", "sparse"]
    print(f"{model}: float {size['float']} B; 0.9 sparse {ratio:.2f}x smaller; 0.5 auto "
          f"{size['float'] / size['sparsity=0.5', 'auto']:.2f}x smaller")
    assert ratio >= 3.0, size


@pytest.mark.torch
def test_digits_cnn_channel_pruning_cuts_flops_within_two_points(digits):
    d = digits["data"]
    ev = EvalSet([d["eval"]], d["labels"], source="digits held-out")
    res = graphopt.optimize(digits["cnn"], "prune(structure=channel,ratio=0.3)",
                            data=DataSource(feeds=[d["calib"]]), eval=ev)
    acc, det = res.report["accuracy"], res.records[0].details
    print("cnn channel 0.3:", acc["float"], "->", acc["final"], det["flops"])
    assert det["flops"]["cut"] >= 0.30 and acc["drop"] <= 2.0, (acc, det["flops"])
