"""The share pass: options, exact decodes, exact binary/ternary/few-valued weights, merging, determinism, digits."""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper, numpy_helper

import graphopt
from graphopt.accuracy import EvalSet
from graphopt.data import DataSource
from graphopt.errors import ModelError
from graphopt.passes import _codebook as cb
from graphopt.passes._emit import Builder

from .conftest import make_model, ort_run, run_cli, vi
from .test_quantize import _layers_model


def _model(opset=17, w1=None, w3=None, w4=None, twin=False):
    """Conv 3x3 (stride 2) -> Conv 1x1 -> Flatten -> Gemm(transB) -> MatMul: layers large enough to share.
    ``twin``: a second Gemm beside the first with an identical weight of its own, the two added."""
    rng = np.random.default_rng(3)
    ws = {"w1": rng.standard_normal((16, 4, 3, 3)) * 0.3 if w1 is None else w1, "b1": rng.standard_normal(16),
          "w2": rng.standard_normal((16, 16, 1, 1)) * 0.3,
          "w3": rng.standard_normal((64, 144)) * 0.1 if w3 is None else w3, "b3": rng.standard_normal(64),
          "w4": rng.standard_normal((64, 10)) * 0.2 if w4 is None else w4}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv_1x1"),
        helper.make_node("Flatten", ["c2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["g", "w4"], ["y"], name="matmul"),
    ]
    if twin:
        ws["w3_copy"] = ws["w3"]
        nodes[5:5] = [helper.make_node("Gemm", ["f", "w3_copy"], ["g2"], name="gemm_copy", transB=1),
                      helper.make_node("Add", ["g", "g2"], ["gg"], name="add")]
        nodes[-1].input[0] = "gg"
    inits = [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in ws.items()]
    return graphopt.Graph(make_model(nodes, [vi("x", ["n", 4, 6, 6])], [vi("y", ["n", 10])], inits, opset=opset))


WEIGHTS = {"conv": "w1", "conv_1x1": "w2", "gemm": "w3", "matmul": "w4"}


def _feeds(count=4, seed=4):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((8, 4, 6, 6)).astype(np.float32)} for _ in range(count)]


