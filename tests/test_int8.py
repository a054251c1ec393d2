"""Integer lowering of QDQ matmuls (targets/int8.py): exact integer kernels where the CPU has AVX-512 VNNI or AVX2.

Each kernel is tested where this CPU can run it: the VNNI one through a host build, the AVX2 one through an
``mcpu=x86-64-v3`` build (AVX2, no AVX-512) on any AVX2 machine, AVX-512 ones included."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import helper, numpy_helper

import graphopt
from graphopt.targets import int8
from graphopt.targets.cpu import host_isa_features

from .conftest import make_model, vi

HOST = host_isa_features()
#: (kernel name, the mcpu whose build selects it), for the kernels this CPU can run.
RUNNABLE = [(name, mcpu) for name, mcpu in (("avx512vnni", "host"), ("avx2", "x86-64-v3"))
            if all(f in HOST for f in next(k for k in int8.KERNELS if k.name == name).features)]
kernels = pytest.mark.parametrize("kernel,mcpu", RUNNABLE or [pytest.param(None, None, marks=pytest.mark.skip(
    reason="this CPU has neither AVX-512 VNNI nor AVX2: no integer kernel runs here"))])


def qdq_matmul_model(k=64, n=40, act="uint8", w_zero=False, transposed=False, rank=3, seed=0):
    """x -> QuantizeLinear/DequantizeLinear (per tensor) -> MatMul or Gemm(transB) with an int8 per-channel
    DequantizeLinear weight -> + bias."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(-127, 128, (n, k) if transposed else (k, n)).astype(np.int8)
    sw = (rng.uniform(0.5, 2.0, n) / 127).astype(np.float32)
    zw = rng.integers(-3, 4, n).astype(np.int8) if w_zero else np.zeros(n, np.int8)
    zx = np.array(7 if act == "uint8" else -5, np.uint8 if act == "uint8" else np.int8)
    inits = [numpy_helper.from_array(a, name) for a, name in (
        (codes, "wq"), (sw, "sw"), (zw, "zw"), (np.array(0.02, np.float32), "sx"), (zx, "zx"),
        (rng.standard_normal(n).astype(np.float32), "bias"))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["w"], name="dqw", axis=0 if transposed else 1)]
    shape = ["b", 5, k] if rank == 3 else ["b", k]
    if transposed:
        nodes.append(helper.make_node("Gemm", ["xd", "w", "bias"], ["y"], name="gemm", transB=1))
        shape = ["b", k]
    else:
        nodes += [helper.make_node("MatMul", ["xd", "w"], ["mm"], name="mm"),
                  helper.make_node("Add", ["mm", "bias"], ["y"], name="add")]
    out = [shape[0], 5, n] if len(shape) == 3 else [shape[0], n]
    return graphopt.Graph(make_model(nodes, [vi("x", shape)], [vi("y", out)], inits))


def _lower(tmp_path, g, name, **opts):
    x_shape = [3, 5, g.inputs[0].shape[-1]] if len(g.inputs[0].shape) == 3 else [6, g.inputs[0].shape[-1]]
    x = np.random.default_rng(1).standard_normal(x_shape).astype(np.float32) * 2
    data = graphopt.DataSource(feeds=[{"x": x}])
    res = graphopt.lower(g, "cpu", tmp_path / name, data=data, verify=True, target_options=opts or None)
    return res, json.loads((tmp_path / name / "manifest.json").read_text())


@kernels
@pytest.mark.parametrize("case", [
    dict(), dict(act="int8"), dict(w_zero=True), dict(transposed=True), dict(n=16, k=32, rank=2),
    dict(n=130, k=96, act="int8", w_zero=True), dict(n=9, k=6),
])
def test_qdq_matmuls_become_int8_kernels_that_match_onnx_runtime(tmp_path, case, kernel, mcpu):
    if case.get("k", 64) % next(k for k in int8.KERNELS if k.name == kernel).kgroup:
        pytest.skip("K is not a multiple of this kernel's k-group")
    g = qdq_matmul_model(**case)
    res, manifest = _lower(tmp_path, g, "art", mcpu=mcpu)
    assert manifest["target"]["int8_matmuls"] == 1 and manifest["target"]["int8_kernel"] == kernel
    assert res.verification.ok and res.verification.max_rel < 1e-5, res.verification.summary()
    # the weights are stored as integers (packed), not as a dequantized float copy (tiny ones may be inlined)
    sizes = [w["nbytes"] for w in manifest["weights"]]
    assert max(sizes, default=0) < 4 * g.initializers()["wq"].ByteSize()


