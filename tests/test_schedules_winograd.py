"""Winograd convolutions of the CPU target (targets/schedules/winograd.py).

The transform matrices compute a convolution; every conv the pass converts
(F(4x4) and F(2x2), padded or not, asymmetric padding, channel counts that
split into half vectors, an NCHW network input, residual epilogues, dynamic
batch, AVX2 and portable builds) matches ONNX Runtime and is scheduled by the
Winograd rule; the pass leaves alone what it should (small images, strides,
few channels, ``winograd=false``) and never grows the weights past its budget.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import helper

import graphopt
from graphopt.graph import Graph
from targets.schedules import winograd

from .conftest import init, make_model, ort_run
from .test_schedules_conv import _inputs, _loop_kinds, _x_info, conv_model, scheduled_functions


@pytest.mark.parametrize("m", [2, 4])
def test_transform_matrices_compute_a_3x3_correlation(m):
    bt, g, at = winograd.MATRICES[m]
    rng = np.random.default_rng(m)
    d = rng.standard_normal((m + 2, m + 2))
    w = rng.standard_normal((3, 3))
    got = at @ ((g @ w @ g.T) * (bt @ d @ bt.T)) @ at.T
    want = np.array([[np.sum(d[i:i + 3, j:j + 3] * w) for j in range(m)] for i in range(m)])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_tile_choice():
    assert winograd.choose_tile(56, 56, 64) == 4
    assert winograd.choose_tile(28, 28, 128) == 2
    assert winograd.choose_tile(14, 14, 256) is None  # few tiles: the direct conv is as fast
    assert winograd.choose_tile(56, 56, 3) is None  # an RGB input: the transforms cost more than they save
    assert winograd.choose_tile(54, 54, 64) == 2  # not a multiple of 4
    assert winograd.choose_tile(55, 55, 64) is None  # odd: no whole tiles


def _lower(tmp_path, model, name="art", **opts):
    graphopt.lower(Graph(model), "cpu", tmp_path / name, target_options=opts or None)
    manifest = json.loads((tmp_path / name / "manifest.json").read_text())
    return graphopt.load(tmp_path / name), manifest


def _compare(art, model, batches, atol=2e-4):
    for b in batches:
        feed = _inputs(model, b)
        want = ort_run(Graph(model), feed)[0]
        got = art.run(feed)["y"]
        assert got.shape == want.shape
        # Winograd rounds differently from a direct conv: ~1e-5 of the output's magnitude for F(4x4).
        np.testing.assert_allclose(got, want, atol=atol * max(1.0, float(np.abs(want).max())), rtol=1e-4)


def with_ballast(model, hidden=1024):
    """``model`` plus a second output ``z = Gemm(flatten(GlobalAveragePool(x)), W[c, hidden])``.

    Its weight makes room in the growth budget for F(4x4)'s 4x transformed conv weight
    (a lone conv may grow its weights by at most GROWTH_BUDGET, which F(2x2) fits).
    """
    g = model.graph
    c = g.input[0].type.tensor_type.shape.dim[1].dim_value
    w = np.random.default_rng(9).standard_normal((c, hidden)).astype(np.float32) * 0.1
    g.node.extend([helper.make_node("GlobalAveragePool", ["x"], ["gp"]),
                   helper.make_node("Flatten", ["gp"], ["gf"]),
                   helper.make_node("Gemm", ["gf", "ballast"], ["z"])])
    g.initializer.append(init("ballast", w))
    g.output.append(_x_info("z", ["N", hidden]))
    return model


CASES = {
    # name: (conv_model kwargs, room for F(4x4), tile m expected)
    "f4_residual": (dict(c=32, f=32, hw=(48, 48), pads=[1, 1, 1, 1], post=("residual", "relu")), True, 4),
    "f4_half_vector_channels": (dict(c=16, f=24, hw=(48, 48), pads=[1, 1, 1, 1], post=("sigmoid",)), True, 4),
    "f4_over_budget_takes_f2": (dict(c=16, f=32, hw=(48, 48), pads=[1, 1, 1, 1], post=("relu",)), False, 2),
    "f2_relu": (dict(c=16, f=32, hw=(24, 24), pads=[1, 1, 1, 1], post=("relu",)), False, 2),
    "f2_valid": (dict(c=16, f=16, hw=(26, 26), pads=[0, 0, 0, 0]), False, 2),
    "f2_asymmetric_pads": (dict(c=16, f=16, hw=(25, 25), pads=[1, 1, 0, 0], bias=False), False, 2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_winograd_convs_match_onnxruntime(tmp_path, case):
    kwargs, room, m = CASES[case]
    model = conv_model(**kwargs)
    model = with_ballast(model) if room else model
    art, manifest = _lower(tmp_path, model)
    assert manifest["target"]["winograd_convs"] == 1, case
    conv = manifest["target"]["winograd_extra_bytes"]
    ci, co = kwargs["c"], kwargs["f"]
    assert conv == ((m + 2) ** 2 - 9) * ci * co * 4, case  # the tile the budget allowed
    _compare(art, model, batches=(1, 2))


def test_winograd_kernel_is_claimed_parallel_and_vectorized():
    funcs, _target = scheduled_functions(
        with_ballast(conv_model(c=32, f=32, hw=(48, 48), pads=[1, 1, 1, 1], post=("relu",))), winograd=True)
    hits = [n for n in funcs if "winograd" in n and "weight" not in n]
    assert hits, sorted(funcs)
    for n in hits:
        _before, after = funcs[n]
        assert after.attrs and after.attrs.get("tirx.is_scheduled"), n
        assert {"parallel", "vectorized", "unroll"} <= _loop_kinds(after), n


def test_network_input_conv_reads_nchw_while_padding(tmp_path):
    """The first conv of a network reads the NCHW input directly (transposed while padding), as direct convs do."""
    model = conv_model(c=16, f=32, hw=(32, 32), pads=[1, 1, 1, 1], post=("relu",))
    art, manifest = _lower(tmp_path, model)
    assert manifest["target"]["winograd_convs"] == 1
    _compare(art, model, batches=(1, 3))


@pytest.mark.parametrize("mcpu", ["x86-64-v3", "portable"])
def test_avx2_and_portable_builds(tmp_path, mcpu):
    import platform

    if platform.machine() not in ("x86_64", "AMD64") and mcpu != "portable":
        pytest.skip("x86-64 CPU names")
    model = conv_model(c=16, f=32, hw=(48, 48), pads=[1, 1, 1, 1], post=("relu",))
    art, manifest = _lower(tmp_path, model, mcpu=mcpu)
    assert manifest["target"]["winograd_convs"] == 1
    _compare(art, model, batches=(2,))


@pytest.mark.parametrize("kwargs", [
    dict(c=16, f=16, hw=(12, 12), pads=[1, 1, 1, 1]),                      # small image
    dict(c=16, f=16, hw=(48, 48), pads=[1, 1, 1, 1], strides=[2, 2]),      # strided
    dict(c=16, f=16, hw=(48, 48), pads=[2, 2, 2, 2], dilations=[2, 2]),    # dilated
    dict(c=4, f=16, hw=(48, 48), pads=[1, 1, 1, 1]),                       # few input channels
    dict(c=16, f=16, hw=(48, 48), k=5, pads=[2, 2, 2, 2]),                 # 5x5
    dict(c=16, f=16, hw=(48, 48), pads=[1, 1, 1, 1], group=2),             # grouped
], ids=["small", "strided", "dilated", "few_channels", "5x5", "grouped"])
def test_other_convs_stay_direct(tmp_path, kwargs):
    model = conv_model(**kwargs)
    art, manifest = _lower(tmp_path, model)
    assert manifest["target"]["winograd_convs"] == 0
    _compare(art, model, batches=(1,), atol=1e-4)


def test_option_off_keeps_direct_convs(tmp_path):
    model = conv_model(c=32, f=32, hw=(48, 48), pads=[1, 1, 1, 1], post=("relu",))
    art, manifest = _lower(tmp_path, model, winograd=False)
    assert manifest["target"]["winograd_convs"] == 0
    assert manifest["target"]["options"]["winograd"] is False
    _compare(art, model, batches=(1,), atol=1e-4)


def _conv_then_dense(hidden):
    """x -> 3x3 conv 16->16 at 48x48 -> global average pool -> flatten -> Gemm(16 -> hidden) -> y."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "wd"], ["y"])]
    inits = [init("w", rng.standard_normal((16, 16, 3, 3)).astype(np.float32) * 0.3),
             init("wd", rng.standard_normal((16, hidden)).astype(np.float32) * 0.3)]
    return make_model(nodes, [_x_info("x", ["N", 16, 48, 48])], [_x_info("y", ["N", hidden])], inits)