def _weights_in_ort(g: graphopt.Graph, extra=()) -> dict:
    """Each layer's weight as the graph computes it (ONNX Runtime), by layer name; and ``extra`` tensors."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(g.model)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    names = {n.name: n.input[1] for n in m.graph.node if n.name in WEIGHTS}
    wanted = [v for v in list(names.values()) + list(extra) if v not in inits]
    m.graph.output.extend(helper.make_empty_tensor_value_info(v) for v in wanted)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    got = dict(zip(wanted, ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
                   .run(wanted, _feeds(1)[0])))
    got.update({k: v for k, v in inits.items()})
    return {**{k: got[v] for k, v in names.items()}, **{v: got[v] for v in extra}}


def _w(g: graphopt.Graph, name: str) -> np.ndarray:
    return numpy_helper.to_array(g.initializers()[name])


# --------------------------------------------------------------------------------------- refusals
@pytest.fixture
def model_file(tmp_path):
    _model().save(tmp_path / "m.onnx")
    return tmp_path


@pytest.mark.parametrize("passes,message", [
    ("share(bits=0)", "option 'bits' must be in 1..8"),
    ("share(bits=9)", "option 'bits' must be in 1..8"),
    ("share(bits=x)", "option 'bits' expects int"),
    ("share(merge=0)", "option 'merge' must be in (0, 1]"),
    ("share(merge=0.9,exact=true)", "option 'exact' applies to 'bits'"),
    ("share(merge=1.5)", "option 'merge' must be in (0, 1]"),
    ("share(merge=-0.5,bits=4)", "option 'merge' must be in (0, 1]"),
    ("share", "option 'bits' (1..8) or option 'merge'"),
    ("share(per=channel)", "option 'bits' (1..8) or option 'merge'"),
    ("share(merge=0.9,per=channel)", "option 'per' applies to 'bits'"),
    ("share(bits=4,per=row)", "option 'per' must be one of tensor, channel"),
])
def test_bad_options_are_one_line_exit_2_and_write_nothing(model_file, capsys, passes, message):
    d = model_file
    code = run_cli("optimize", d / "m.onnx", "--passes", passes, "-o", d / "out.onnx")
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0] and "pass 'share'" in lines[0] and "Traceback" not in err, err
    assert not (d / "out.onnx").exists()


def test_needs_opset_11_and_a_graph_without_layers_comes_back_unchanged():
    with pytest.raises(ModelError, match="opset 11"):
        graphopt.optimize(_layers_model(opset=10), "share(bits=4)")
    m = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [vi("x", [2, 3])], [vi("y", [2, 3])])
    res = graphopt.optimize(graphopt.Graph(m), "share(bits=4)")
    assert res.records[0].details["shared_layers"] == 0
    assert [n.op_type for n in res.graph.graph.node] == ["Relu"]


# ------------------------------------------------------------------------------------ exact decodes
def _run_decode(encs: list[dict], bits: int) -> list:
    """The unpacking of ``encs``' indices together and each one's lookup, alone, as ONNX Runtime runs them:
    [weight, indices] per encoding."""
    import onnxruntime as ort

    g = gs.Graph(opset=17)
    namer = cb.ShortNamer(set(), 17)
    outs = []
    for e, idx in zip(encs, cb.emit_unpack(Builder(g, namer, "share", np.float32), [e["index"] for e in encs],
                                           bits)):
        w = cb.emit_lookup(Builder(g, namer, "w", np.float32), idx, e, e["shape"])
        w.dtype, w.shape, idx.dtype = np.float32, list(e["shape"]), np.int32
        outs += [w, idx]
    g.outputs = outs
    return ort.InferenceSession(gs.export_onnx(g).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_decode_is_exactly_codebook_of_indices(axis):
    rng = np.random.default_rng(1)
    for bits in range(1, 9):
        # 35, 144, 3 and 1320 values: not multiples of 8, and several layers unpacked together
        encs = [cb.encode(rng.standard_normal(shape).astype(np.float32), axis, bits)
                for shape in ((7, 5), (16, 9), (3, 1), (40, 33))]
        for b in sorted({e["bits"] for e in encs}):
            part = [e for e in encs if e["bits"] == b]
            assert b <= bits and all(cb.unpack(cb.pack(e["index"], b), b, e["index"].size).tolist()
                                     == e["index"].tolist() for e in part)
            got = _run_decode(part, b)
            for e, w, idx in zip(part, got[0::2], got[1::2]):
                np.testing.assert_array_equal(idx.reshape(-1), e["index"])
                ref = e["codebook"][idx.reshape(e["shape"])] if axis is None else \
                    np.take_along_axis(e["codebook"], idx.reshape(e["shape"]), axis=1 - axis)
                np.testing.assert_array_equal(w, ref)
                np.testing.assert_array_equal(w, cb.decode(e))
                entries = e["codebook"] if axis is None else e["codebook"][0] if axis == 0 else e["codebook"][:, 0]
                assert e["entries"] <= 2 ** bits and len(np.unique(entries)) <= e["entries"]


@pytest.mark.parametrize("spec", ["bits=3", "bits=4,per=channel", "bits=2,merge=0.3", "merge=0.3"])
def test_pass_output_decodes_in_onnx_runtime_to_what_the_record_says(spec):
    g = _model()
    res = graphopt.optimize(g, f"share({spec})", data=DataSource(feeds=_feeds()))
    onnx.checker.check_model(res.graph.model)
    d = res.records[0].details
    assert d["shared_layers"] >= 2, d
    nodes = {n.name: n for n in res.graph.graph.node}
    producers = {o: n for n in res.graph.graph.node for o in n.output}
    extra = []
    for key in d["layers"]:
        last = producers[nodes[key].input[1]]
        assert last.op_type == "Reshape" and last.input[1] in res.graph.initializers()  # lowbit's recognition
        gather = producers[last.input[0]]
        extra += [x for x in gather.input if x not in res.graph.initializers()]
    got = _weights_in_ort(res.graph, extra)
    inits = {t.name: numpy_helper.to_array(t) for t in res.graph.graph.initializer}
    for key, rec in d["layers"].items():
        w, orig = got[key], _w(g, WEIGHTS[key])
        assert w.shape == orig.shape and w.dtype == np.float32
        err = np.linalg.norm(w - orig) / np.linalg.norm(orig)
        assert 0 < rec["error"] < 1 and err < (0.5 if rec["form"] == "codebook" else 1.0), (key, err, rec)
        if rec["form"] == "rows":  # a row within |cosine| >= T of its copy: off by at most sqrt(1 - T^2)
            r2, o2 = (w, orig) if key != "matmul" else (w.T, orig.T)
            r2, o2 = r2.reshape(r2.shape[0], -1), o2.reshape(o2.shape[0], -1)
            off = np.linalg.norm(r2 - o2, axis=1) / np.linalg.norm(o2, axis=1)
            assert off.max() <= np.sqrt(1 - 0.3 ** 2) + 1e-5 and (off == 0).sum() == rec["kept_rows"], off
        if rec["form"] == "codebook":
            gather = producers[producers[nodes[key].input[1]].input[0]]
            book = inits[gather.input[0]]
            idx = got[gather.input[1]]
            if gather.op_type == "Gather":
                np.testing.assert_array_equal(w.reshape(-1), book[idx])
                assert len(np.unique(w)) <= 2 ** rec["bits"]
            else:
                axis = helper.get_attribute_value(gather.attribute[0])  # 1: a codebook per row, 0: per column
                np.testing.assert_array_equal(w.reshape(idx.shape), np.take_along_axis(book, idx, axis=axis))
    # the float weights of shared layers are gone from the file
    assert not set(inits) & {WEIGHTS[k] for k, r in d["layers"].items() if r["form"] != "float32"}


def test_binary_ternary_and_few_valued_weights_are_exact():
    rng = np.random.default_rng(7)
    alpha = rng.uniform(0.05, 0.5, (16, 1, 1, 1)).astype(np.float32)
    binary = (np.where(rng.random((16, 4, 3, 3)) < 0.5, -1, 1) * alpha).astype(np.float32)
    alpha3 = rng.uniform(0.05, 0.5, (64, 1)).astype(np.float32)
    ternary = (rng.integers(-1, 2, (64, 144)) * alpha3).astype(np.float32)
    levels = rng.standard_normal(8).astype(np.float32)
    eight = levels[rng.integers(0, 8, (64, 10))]  # exactly 2^3 values in the tensor
    g = _model(w1=binary, w3=ternary, w4=eight)
    for spec, exact in (("bits=1,per=channel", ["conv"]), ("bits=2,per=channel", ["conv", "gemm"]),
                        ("bits=3", ["matmul"])):
        res = graphopt.optimize(g, f"share({spec})")
        d = res.records[0].details
        got = _weights_in_ort(res.graph)
        for key in exact:
            assert d["layers"][key]["form"] == "codebook" and d["layers"][key]["error"] == 0.0, (spec, key)
            np.testing.assert_array_equal(got[key], _w(g, WEIGHTS[key]))
        if spec == "bits=1,per=channel":  # one bit per weight, two values (±alpha) per channel
            assert d["layers"]["conv"]["bits"] == 1 and d["layers"]["conv"]["codebook_size"] == 2
        if spec == "bits=2,per=channel":  # three values per channel, two bits
            assert d["layers"]["gemm"]["bits"] == 2 and d["layers"]["gemm"]["codebooks"] == 64
    res = graphopt.optimize(g, "share(bits=8)")  # 8 values need 3 bits only
    assert res.records[0].details["layers"]["matmul"]["bits"] == 3


def test_exact_packs_only_the_layers_it_represents_without_loss():
    """A binary student's graph: its binary layers packed 1 bit per weight, its float layers left as they are."""
    rng = np.random.default_rng(8)
    alpha = rng.uniform(0.05, 0.5, (64, 1)).astype(np.float32)
    binary = (np.where(rng.random((64, 144)) < 0.5, -1, 1) * alpha).astype(np.float32)
    g = _model(w3=binary)
    res = graphopt.optimize(g, "share(bits=1,per=channel,exact=true)")
    d = res.records[0].details
    assert d["shared_layers"] == 1 and d["layers"]["gemm"]["error"] == 0.0
    assert set(d["not_shared"]) == {"conv", "conv_1x1", "matmul"}
    assert all("exact=true" in why for why in d["not_shared"].values())
    got = _weights_in_ort(res.graph)
    for key, name in WEIGHTS.items():
        np.testing.assert_array_equal(got[key], _w(g, name))