def test_int8_kernels_can_be_turned_off_and_odd_k_keeps_float(tmp_path):
    res, manifest = _lower(tmp_path, qdq_matmul_model(), "off", int8_kernels="false")
    assert manifest["target"]["int8_matmuls"] == 0 and res.verification.ok
    assert manifest["target"]["int8_kernel"] is None
    res, manifest = _lower(tmp_path, qdq_matmul_model(k=31), "k31")
    assert manifest["target"]["int8_matmuls"] == 0 and res.verification.ok


def test_kernel_choice_follows_the_cpu_features_built_for():
    assert int8.select_kernel({"avx512f", "avx512bw", "avx512vnni", "avx2"}).name == "avx512vnni"
    assert int8.select_kernel({"avx512f", "avx512bw", "avx2"}).name == "avx2"  # AVX-512 without VNNI
    assert int8.select_kernel({"sse4.2", "popcnt"}) is None


def test_portable_build_keeps_float_qdq_arithmetic(tmp_path):
    """The portable build (x86-64-v2: no AVX2) calls no integer kernel, and still verifies."""
    res, manifest = _lower(tmp_path, qdq_matmul_model(), "portable", mcpu="portable")
    assert manifest["target"]["int8_matmuls"] == 0 and res.verification.ok
    assert "avx2" not in manifest["target"]["isa_features"]


@kernels
@pytest.mark.parametrize("attrs,batch", [
    (dict(pads=[1, 1, 1, 1]), "b"), (dict(strides=[2, 2], pads=[0, 1, 2, 1]), 2),
    (dict(dilations=[2, 2], pads=[2, 2, 2, 2]), "b"), (dict(kernel_shape=[1, 1]), 3),
    (dict(pads=[1, 1, 1, 1], channels=6, kernel_shape=[3, 1]), 2),  # K = 18: a multiple of 2, not of 4
    (dict(pads=[3, 3, 3, 3], strides=[2, 2], channels=3, kernel_shape=[7, 7]), "b"),  # an RGB stem: K = 147
    (dict(pads=[1, 1, 1, 1], channels=64), "b"),  # implicit GEMM: 64-channel runs, whole AMX k-chunks
    (dict(pads=[0, 2, 1, 0], channels=96), 2),  # implicit GEMM: runs of 64 + a 32-channel VNNI tail per tap
    (dict(pads=[2, 1, 2, 1], channels=32, kernel_shape=[5, 3]), "b"),  # implicit GEMM: 32-channel k-chunks
    (dict(pads=[0, 1, 0, 1], channels=2, kernel_shape=[2, 2]), "b"),  # K = 8 but C = 2: im2col, not implicit
    (dict(channels=6, kernel_shape=[1, 2]), 2),  # K = 12, C = 6: im2col
])
def test_quantized_convolutions_become_im2col_and_int8_gemm(tmp_path, attrs, batch, kernel, mcpu):
    """Every one-group QDQ conv gets the integer kernel: a K = KH*KW*C that is not a multiple of the kernel's
    k-group is padded with zero channels (K = 18 -> 24 for VNNI, 147 -> 196 / 154). With the VNNI kernel a
    stride-1 conv whose channels are a multiple of 4 reads its padded input directly (implicit GEMM)."""
    rng = np.random.default_rng(2)
    attrs = dict(attrs)
    k, c = attrs.pop("kernel_shape", [3, 3]), attrs.pop("channels", 8)
    w = numpy_helper.from_array(rng.standard_normal((24, c, *k)).astype(np.float32) * 0.2, "w")
    b = numpy_helper.from_array(rng.standard_normal(24).astype(np.float32), "b")
    m = make_model([helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", **attrs),
                    helper.make_node("Relu", ["c"], ["y"], name="relu")],
                   [vi("x", [batch, c, 9, 11])], [vi("y", [batch, 24, "h", "w"])], [w, b])
    g = graphopt.Graph(m)
    n = 2 if batch == "b" else batch
    feeds = [{"x": rng.standard_normal((n, c, 9, 11)).astype(np.float32)} for _ in range(4)]
    q = graphopt.optimize(g, "quantize", data=graphopt.DataSource(feeds=feeds)).graph
    res = graphopt.lower(q, "cpu", tmp_path / "art", data=graphopt.DataSource(feeds=feeds), verify=True,
                         target_options={"mcpu": mcpu})
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["target"]["int8_matmuls"] == 1 and manifest["target"]["int8_kernel"] == kernel
    implicit = kernel == "avx512vnni" and attrs.get("strides", [1, 1]) == [1, 1] and c % 4 == 0 \
        and "dilations" not in attrs
    assert manifest["target"]["int8_implicit_convs"] == int(implicit)
    assert res.verification.ok and res.verification.max_rel < 1e-5, res.verification.summary()


