"""End to end: capture or load, optimize, lower through TVM, run the artifact, compare with the reference."""

from __future__ import annotations

import json

import numpy as np
import pytest

import graphopt
from graphopt.errors import ArtifactError, UnsupportedOpsError
from onnx import helper

from .conftest import make_model, run_cli, vi


@pytest.fixture(scope="module")
def captured(torch_models):
    """Each torch test model captured with a dynamic batch."""
    return {name: graphopt.capture(m, args, dynamic_batch=True) for name, (m, args) in torch_models.items()}


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_captured_model_lowers_and_matches_torch_at_two_batch_sizes(tmp_path, torch_models, captured, name):
    import torch

    module, _ = torch_models[name]
    g = captured[name]
    assert g.inputs[0].shape[0] == "batch"
    res = graphopt.lower(g, "cpu", tmp_path / name, verify=True)
    assert res.verification.ok
    art = graphopt.load(tmp_path / name)
    for batch in (2, 5):
        x = torch.randn((batch,) + tuple(g.inputs[0].shape[1:]), generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = module(x).numpy()
        got = art.run({g.inputs[0].name: x.numpy()})[g.outputs[0].name]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_cli_lower_and_run_verify_on_exported_onnx(tmp_path, captured, capsys):
    """The one-line use: `graphopt lower` then `graphopt run --verify` on files."""
    for name in ("mlp", "cnn", "transformer"):
        model = tmp_path / f"{name}.onnx"
        captured[name].save(model)
        before = model.read_bytes()
        out = tmp_path / "build" / name
        assert run_cli("lower", model, "--target", "cpu", "-o", out, "--input-shape",
                       f"{captured[name].inputs[0].name}:{','.join(str(d if isinstance(d, int) else 3) for d in captured[name].inputs[0].shape)}",
                       "--quiet") == 0
        shape = [3 if not isinstance(d, int) else d for d in captured[name].inputs[0].shape]
        np.savez(tmp_path / "x.npz", **{captured[name].inputs[0].name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)})
        assert run_cli("run", out, "--inputs", tmp_path / "x.npz", "--verify", "--json") == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["verification"]["ok"] is True and doc["verification"]["max_abs"] < 1e-4
        assert model.read_bytes() == before  # the input model is never modified


def test_lowering_is_deterministic(tmp_path, mlp_onnx):
    a = graphopt.lower(mlp_onnx, "cpu", tmp_path / "a").artifact
    b = graphopt.lower(mlp_onnx, "cpu", tmp_path / "b").artifact
    for f in ("main.so", "manifest.json", "weights.bin", "model.onnx"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_manifest_describes_the_artifact(tmp_path, mlp_onnx):
    from graphopt.targets.cpu import host_cpu

    res = graphopt.lower(mlp_onnx, "cpu", tmp_path / "m")
    m = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert m["inputs"] == [{"name": "x", "dtype": "float32", "shape": [1, 8]}]
    assert m["target"]["mcpu"] == host_cpu() and m["target"]["name"] == "cpu"
    assert set(m["files"]) == {"main.so", "model.onnx", "weights.bin"}
    assert [w["name"] for w in m["weights"]] == ["w1", "b1", "w2"]
    assert m["versions"]["apache-tvm-ffi"] == "0.1.14.post1"
    assert res.manifest == m


def test_artifact_is_refused_on_a_cpu_lacking_its_features(tmp_path, mlp_onnx):
    from graphopt.targets.cpu import ISA_FLAGS, host_isa_features

    graphopt.lower(mlp_onnx, "cpu", tmp_path / "m")
    lacking = sorted(set(ISA_FLAGS) - host_isa_features())
    if not lacking:
        pytest.skip("this CPU has every ISA extension graphopt checks")
    mpath = tmp_path / "m" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["target"]["isa_features"].append(lacking[0])
    mpath.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=f"using {lacking[0]}, which this CPU .* lacks"):
        graphopt.load(tmp_path / "m")


def test_portable_build_runs(tmp_path, mlp_onnx):
    res = graphopt.lower(mlp_onnx, "cpu", tmp_path / "p", target_options={"mcpu": "portable"}, verify=True)
    assert res.manifest["target"]["mcpu"] == "x86-64-v2"
    assert "avx2" not in res.manifest["target"]["isa_features"]


def test_damaged_artifact_is_refused(tmp_path, mlp_onnx):
    graphopt.lower(mlp_onnx, "cpu", tmp_path / "m")
    w = tmp_path / "m" / "weights.bin"
    w.write_bytes(b"\0" + w.read_bytes()[1:])
    with pytest.raises(ArtifactError, match="weights.bin' does not match its hash"):
        graphopt.load(tmp_path / "m")