def test_bias_correction_cancels_the_mean_output_shift():
    """With data, a 2-bit layer's bias absorbs ``(W - W_shared) @ mean(x)``: the outputs' mean shift on the
    calibration data is (nearly) gone; a layer without a bias (MatMul) gets an Add."""
    g = _model()
    feeds = [{"x": f["x"] + 1.0} for f in _feeds()]  # inputs with a clear mean
    ref = np.concatenate([ort_run(g, f)[0] for f in feeds])
    shift = {}
    for bc in ("false", "true"):
        res = graphopt.optimize(g, f"share(bits=2,bias_correction={bc})", data=DataSource(feeds=feeds))
        out = np.concatenate([ort_run(res.graph, f)[0] for f in feeds])
        shift[bc] = float(np.abs((out - ref).mean(axis=0)).mean())
        if bc == "true":
            d = res.records[0].details
            assert "matmul" in d["bias_corrected"] and "gemm" in d["bias_corrected"]
    assert shift["true"] < 0.5 * shift["false"], shift


def test_kmeans_is_good_fast_and_data_weighted():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((1024, 1024)).astype(np.float32)  # 1M weights
    t = time.perf_counter()
    enc = cb.encode(w, None, 4)
    took = time.perf_counter() - t
    err = np.linalg.norm(cb.decode(enc) - w) / np.linalg.norm(w)
    print(f"k-means of 1M weights into 16 values: {took:.2f} s, relative error {err:.4f}")
    assert took < 5.0 and err < 0.0985  # Lloyd-Max's 16-level quantizer of a Gaussian: 0.0975
    # weighted: heavily weighted columns of small values are reproduced much better than plain k-means does
    small = rng.standard_normal((32, 64)).astype(np.float32)
    small[:, :8] *= 0.1
    h = np.ones_like(small)
    h[:, :8] = 1000.0
    plain, weighted = (cb.decode(cb.encode(small, None, 2, x)) for x in (None, h))
    assert np.linalg.norm((weighted - small)[:, :8]) < 0.5 * np.linalg.norm((plain - small)[:, :8])


