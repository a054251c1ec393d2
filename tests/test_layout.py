"""Layout conversion before legalization: safe on every model, and conv weights packed at lower time."""

import numpy as np
import onnx
from onnx import helper

import graphopt
from tests.conftest import init, make_model, vi


def test_conv_layout_survives_a_negative_squeeze_axis_and_packs_the_kernel(tmp_path):
    # TVM's ConvertLayout dies with std::bad_alloc on squeeze(axis<0) (torch's attention export has it).
    w = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32)
    m = make_model([helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
                    helper.make_node("ReduceMean", ["c"], ["m"], axes=[2], keepdims=1),
                    helper.make_node("Squeeze", ["m", "ax"], ["s"])],
                   [vi("x", [1, 3, 8, 8])], [vi("s", [1, 8, 8])],
                   [init("W", w), init("ax", np.array([-2], np.int64))])
    onnx.save(m, tmp_path / "m.onnx")
    res = graphopt.lower(str(tmp_path / "m.onnx"), "cpu", tmp_path / "art", verify=True)
    shapes = [tuple(e["shape"]) for e in res.manifest["weights"]]
    # OIHW for model.onnx; the program's kernel prepacked ([O/t, KH, KW, I, t]) at lower time.
    assert shapes[0] == (8, 3, 3, 3) and len(shapes) == 2
    assert shapes[1][1:4] == (3, 3, 3) and shapes[1][0] * shapes[1][4] == 8
    assert res.manifest["programs"][0]["params"] == [1]


def test_squeeze_axes_are_normalized_only_in_modules_with_convolutions():
    from tvm import relax

    from graphopt.targets.layout import normalize_squeeze_axes_pass

    x = relax.Var("x", relax.TensorType((2, 3, 1, 4), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.squeeze(x, [-2])))
        bb.emit_func_output(out)
    mod = bb.get()
    assert normalize_squeeze_axes_pass()(mod).same_as(mod)
