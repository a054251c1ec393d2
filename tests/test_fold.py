"""fold-constants: sound shapes, caps on every intermediate value, compression kept, If folding, --input-value."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.errors import OptionError

from .conftest import MODEL_CACHE, init, make_model, ops, run_cli, vi
from .conftest import ort_run as run


def all_ops(gp: onnx.GraphProto) -> list[str]:
    out = []
    for n in gp.node:
        out.append(n.op_type)
        for a in n.attribute:
            if a.HasField("g"):
                out += all_ops(a.g)
    return out


# ------------------------------------------------------------------ sound shapes
def wrong_declared_shape_model():
    """r = Relu(x) is also a graph output declared [1, 6] (the exporter was wrong: it is [2, 3]).

    y = Reshape(z, Shape(r)): folding Shape(r) from the declaration breaks the model.
    """
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Shape", ["r"], ["s"]),
             helper.make_node("Reshape", ["z", "s"], ["y"])]
    return make_model(nodes, [vi("x", [2, 3]), vi("z", [6])], [vi("y", [2, 3]), vi("r", [1, 6])])


def test_fold_does_not_trust_a_declared_shape():
    g = graphopt.Graph(wrong_declared_shape_model())
    res = graphopt.optimize(g, "fold-constants")  # the manager checks the result on ONNX Runtime
    assert "Shape" not in ops(res.graph)
    target = next(n for n in res.graph.graph.node if n.op_type == "Reshape").input[1]
    np.testing.assert_array_equal(res.graph.array(target), [2, 3])
    assert res.records[0].verification["ok"]


def test_fold_leaves_a_data_dependent_shape_alone():
    """Shape(NonZero(x)) depends on x's values: never folded, whatever one run shows."""
    nodes = [helper.make_node("NonZero", ["x"], ["nz"]), helper.make_node("Shape", ["nz"], ["s"]),
             helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT)]
    m = make_model(nodes, [vi("x", [4])], [vi("y", [2])])
    res = graphopt.optimize(graphopt.Graph(m), "cleanup")
    assert "Shape" in ops(res.graph)
    assert res.records[0].details["fold-constants.unproven_shapes"] == ["nz"]


def test_pads_from_shape_arithmetic_fold_once_dims_are_fixed():
    """pads = [0, 0, 0, 8 - x.shape[1]]: a Pad that TVM's importer refuses until the pads are constant."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "one"], ["w"], axis=0),
             helper.make_node("Sub", ["eight", "w"], ["rest"]), helper.make_node("Unsqueeze", ["rest", "ax"], ["rest1"]),
             helper.make_node("Concat", ["zeros", "rest1"], ["pads"], axis=0),
             helper.make_node("Pad", ["x", "pads"], ["y"])]
    m = make_model(nodes, [vi("x", [1, "T"])], [vi("y", [1, 8])],
                   [init("one", np.array(1, np.int64)), init("eight", np.array(8, np.int64)),
                    init("ax", np.array([0], np.int64)), init("zeros", np.zeros(3, np.int64))])
    res = graphopt.optimize(graphopt.Graph(m), "cleanup", input_shapes={"x": [1, 5]})
    assert ops(res.graph) == ["Pad"]
    np.testing.assert_array_equal(res.graph.array(res.graph.graph.node[0].input[1]), [0, 0, 0, 3])


# ------------------------------------------------------------ intermediate caps
HOSTILE = textwrap.dedent("""
    import resource, sys, json
    import graphopt
    from graphopt.testing import hostile_constant_model
    from graphopt.passbase import PassContext
    # 1 GiB of float32 zeros from a few bytes; only 4 of them are kept.
    m = hostile_constant_model(1 << 28)
    # The pass alone: the manager's statistics are measured elsewhere.
    p = graphopt.plugins.get_registry().get_pass(sys.argv[1])()
    import onnxruntime  # loaded before the baseline, like a pass that evaluates nodes
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = p.run(graphopt.Graph(m), PassContext(verify=False))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"grew_kib": peak - base, "ops": [n.op_type for n in out.graph.node],
                      "details": p.notes}, default=str))
