"""LSTM/GRU/RNN compiled whole by the CPU target (targets/recurrent.py): compared with ONNX Runtime.

Every configuration ONNX defines sits in one model of many recurrent nodes, lowered once per kernel
variant (AVX2 and the portable one), so the matrix costs two compiles, not fifty.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.errors import LoweringError

from .test_recurrent import B, I, T, ort_run, rnn_model, unroll

#: (op, rnn_model keyword arguments) for each node of the combined model; seq_lens are the shared input's.
SEQ = [T, 2, 0]  # a full row, a short one and an empty one
CONFIGS = [
    *[(op, dict(direction=d, seq_lens=SEQ, init_h=True, init_c=op == "LSTM"))
      for op in ("LSTM", "GRU", "RNN") for d in ("forward", "reverse", "bidirectional")],
    *[(op, dict(direction="bidirectional", layout=1, bias=False)) for op in ("LSTM", "GRU", "RNN")],
    ("GRU", dict(direction="bidirectional", linear_before_reset=1, seq_lens=SEQ)),
    ("GRU", dict(direction="reverse", linear_before_reset=1, init_h=True)),
    *[(op, dict(direction="bidirectional", clip=0.7)) for op in ("LSTM", "GRU", "RNN")],
    ("LSTM", dict(direction="bidirectional", peep=True, init_c=True, seq_lens=SEQ)),
    ("LSTM", dict(direction="forward", peep=True, input_forget=1)),
    ("RNN", dict(direction="bidirectional", activations=["Relu", "Sigmoid"])),
    ("GRU", dict(direction="bidirectional", activations=["Tanh", "Relu", "Sigmoid", "Tanh"])),
    ("LSTM", dict(direction="forward", activations=["Sigmoid", "Relu", "Tanh"], outputs=("Y_c",))),
    ("GRU", dict(direction="forward", outputs=("Y_h",))),
]


def combined_model():
    """One model holding every node of CONFIGS (names prefixed), sharing X [T, B, I] and ``seq``."""
    x = np.random.default_rng(7).standard_normal((T, B, I)).astype(np.float32) * 2
    nodes, inits, inputs, outputs = [], [], [helper.make_tensor_value_info("X", TensorProto.FLOAT, [T, B, I]),
                                              helper.make_tensor_value_info("seq", TensorProto.INT32, [B])], []
    feeds = {"X": x, "seq": np.array(SEQ, np.int32)}
    for k, (op, kw) in enumerate(CONFIGS):
        m, f = rnn_model(op, seed=k, **kw)
        keep = {"X", "seq", ""}
        rename = lambda n: n if n in keep else f"n{k}_{n}"  # noqa: E731
        g = m.graph
        if kw.get("layout") == 1:  # this node reads X batch-first
            nodes.append(helper.make_node("Transpose", ["X"], [rename("Xb")], perm=[1, 0, 2]))
        for n in g.node:
            ins = [rename(i) for i in n.input]
            if kw.get("layout") == 1:
                ins = [rename("Xb") if i == "X" else i for i in ins]
            nodes.append(helper.make_node(n.op_type, ins, [rename(o) for o in n.output], name=rename(n.name),
                                          **{a.name: helper.get_attribute_value(a) for a in n.attribute}))
        for t in g.initializer:
            t.name = rename(t.name)
            inits.append(t)
        for vi in g.input:
            if vi.name not in keep:
                inputs.append(helper.make_tensor_value_info(rename(vi.name), vi.type.tensor_type.elem_type,
                                                            [d.dim_value for d in vi.type.tensor_type.shape.dim]))
                feeds[rename(vi.name)] = f[vi.name]
        for vi in g.output:
            out = onnx.ValueInfoProto()
            out.CopyFrom(vi)
            out.name = rename(vi.name)
            outputs.append(out)
    model = helper.make_model(helper.make_graph(nodes, "many", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, feeds


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    d = tmp_path_factory.mktemp("rnn")
    model, feeds = combined_model()
    onnx.save(model, d / "m.onnx")
    np.savez(d / "x.npz", **feeds)
    return d, model, feeds


@pytest.mark.parametrize("mcpu, variant", [("x86-64-v3", "avx2"), ("portable", "generic")])
def test_every_configuration_matches_the_reference(many, mcpu, variant):
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 CPU names")
    if mcpu == "x86-64-v3":
        from graphopt.targets.cpu import host_isa_features

        if not {"avx2", "fma"} <= host_isa_features():
            pytest.skip("this CPU cannot run AVX2 code")
    d, model, feeds = many
    res = graphopt.lower(d / "m.onnx", "cpu", d / f"art-{variant}", target_options={"mcpu": mcpu})
    target = res.manifest["target"]
    assert target["recurrences"] == len(CONFIGS) and target["recurrence_kernel"] == variant
    # The default pipeline keeps the nodes whole: the reference model.onnx still has them.
    kept = onnx.load(d / f"art-{variant}" / "model.onnx", load_external_data=False)
    assert sum(n.op_type in ("LSTM", "GRU", "RNN") for n in kept.graph.node) == len(CONFIGS)
    # ONNX Runtime refuses layout=1; it runs the unrolled graph (lower-recurrent, itself compared with ONNX
    # Runtime's LSTM/GRU/RNN kernels config by config in tests/test_recurrent.py).
    want = ort_run(unroll(model), feeds)
    got = graphopt.load(d / f"art-{variant}").run(feeds)
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        np.testing.assert_allclose(got[k], want[k], atol=2e-6, rtol=1e-5, err_msg=k)
    # Rows past their length are exactly zero, as ONNX defines Y.
    y = got["n0_Y"]  # LSTM forward, seq [T, 2, 0]
    assert not y[2:, :, 1].any() and not y[:, :, 2].any() and y[:2, :, 1].any()


def test_symbolic_sequence_length_and_batch(tmp_path):
    # One artifact serves any (T, B): lower-recurrent could not take this model at all.
    model, _ = rnn_model("GRU", direction="bidirectional", x_shape=["t", "b", I], init_h=False)
    onnx.save(model, tmp_path / "m.onnx")
    graphopt.lower(tmp_path / "m.onnx", "cpu", tmp_path / "art")
    art = graphopt.load(tmp_path / "art")
    rng = np.random.default_rng(1)
    for t, b in ((3, 1), (11, 4)):
        x = rng.standard_normal((t, b, I)).astype(np.float32)
        want, got = ort_run(model, {"X": x}), art.run({"X": x})
        for k in want:
            np.testing.assert_allclose(got[k], want[k], atol=2e-6, rtol=1e-5, err_msg=f"{k} at T={t} B={b}")


def test_float16_recurrence_computes_in_float32(tmp_path):
    model, feeds = rnn_model("LSTM", direction="bidirectional", init_h=True, init_c=True)
    model = _as_float16(model)
    feeds = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feeds.items()}
    onnx.save(model, tmp_path / "m.onnx")
    graphopt.lower(tmp_path / "m.onnx", "cpu", tmp_path / "art")
    want, got = ort_run(model, feeds), graphopt.load(tmp_path / "art").run(feeds)
    for k in want:
        assert got[k].dtype == np.float16
        np.testing.assert_allclose(got[k].astype(np.float32), want[k].astype(np.float32), atol=3e-3, err_msg=k)


def _as_float16(model):
    from onnx import numpy_helper

    g = model.graph
    for t in g.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for vi in list(g.input) + list(g.output):
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    return model


def test_float64_is_refused_naming_node_and_pass(tmp_path):
    model, _ = rnn_model("GRU")
    from onnx import numpy_helper

    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.elem_type = TensorProto.DOUBLE
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(LoweringError, match=r"GRU 'gru_0': float64 .*'lower-recurrent'"):
        # (ONNX Runtime has no float64 GRU either, so the clean-up passes are not verified.)
        graphopt.lower(tmp_path / "m.onnx", "cpu", tmp_path / "art", verify_passes=False)
    assert not (tmp_path / "art").exists()


def test_unsupported_activation_names_the_node(tmp_path):
    model, _ = rnn_model("RNN", activations=["Softsign"])
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(LoweringError, match=r"RNN 'rnn_0': activation\(s\) Softsign are not supported"):
        graphopt.lower(tmp_path / "m.onnx", "cpu", tmp_path / "art")


def test_compiled_size_does_not_grow_with_the_sequence(tmp_path):
    # Unrolled, each step added ~16 nodes and their kernels; whole, 5 steps and 200 compile the same code.
    sizes = []
    for t in (5, 200):
        model, _ = rnn_model("GRU", direction="bidirectional", t=t)
        onnx.save(model, tmp_path / f"m{t}.onnx")
        graphopt.lower(tmp_path / f"m{t}.onnx", "cpu", tmp_path / f"a{t}")
        sizes.append((tmp_path / f"a{t}" / "main.so").stat().st_size)
        assert json.loads((tmp_path / f"a{t}" / "manifest.json").read_text())["target"]["recurrences"] == 1
    assert abs(sizes[0] - sizes[1]) < 4096, sizes