def test_calibration_data_lower_the_output_error():
    """Input columns of very different energy: weighting each weight's error by its column's X^T X diagonal
    keeps the layer's output closer (plain k-means treats every weight alike)."""
    rng = np.random.default_rng(2)
    scale = np.exp(rng.uniform(-3, 2, 144)).astype(np.float32)
    w = (rng.standard_normal((64, 144)) / np.sqrt(scale)).astype(np.float32)  # small weights on strong inputs
    mm = graphopt.Graph(make_model([helper.make_node("Gemm", ["x", "w"], ["y"], name="gemm", transB=1)],
                                   [vi("x", ["n", 144])], [vi("y", ["n", 64])], [numpy_helper.from_array(w, "w")]))
    x = rng.standard_normal((256, 144)).astype(np.float32) * scale
    err = {}
    for with_data in (False, True):
        data = DataSource(feeds=[{"x": x[i:i + 64]} for i in range(0, 256, 64)]) if with_data else DataSource()
        res = graphopt.optimize(mm, "share(bits=2)", data=data)
        assert res.records[0].details["data_aware"] is with_data
        m = onnx.ModelProto()
        m.CopyFrom(res.graph.model)
        name = m.graph.node[-1].input[1]
        m.graph.output.extend([helper.make_empty_tensor_value_info(name)])
        wq = ort_run(graphopt.Graph(m), {"x": x[:1]})[1]
        err[with_data] = np.linalg.norm(x @ (wq - w).T)
    print("output error of share(bits=2), plain vs data-weighted:", err)
    assert err[True] < 0.8 * err[False], err