def qdq_act_matmul_model(k=16, n=20, a_act="uint8", b_act="uint8", heads=3, m=10):
    """x [b, heads, m, k] and y [b, heads, k, n], each through QuantizeLinear/DequantizeLinear (per tensor), then
    MatMul: a matmul of two activations, as attention's Q x K^T and P x V."""
    def zp(act, v):
        return np.array(v if act == "uint8" else v - 128, np.uint8 if act == "uint8" else np.int8)

    inits = [numpy_helper.from_array(a, name) for a, name in (
        (np.array(0.02, np.float32), "sa"), (zp(a_act, 131), "za"), (np.array(0.03, np.float32), "sb"),
        (zp(b_act, 119), "zb"))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sa", "za"], ["xq"], name="qa"),
             helper.make_node("DequantizeLinear", ["xq", "sa", "za"], ["xd"], name="dqa"),
             helper.make_node("QuantizeLinear", ["y", "sb", "zb"], ["yq"], name="qb"),
             helper.make_node("DequantizeLinear", ["yq", "sb", "zb"], ["yd"], name="dqb"),
             helper.make_node("MatMul", ["xd", "yd"], ["z"], name="mm")]
    lead = ["b", heads] if heads else []
    return graphopt.Graph(make_model(nodes, [vi("x", [*lead, m, k]), vi("y", [*lead, k, n])],
                                     [vi("z", [*lead, m, n])], inits))


@kernels
@pytest.mark.parametrize("case", [
    dict(), dict(a_act="int8"), dict(b_act="int8", n=16), dict(a_act="int8", b_act="int8", k=64, n=70, m=37),
    dict(k=18),  # K = 18: not a multiple of VNNI's 4 (float matmul), a multiple of AVX2's 2 (integer)
    dict(heads=None),  # 2-D: [m, k] x [k, n], B uint8
])
def test_matmuls_of_two_activations_become_int8_kernels(tmp_path, case, kernel, mcpu):
    """Attention-style matmuls of two quantized activations run on the integer kernel too: B is packed at run
    time (with its column sums, by the VNNI kernel's packing routine), zero points of both sides taken out
    exactly; the result matches ONNX Runtime on the QDQ graph."""
    g = qdq_act_matmul_model(**case)
    rng = np.random.default_rng(5)
    k, n, m = case.get("k", 16), case.get("n", 20), case.get("m", 10)
    lead = (2, 3) if case.get("heads", 3) else ()
    feeds = [{"x": rng.standard_normal((*lead, m, k)).astype(np.float32),
              "y": rng.standard_normal((*lead, k, n)).astype(np.float32)}]
    res = graphopt.lower(g, "cpu", tmp_path / "art", data=graphopt.DataSource(feeds=feeds), verify=True,
                         target_options={"mcpu": mcpu})
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["target"]["int8_matmuls"] == int(k % next(kk for kk in int8.KERNELS if kk.name == kernel).kgroup == 0)
    assert res.verification.ok and res.verification.max_rel < 1e-5, res.verification.summary()


@kernels
def test_int8_artifacts_are_byte_identical_across_runs(tmp_path, kernel, mcpu):
    """The micro-kernel object is compiled per lowering; main.so must still be the same bytes every time."""
    g = qdq_matmul_model(act="int8")
    digests = []
    for name in ("a", "b"):
        _lower(tmp_path, g, name, mcpu=mcpu)
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        digests.append(((tmp_path / name / "main.so").read_bytes(), manifest["files"] if "files" in manifest else None))
    assert digests[0] == digests[1]


def test_artifacts_with_integer_kernels_get_quantization_tolerances_unless_given():
    from graphopt.reference import DEFAULT_ATOL, DEFAULT_RTOL, INT8_ATOL, INT8_RTOL, artifact_tolerance

    with_int8 = {"target": {"int8_matmuls": 3}}
    assert artifact_tolerance(with_int8, DEFAULT_ATOL, DEFAULT_RTOL) == (INT8_ATOL, INT8_RTOL)
    assert artifact_tolerance(with_int8, 1e-5, 1e-4) == (1e-5, 1e-4)  # the caller's own choice stands
    assert artifact_tolerance({"target": {"int8_matmuls": 0}}, DEFAULT_ATOL, DEFAULT_RTOL) == (DEFAULT_ATOL, DEFAULT_RTOL)
    assert artifact_tolerance({"target": {}}, DEFAULT_ATOL, DEFAULT_RTOL) == (DEFAULT_ATOL, DEFAULT_RTOL)