def test_unsupported_ops_are_all_reported_at_once(tmp_path):
    nodes = [helper.make_node("Celu", ["x"], ["a"], name="celu_1"),
             helper.make_node("Det", ["a"], ["d"], name="det_1"),
             helper.make_node("Celu", ["d"], ["y"], name="celu_2")]
    m = make_model(nodes, [vi("x", [2, 3, 3])], [vi("y", [2])])
    with pytest.raises(UnsupportedOpsError) as e:
        graphopt.lower(graphopt.Graph(m), "cpu", tmp_path / "u")
    assert e.value.ops == {"Celu": ["celu_1", "celu_2"], "Det": ["det_1"]}
    assert not (tmp_path / "u").exists()


def test_lower_replaces_an_existing_artifact_but_not_other_folders(tmp_path, mlp_onnx):
    out = tmp_path / "m"
    graphopt.lower(mlp_onnx, "cpu", out)
    graphopt.lower(mlp_onnx, "cpu", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "mlp.onnx"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(graphopt.OptionError, match="not a graphopt artifact"):
        graphopt.lower(mlp_onnx, "cpu", other)
    assert (other / "keep.txt").read_text() == "x"


@pytest.mark.realmodel
def test_symbolic_shape_chains_get_an_actionable_error(tmp_path, real_model, capsys):
    assert run_cli("lower", real_model("magika"), "-o", tmp_path / "m") == 2
    err = capsys.readouterr().err
    assert "fix them, e.g. --input-shape bytes:1,2048" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_manifest_cannot_point_outside_the_artifact(tmp_path, mlp_onnx):
    graphopt.lower(mlp_onnx, "cpu", tmp_path / "m")
    mpath = tmp_path / "m" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["programs"][0]["library"] = "../evil.so"
    mpath.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="not a plain name"):
        graphopt.load(tmp_path / "m")


def test_manifest_outputs_are_what_the_program_returns_not_what_the_model_declares(tmp_path):
    """Exporters declare wrong output shapes (ddddocr: [1, seqlen] for [T, 1, 8210]): the manifest tells the truth."""
    nodes = [helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0, 2], name="t")]
    m = make_model(nodes, [vi("x", [2, 3, 4])], [vi("y", [1, "seqlen"])])
    res = graphopt.lower(graphopt.Graph(m), "cpu", tmp_path / "m", verify=True)
    assert res.manifest["outputs"] == [{"name": "y", "dtype": "float32", "shape": [3, 2, 4]}]
    assert graphopt.load(tmp_path / "m").outputs[0].shape == (3, 2, 4)


def test_every_compiled_function_declares_noalias_in_dynamic_and_quantized_builds(tmp_path, monkeypatch):
    """TVM's LLVM codegen drops the alias information of every function in a module when one PrimFunc lacks
    ``tirx.noalias``; a dynamic-batch build always holds VM shape functions, a QDQ build the integer-kernel
    functions graphopt writes. Without alias information a GEMM's accumulators are stored after every FMA
    (1.8x slower). Every PrimFunc reaching codegen must carry the attribute."""
    import tvm
    from onnx import TensorProto, numpy_helper

    rng = np.random.default_rng(0)
    wq = rng.integers(-127, 128, (64, 32)).astype(np.int8)
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "sx"), numpy_helper.from_array(np.array(128, np.uint8), "zx"),
             numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(np.full(32, 0.01, np.float32), "sw"),
             numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "w2")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "sw"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["h"]),
             helper.make_node("MatMul", ["h", "w2"], ["y"])]
    g = graphopt.Graph(make_model(nodes, [vi("x", ["batch", 8, 64])], [vi("y", ["batch", 8, 16])], inits))
    seen: dict = {}
    compile_ = tvm.compile

    def recording_compile(mod, target=None, relax_pipeline=None, **kw):
        if relax_pipeline is None or not isinstance(mod, tvm.IRModule):  # prepack's own small builds
            return compile_(mod, target=target, **kw) if relax_pipeline is None else \
                compile_(mod, target=target, relax_pipeline=relax_pipeline, **kw)
        after = relax_pipeline(mod)
        seen.update({gv.name_hint: bool(f.attrs is not None and "tirx.noalias" in f.attrs)
                     for gv, f in after.functions.items() if isinstance(f, tvm.tirx.PrimFunc)})
        return compile_(mod, target=target, relax_pipeline=relax_pipeline, **kw)

    monkeypatch.setattr(tvm, "compile", recording_compile)
    graphopt.lower(g, "cpu", tmp_path / "art")
    assert any("shape_func" in n for n in seen), seen  # the dynamic batch did produce VM shape functions
    assert seen and all(seen.values()), {n: ok for n, ok in seen.items() if not ok}