""")


@pytest.mark.parametrize("pipeline", ["fold-constants", "cleanup"])
def test_fold_caps_every_intermediate_before_allocating(pipeline):
    proc = subprocess.run([sys.executable, "-c", HOSTILE, pipeline], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["grew_kib"] < 256 * 1024, f"folding grew the process by {doc['grew_kib']} KiB"
    assert "ConstantOfShape" in doc["ops"]
    key = "left_unfolded_too_large" if pipeline == "fold-constants" else "fold-constants.left_unfolded_too_large"
    assert doc["details"][key] == ["big"]


# ---------------------------------------------------------- compression stays
def compressed_model():
    """Three compressed weight forms feeding one output: int8 + scale, fp16, palette + indices."""
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 127, size=(32, 32), dtype=np.int8)
    w16 = rng.standard_normal((32, 32)).astype(np.float16)
    palette = rng.standard_normal((16, 32)).astype(np.float32)
    idx = rng.integers(0, 16, size=(32,), dtype=np.int64)
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["wq"], name="dq"),
        helper.make_node("Cast", ["w16"], ["wc"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Gather", ["palette", "idx"], ["wp"], axis=0, name="lookup"),
        helper.make_node("MatMul", ["x", "wq"], ["a"]), helper.make_node("MatMul", ["x", "wc"], ["b"]),
        helper.make_node("MatMul", ["x", "wp"], ["c"]), helper.make_node("Sum", ["a", "b", "c"], ["y"]),
    ]
    inits = [init("q", q), init("scale", np.array(0.02, np.float32)), init("zp", np.array(0, np.int8)),
             init("w16", w16), init("palette", palette), init("idx", idx)]
    return make_model(nodes, [vi("x", [1, 32])], [vi("y", [1, 32])], inits)


@pytest.mark.parametrize("pipeline", ["fold-constants", "cleanup"])
def test_folding_never_undoes_compression(pipeline):
    res = graphopt.optimize(graphopt.Graph(compressed_model()), pipeline)
    kept = ops(res.graph)
    assert {"DequantizeLinear", "Cast", "Gather"} <= set(kept), kept
    dtypes = {t.name: t.data_type for t in res.graph.graph.initializer}
    assert dtypes["q"] == TensorProto.INT8 and dtypes["w16"] == TensorProto.FLOAT16
    assert res.records[0].verification["ok"]


def test_folding_still_folds_what_does_not_grow():
    """A weight reshaped and transposed (same bytes) folds; a shape computation that grows a little folds."""
    w = np.arange(12, dtype=np.float32)
    nodes = [helper.make_node("Reshape", ["w", "shape"], ["w2"]), helper.make_node("Transpose", ["w2"], ["w3"]),
             helper.make_node("Range", ["zero", "n", "step"], ["r"]),
             helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "w3"], ["a"]), helper.make_node("Add", ["a", "rf"], ["y"])]
    inits = [init("w", w), init("shape", np.array([4, 3], np.int64)), init("zero", np.array(0, np.int64)),
             init("n", np.array(4, np.int64)), init("step", np.array(1, np.int64))]
    m = make_model(nodes, [vi("x", [1, 3])], [vi("y", [1, 4])], inits)
    res = graphopt.optimize(graphopt.Graph(m), "cleanup")
    assert ops(res.graph) == ["MatMul", "Add"]


# ------------------------------------------------------- If and --input-value
def sr_model():
    """y = If(sr == 16000, then: x * k (k from the main graph), else: x + 1); like silero-vad's sample-rate switch."""
    k = np.full(4, 2.0, np.float32)
    then_g = helper.make_graph([helper.make_node("Mul", ["x", "k"], ["t_out"])], "then", [], [vi("t_out", [4])])
    else_g = helper.make_graph([helper.make_node("Add", ["x", "one"], ["e_out"])], "else", [], [vi("e_out", [4])],
                               [init("one", np.ones(4, np.float32))])
    nodes = [helper.make_node("Equal", ["sr", "sr16k"], ["is16k"]),
             helper.make_node("If", ["is16k"], ["y"], then_branch=then_g, else_branch=else_g)]
    return make_model(nodes, [vi("x", [4]), vi("sr", [], TensorProto.INT64)], [vi("y", [4])],
                      [init("k", k), init("sr16k", np.array(16000, np.int64))])