_AMX_RUN = r"""
import ctypes, json, sys
import numpy as np
import graphopt

art = graphopt.load(sys.argv[1])
x = np.load(sys.argv[2])["x"]
y = art.run({"x": x})["y"]
amx = ctypes.CDLL(sys.argv[1] + "/main.so").graphopt_qgemm_amx_in_use()
np.save(sys.argv[3], y)
print(json.dumps({"amx": int(amx)}))
"""


def qdq_conv_model(c, o, kernel_shape, pads, act="uint8", seed=0):
    """x [b, c, 9, 11] -> QuantizeLinear/DequantizeLinear (per tensor, ``act``) -> Conv with an int8 per-channel
    weight (symmetric) and a bias -> y."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(-127, 128, (o, c, *kernel_shape)).astype(np.int8)
    zx = np.array(9 if act == "uint8" else -6, np.uint8 if act == "uint8" else np.int8)
    inits = [numpy_helper.from_array(a, name) for a, name in (
        (codes, "wq"), ((rng.uniform(0.5, 2.0, o) / 127 / c).astype(np.float32), "sw"), (np.zeros(o, np.int8), "zw"),
        (np.array(0.03, np.float32), "sx"), (zx, "zx"), (rng.standard_normal(o).astype(np.float32), "bias"))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["w"], name="dqw", axis=0),
             helper.make_node("Conv", ["xd", "w", "bias"], ["y"], name="conv", pads=pads)]
    return graphopt.Graph(make_model(nodes, [vi("x", ["b", c, 9, 11])], [vi("y", ["b", o, "h", "w"])], inits))


@pytest.mark.skipif(not all(f in HOST for f in ("avx512vnni", "amx-int8", "amx-tile")),
                    reason="needs a CPU with AVX-512 VNNI and AMX-INT8")
@pytest.mark.parametrize("x_shape,n,conv", [
    ((13, 5, 96), 64, None),  # 65 rows: two full 32-row tiles and a 1-row call (VNNI); K = 64 on tiles + a 32 tail
    ((49, 200), 48, None),  # 32 + 17 rows (a 16-row and a 1-row tile), 3 column blocks (an odd last one), K tail 8
    ((12, 128), 80, None),  # a 12-row call: one partial tile, no second row tile; 4 + 1 column blocks
    # Implicit-GEMM convs (int8 activations: shifted, padded with the shifted zero point), 9x11 images:
    ((2, 96, 9, 11), 40, ([3, 3], [1, 1, 1, 1])),  # 13 x 11 flat rows per image; runs of 64 + a 32 tail per tap
    ((1, 32, 9, 11), 24, ([5, 3], [0, 1, 2, 1])),  # 32-channel tile k-chunks, uneven padding
])
def test_amx_tiles_give_the_same_integers_as_vnni(tmp_path, x_shape, n, conv):
    """On an AMX CPU the VNNI kernel runs its call tiles on the tile unit, with tiles configured to the call's
    rows (the K tail past a multiple of 64 and calls of fewer than 8 rows on VNNI): the outputs are
    bit-identical to the VNNI-only run (GRAPHOPT_NO_AMX=1), and both match ONNX Runtime."""
    import os
    import subprocess
    import sys

    if conv is None:
        g = qdq_matmul_model(k=x_shape[-1], n=n, act="int8", w_zero=True, rank=len(x_shape))
    else:
        g = qdq_conv_model(x_shape[1], n, conv[0], conv[1], act="int8")
    x = np.random.default_rng(4).standard_normal(x_shape).astype(np.float32) * 2
    data = graphopt.DataSource(feeds=[{"x": x}])
    res = graphopt.lower(g, "cpu", tmp_path / "art", data=data, verify=True)
    assert res.verification.ok and res.verification.max_rel < 1e-5, res.verification.summary()
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["target"]["int8_implicit_convs"] == (conv is not None)
    np.savez(tmp_path / "x.npz", x=x)
    script = tmp_path / "run.py"
    script.write_text(_AMX_RUN)
    outs = {}
    for label, off in (("amx", "0"), ("vnni", "1")):
        env = dict(os.environ, GRAPHOPT_NO_AMX=off)
        done = subprocess.run([sys.executable, str(script), str(tmp_path / "art"), str(tmp_path / "x.npz"),
                               str(tmp_path / f"{label}.npy")], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outs[label] = (json.loads(done.stdout.strip().splitlines()[-1])["amx"], np.load(tmp_path / f"{label}.npy"))
    if outs["amx"][0] != 1:
        pytest.skip("this Linux did not grant the process AMX tile state (arch_prctl)")
    assert outs["vnni"][0] == 0
    assert outs["amx"][1].tobytes() == outs["vnni"][1].tobytes()


def _quantized_conv_chain(seed: int):
    """Conv -> ReLU -> Conv (16 channels, 10x10, NCHW) after ``quantize`` on 4 random inputs: (graph, feeds)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32) * 0.2, n) for n in ("w1", "w2")]
    m = make_model([helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
                    helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
                    helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])],
                   [vi("x", [1, 16, 10, 10])], [vi("y", [1, 16, 10, 10])], inits)
    feeds = [{"x": rng.standard_normal((1, 16, 10, 10)).astype(np.float32)} for _ in range(4)]
    return graphopt.optimize(graphopt.Graph(m), "quantize", data=graphopt.DataSource(feeds=feeds)).graph, feeds


