"""Layout conversion before legalization: safe on every model, and conv weights packed at lower time."""

import numpy as np
import onnx
from onnx import helper

import graphopt
from graphopt.graph import Graph
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


def _max_model(downstream: bool):
    """x -> Max(mean(x), 0) + x -> Conv -> Relu [-> Max(., 0) -> Conv] -> y.

    ONNX ``Max`` imports as ``stack`` + ``max``, whose layout inference makes TVM's
    ``ConvertLayout`` abort the whole module ("Invalid SLayout: can't find S ...",
    magika); upstream of the conv here, and with ``downstream`` also after it.
    """
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=1),
             helper.make_node("Max", ["m", "zero"], ["mx"]),
             helper.make_node("Add", ["x", "mx"], ["x2"]),
             helper.make_node("Conv", ["x2", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"])]
    inits = [init("w", rng.standard_normal((16, 8, 3, 3)).astype(np.float32)),
             init("zero", np.zeros((1,), np.float32))]
    if downstream:
        nodes += [helper.make_node("Max", ["r", "zero"], ["r2"]),
                  helper.make_node("Conv", ["r2", "w2"], ["y"], pads=[1, 1, 1, 1])]
        inits.append(init("w2", rng.standard_normal((16, 16, 3, 3)).astype(np.float32)))
    else:
        nodes.append(helper.make_node("Identity", ["r"], ["y"]))
    return make_model(nodes, [vi("x", ["N", 8, 10, 10])], [vi("y", ["N", 16, 10, 10])], inits)


def _converted(model):
    import tvm
    from tvm import relax

    from graphopt.graph import Graph
    from graphopt.targets.layout import robust_convert_layout
    from graphopt.relax import import_graph, select_params
    from graphopt.targets.schedules.conv import DESIRED_LAYOUTS

    g = Graph(model)
    mod = import_graph(g, select_params(g))
    convert = relax.transform.ConvertLayout(DESIRED_LAYOUTS)
    try:
        convert(mod)
        plain_ok = True
    except Exception:  # noqa: BLE001
        plain_ok = False
    out, hidden = robust_convert_layout(mod, convert)
    return plain_ok, out, hidden


def test_convert_layout_survives_an_aborting_op_before_and_after_the_convs(tmp_path):
    import re

    for downstream in (False, True):
        model = _max_model(downstream)
        plain_ok, out, hidden = _converted(model)
        assert not plain_ok, "TVM's ConvertLayout no longer aborts here: the test no longer covers the fallback"
        text = out["main"].script()
        convs = re.findall(r"R\.nn\.conv2d\(.*", text)
        assert convs and all('data_layout="NHWC"' in c for c in convs), text
        assert "call_pure_packed" not in text and "layout_hidden" not in text
        assert text.count("R.stack(") == (2 if downstream else 1)
        res = graphopt.lower(Graph(model), "cpu", tmp_path / f"art{downstream}", verify=True)
        assert res.verification.ok
        # The program reads the conv kernels prepacked (the fast NHWC path), not as OIHW.
        assert any(len(e["shape"]) == 5 for e in res.manifest["weights"])


def test_robust_convert_layout_bisects_to_the_failing_op():
    """A conversion that fails whenever a given op is exposed: that op (only) ends up hidden."""
    from tvm import relax

    from graphopt.graph import Graph
    from graphopt.targets.layout import robust_convert_layout
    from graphopt.relax import import_graph, select_params
    from graphopt.targets.schedules.conv import DESIRED_LAYOUTS

    g = Graph(_max_model(False))
    mod = import_graph(g, select_params(g))
    real = relax.transform.ConvertLayout(DESIRED_LAYOUTS)

    def picky(m):
        if "R.nn.relu(" in m["main"].script():
            raise RuntimeError("relu layout inference aborted")
        return real(m)

    out, _ = robust_convert_layout(mod, picky)
    text = out["main"].script()
    assert 'data_layout="NHWC"' in text and "R.nn.relu(" in text and "call_pure_packed" not in text
    # The relu stayed in the original layout: the conv's NHWC output is transposed back before it.
    assert text.index("R.permute_dims(") < text.index("R.nn.relu(")


def test_uniform_constants_become_scalars():
    from tvm import relax

    from graphopt.targets.layout import scalarize_uniform_constants

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 5), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.add(relax.const(np.ones((1, 1, 1), "float32")), x))
            b = bb.emit(relax.op.multiply(a, relax.const(np.arange(20, dtype="float32").reshape(1, 4, 5))))
            c = bb.emit(relax.op.add(relax.const(np.full((1, 4, 5), 2.0, "float32")), b))
            out = bb.emit_output(c)
        bb.emit_func_output(out)
    text = scalarize_uniform_constants(bb.get())["main"].script()
    assert 'R.add(R.const(1.0, "float32"), x)' in text and 'R.add(R.const(2.0, "float32"), lv1)' in text
    assert "R.multiply(lv, metadata" in text  # not uniform: kept