@pytest.mark.parametrize("sr,expect", [(16000, 2.0), (8000, None)])
def test_input_value_folds_the_if_it_decides(sr, expect):
    res = graphopt.optimize(graphopt.Graph(sr_model()), "cleanup", input_values={"sr": sr})
    assert all_ops(res.graph.graph) == (["Mul"] if expect else ["Add"])
    assert [i.name for i in res.graph.graph.input] == ["x"]
    x = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(run(res.graph, {"x": x})[0], x * 2 if expect else x + 1)
    assert res.records[0].details["fold-constants.inlined_ifs"] == 1


def test_input_value_is_checked():
    g = graphopt.Graph(sr_model())
    with pytest.raises(OptionError, match="no input 'rate'"):
        g.with_input_values({"rate": 1})
    with pytest.raises(OptionError, match="integer input"):
        g.with_input_values({"sr": 1.5})
    with pytest.raises(OptionError, match="shape") as e:
        g.with_input_values({"x": [1, 2]})
    assert "--" not in str(e.value)  # the API names no CLI flag
    assert g.with_input_values({"x": [1, 2, 3, 4]}).array("x").dtype == np.float32


def test_cli_input_value(tmp_path, capsys):
    src = tmp_path / "sr.onnx"
    onnx.save(sr_model(), src)
    out = tmp_path / "out.onnx"
    assert run_cli("optimize", src, "-o", out, "--input-value", "sr=16000", "-q") == 0
    assert all_ops(onnx.load(out).graph) == ["Mul"]
    capsys.readouterr()
    assert run_cli("optimize", src, "-o", tmp_path / "bad.onnx", "--input-value", "sr=abc") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--input-value" in err[0] and not (tmp_path / "bad.onnx").exists()


@pytest.mark.realmodel
def test_silero_vad_sample_rate_ifs_fold():
    path = MODEL_CACHE / "silero-vad.onnx"  # see shared/MODELS.md; the corpus helper adds it to REAL_MODELS
    if not path.is_file():
        pytest.skip(f"{path} not downloaded")
    g = graphopt.Graph.load(path)
    assert "If" in all_ops(g.graph)
    res = graphopt.optimize(g, "cleanup", input_shapes={"input": [1, 512], "state": [2, 1, 128]},
                            input_values={"sr": 16000})
    assert "If" not in all_ops(res.graph.graph)
    assert res.records[0].verification["ok"]
    assert [i.name for i in res.graph.graph.input] == ["input", "state"]


# name: (input shapes, input values); inputs of the right kind come from graphopt's generator
# (integer inputs that index an embedding stay in range) except where a value is fixed.
CORPUS = {
    "magika": ({"bytes": [1, 2048]}, {}),
    "ppocr-cls": ({"x": [1, 3, 48, 192]}, {}),
    "ppocrv4-det": ({"x": [1, 3, 640, 640]}, {}),
    "ppocrv6-rec": ({"x": [1, 3, 48, 320]}, {}),
    "orientation": ({"x": [1, 3, 224, 224]}, {}),
    "ddddocr": ({"input1": [1, 1, 64, 256]}, {}),
    "ddddocr-old": ({"input1": [1, 1, 64, 256]}, {}),
    "tashkeel": ({"char_inputs": [1, 64], "diac_inputs": [1, 64], "input_lengths": [1]}, {"input_lengths": [64]}),
    "silero-vad": ({"input": [1, 512], "state": [2, 1, 128]}, {"sr": 16000}),
}


@pytest.mark.slow
@pytest.mark.realmodel
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_lower_pipeline_passes_are_lossless_and_deterministic_on_the_corpus(name):
    """`lower`'s default passes on each real model: verified on ONNX Runtime, same bytes twice."""
    path = MODEL_CACHE / f"{name}.onnx"
    if not path.is_file():
        pytest.skip(f"{path} not downloaded (see shared/MODELS.md)")
    shapes, values = CORPUS[name]
    runs = [graphopt.optimize(path, "cleanup,fold-batchnorm,cleanup", input_shapes=shapes, input_values=values)
            for _ in range(2)]
    assert all(r.verification["ok"] for r in runs[0].records)
    assert runs[0].graph.to_bytes() == runs[1].graph.to_bytes()
    assert runs[0].records[-1].after["nodes"] <= runs[0].records[0].before["nodes"] or name == "silero-vad"