def test_transformed_weights_stay_within_the_growth_budget(tmp_path, monkeypatch):
    """Converted only while the transformed weights add at most GROWTH_BUDGET of the model's weight bytes."""
    # Conv weight 9 KiB: F(4x4) adds 27 KiB, F(2x2) 7 KiB; the Gemm's 16 x 8 floats add 0.5 KiB.
    import importlib

    # The lowering imports the targets as the installed package graphopt.targets, these tests as targets.
    for name in ("targets.schedules.winograd", "graphopt.targets.schedules.winograd"):
        monkeypatch.setattr(importlib.import_module(name), "GROWTH_BUDGET", 0.5)
    art, manifest = _lower(tmp_path, _conv_then_dense(8), name="none")
    assert manifest["target"]["winograd_convs"] == 0  # 7 KiB > 0.5 x 9.5 KiB
    _compare(art, _conv_then_dense(8), batches=(1,), atol=1e-4)
    big = _conv_then_dense(4096)  # + 256 KiB of Gemm weights: F(4x4) fits
    art, manifest = _lower(tmp_path, big, name="big")
    assert manifest["target"]["winograd_convs"] == 1
    assert manifest["target"]["winograd_extra_bytes"] == 27 * 16 * 16 * 4
    # The transformed weight is prepacked with the rest (not recomputed per call).
    assert any(w.get("name", "").startswith("main.packed") for w in manifest["weights"])
    _compare(art, big, batches=(1, 2))