def test_qdq_conv_chain_stays_nhwc_between_convs():
    """ConvertLayout leaves transposes around quantize / dequantize (no layout rule for them); the QDQ
    layout pass moves them out of the chain and cancels them: two quantized convs in a row keep only the
    network's input and output transposes, and the int8 rewrite sees NHWC/HWIO convs."""
    import tvm
    from tvm import relax

    from graphopt.relax import import_graph, select_params
    from graphopt.targets.schedules.conv import DESIRED_LAYOUTS

    q, _ = _quantized_conv_chain(seed=3)
    mod = import_graph(q, select_params(q))
    convert = relax.transform.ConvertLayout(DESIRED_LAYOUTS)
    before = convert(mod)["main"].script().count("R.permute_dims(")
    after = tvm.transform.Sequential([convert, int8.qdq_layout_pass()])(mod)["main"].script()
    # Without the pass: activation transposes around each quantize / dequantize; with it: the input's and
    # the output's, plus one per weight (lifted to lower time).
    weights = 2
    assert after.count("R.permute_dims(") == 2 + weights < before, after
    assert after.count('data_layout="NHWC"') == 2


@pytest.mark.parametrize("opts", [{"int8_kernels": "false"}, {"mcpu": "portable"}])
def test_float_qdq_lowering_moves_the_transposes_too(tmp_path, opts):
    """The QDQ layout pass runs on every build, not only where integer kernels replace the convs: a QDQ conv
    chain compiled as float arithmetic (integer kernels off, or a portable build with no integer kernel)
    still matches ONNX Runtime on the QDQ graph to float rounding."""
    import re

    q, feeds = _quantized_conv_chain(seed=5)
    res = graphopt.lower(q, "cpu", tmp_path / "art", data=graphopt.DataSource(feeds=feeds[:2]), verify=True,
                         target_options=opts)
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["target"]["int8_matmuls"] == 0
    assert res.verification.ok and res.verification.max_abs < 1e-4, res.verification.summary()
    # The compiled kernels that transpose: the network's input's and its output's only (without the pass,
    # a third one sat between the convs, around the quantize / dequantize pair).
    names = set(re.findall(rb"__tvm_ffi_\w*transpose\w*", (tmp_path / "art" / "main.so").read_bytes()))
    assert len(names) == 2, sorted(names)
    # Still a quantized artifact: run/bench check it with the quantization tolerances (ONNX Runtime's fused
    # integer QDQ ops round differently from the QDQ graph's float arithmetic).
    from graphopt.reference import DEFAULT_ATOL, DEFAULT_RTOL, INT8_ATOL, INT8_RTOL, artifact_tolerance

    assert manifest["target"]["quantize_nodes"] >= 2
    assert artifact_tolerance(manifest, DEFAULT_ATOL, DEFAULT_RTOL) == (INT8_ATOL, INT8_RTOL)
    assert artifact_tolerance({"target": {"int8_matmuls": 0}}, DEFAULT_ATOL, DEFAULT_RTOL) == (DEFAULT_ATOL,
                                                                                              DEFAULT_RTOL)