# ------------------------------------------------------------------------------------------- merge
def _near_copies(base: np.ndarray, n: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` rows, each a multiple of a row of ``base`` (the first ones: ``base`` itself) plus 1e-5 noise."""
    pick = rng.integers(0, len(base), n)
    pick[:len(base)] = np.arange(len(base))
    s = rng.uniform(-2, 2, n)
    s[:len(base)] = 1.0
    w = base[pick] * s.reshape((-1,) + (1,) * (base.ndim - 1)) + 1e-5 * rng.standard_normal((n,) + base.shape[1:])
    w[:len(base)] = base
    return w.astype(np.float32), pick, s


def test_merge_identical_tensors_and_near_duplicate_filters(tmp_path):
    rng = np.random.default_rng(5)
    w1, pick, s = _near_copies(rng.standard_normal((4, 4, 3, 3)), 16, rng)  # 16 filters from 4
    w3, _, _ = _near_copies(rng.standard_normal((8, 144)) * 0.1, 64, rng)  # 64 Gemm rows from 8
    g = _model(w1=w1, w3=w3, twin=True)  # and a second Gemm with exactly the first one's weight
    res = graphopt.optimize(g, "share(merge=0.999)")
    d = res.records[0].details
    assert d["merged_tensors"] == {"gemm_copy": "gemm"}, d
    nodes = {n.name: n for n in res.graph.graph.node}
    assert nodes["gemm_copy"].input[1] == nodes["gemm"].input[1]  # one weight for both
    for key, kept in (("conv", 4), ("gemm", 8)):
        assert d["layers"][key]["form"] == "rows" and d["layers"][key]["kept_rows"] == kept, d["layers"][key]
    assert "matmul" in d["not_shared"] and "conv_1x1" in d["not_shared"]  # random: no rows to merge
    got = _weights_in_ort(res.graph)["conv"]
    for i in range(16):  # each filter: a multiple of the filter it was made from, close to it
        np.testing.assert_allclose(got[i], got[pick[i]] * s[i], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got[i], w1[i], atol=1e-4)
    np.testing.assert_array_equal(got[:4], w1[:4])  # kept filters: exactly as they were
    g.save(tmp_path / "float.onnx")
    res.graph.save(tmp_path / "merged.onnx")
    sizes = [(tmp_path / f).stat().st_size for f in ("float.onnx", "merged.onnx")]
    print(f"merge=0.999: .onnx {sizes[0]} -> {sizes[1]} bytes; weight bytes {d['weight_bytes']}")
    assert sizes[1] < sizes[0] - 4 * 9216 * 1.8, sizes  # one Gemm weight gone, the other shrunk 7x
    feed = _feeds(1)[0]
    np.testing.assert_allclose(ort_run(res.graph, feed)[0], ort_run(g, feed)[0], rtol=1e-3, atol=1e-2)  # y ~ 20
    # merge and bits together: the kept rows are what the codebook encodes
    both = graphopt.optimize(g, "share(merge=0.999,bits=4)").records[0].details
    assert both["layers"]["gemm"]["form"] == "rows+codebook" and both["layers"]["gemm"]["kept_rows"] == 8
    assert both["weight_bytes"]["ratio"] > d["weight_bytes"]["ratio"]


# ------------------------------------------------------------------------ determinism and validity
def test_deterministic_bytes_and_input_untouched():
    g = _model()
    before = g.to_bytes()
    outs = [graphopt.optimize(g, "share(bits=3,merge=0.5,per=channel)", data=DataSource(feeds=_feeds()))
            .graph.to_bytes() for _ in range(2)]
    assert outs[0] == outs[1] and g.to_bytes() == before and outs[0] != before


def test_shared_model_runs_in_onnx_runtime_and_lowers(tmp_path):
    g = _model()
    res = graphopt.optimize(g, "share(bits=2)", data=DataSource(feeds=_feeds()))  # 4-entry codebooks
    assert res.records[0].details["shared_layers"] == 4
    feed = _feeds(1, seed=11)[0]
    y = ort_run(res.graph, feed)[0]
    assert y.shape == (8, 10) and np.isfinite(y).all()
    art = graphopt.lower(res.graph, "cpu", tmp_path / "art", verify=True)
    out = graphopt.load(tmp_path / "art").run(feed)
    out = out["y"] if isinstance(out, dict) else out[0]
    np.testing.assert_allclose(out, y, rtol=1e-4, atol=1e-5)
    # The CPU target decodes the weights once, at lower time (stored dense for the kernels), not every run.
    assert "not lifted" not in art.native_log
    assert sum(w["name"].startswith("main.packed") for w in art.manifest["weights"]) >= 4


# ---------------------------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def digits(digits_trained):
    return digits_trained


@pytest.mark.torch
def test_digits_cnn_4_bits_keeps_its_accuracy_and_the_file_is_6x_smaller(digits, tmp_path):
    d = digits["data"]
    ev = EvalSet([d["eval"]], d["labels"], source="digits held-out")
    g = digits["cnn"]
    res = graphopt.optimize(g, "share(bits=4),cleanup", data=DataSource(feeds=[d["calib"]]), eval=ev)
    acc = res.report["accuracy"]
    details = res.records[0].details
    assert details["data_aware"] and details["shared_layers"] == 5
    # both files without the exporter's metadata (cleanup drops it): the weights and their decode only
    graphopt.optimize(g, "cleanup").graph.save(tmp_path / "float.onnx")
    res.graph.save(tmp_path / "share.onnx")
    ratio = (tmp_path / "float.onnx").stat().st_size / (tmp_path / "share.onnx").stat().st_size
    print(f"cnn share(bits=4) with data: accuracy {acc['float']:.2f} -> {acc['final']:.2f}; .onnx {ratio:.2f}x "
          f"smaller; weight bytes {details['weight_bytes']['ratio']}x")
    assert acc["float"] > 95 and acc["drop"] <= 1.0, acc
    assert ratio >= 6.0, ratio
