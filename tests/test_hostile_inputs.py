"""Hostile and mistaken inputs: every one gets exit 2 (or its API error) and one line, promptly, nothing read that
should not be, and nothing blocks. Each test is built on a small file made for the property it checks."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.errors import ArtifactError, DataError, ModelError, OptionError

from .conftest import init, make_model, vi


def cli(*args, cwd=None, timeout=60) -> subprocess.CompletedProcess:
    """The CLI as a real process with a deadline: a command that blocks fails the test instead of hanging it."""
    env = {k: v for k, v in os.environ.items() if k != "GRAPHOPT_DISABLE_PLUGINS"}
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def one_error_line(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("graphopt: error:") and "Traceback" not in res.stderr
    return lines[0]


def specs(mlp_onnx):
    return graphopt.Graph.load(mlp_onnx).inputs


def npy_bytes(header: dict, data: bytes = b"") -> bytes:
    """An .npy file with exactly this header (which may lie about the data that follows)."""
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, header)  # magic included
    return f.getvalue() + data


# --------------------------------------------------------------------------- data files
def test_npy_header_declaring_a_huge_shape_is_refused_before_reading(tmp_path, mlp_onnx):
    p = tmp_path / "x.npy"
    p.write_bytes(npy_bytes({"descr": "<f4", "fortran_order": False, "shape": (1 << 40, 8)}, b"\0" * 64))
    with pytest.raises(DataError, match=r"header declares .* over the .* byte cap"):
        graphopt.DataSource(p).samples(graphopt.Graph.load(mlp_onnx))


def test_npy_header_declaring_more_than_the_file_holds_is_refused(tmp_path, mlp_onnx):
    p = tmp_path / "x.npy"
    p.write_bytes(npy_bytes({"descr": "<f4", "fortran_order": False, "shape": (1000, 8)}, b"\0" * 64))
    with pytest.raises(DataError, match="only 64 are stored"):
        graphopt.DataSource(p).samples(graphopt.Graph.load(mlp_onnx))


def test_npz_member_with_a_forged_header_is_refused(tmp_path, mlp_onnx):
    """Inside a zip, numpy allocates the declared shape before reading: the header is checked first."""
    p = tmp_path / "x.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x.npy", npy_bytes({"descr": "<f4", "fortran_order": False, "shape": (1 << 40, 8)}, b"\0" * 64))
    with pytest.raises(DataError, match=r"array 'x'.*header declares"):
        graphopt.DataSource(p).samples(graphopt.Graph.load(mlp_onnx))


def test_zip_bomb_npz_is_refused_from_its_directory(tmp_path, mlp_onnx, monkeypatch):
    """A small file whose members expand past the cap is refused from the zip directory, before any inflation."""
    from graphopt import data

    p = tmp_path / "bomb.npz"
    np.savez_compressed(p, x=np.zeros((1, 8), np.float32), pad=np.zeros(8 << 20, np.uint8))  # 8 MiB of zeros
    assert p.stat().st_size < 64 << 10
    monkeypatch.setattr(data, "MAX_INPUT_ARRAY_BYTES", 1 << 20)
    calls = []
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda *a, **k: calls.append(a) or pytest.fail("inflated"))
    with pytest.raises(DataError, match=r"expand to \d+ bytes, over the 1048576 byte cap"):
        graphopt.DataSource(p).samples(graphopt.Graph.load(mlp_onnx))
    assert calls == []


def test_object_arrays_are_refused(tmp_path, mlp_onnx):
    p = tmp_path / "x.npy"
    p.write_bytes(npy_bytes({"descr": "|O", "fortran_order": False, "shape": (1, 8)}, b"\0" * 64))
    with pytest.raises(DataError, match="Python objects"):
        graphopt.DataSource(p).samples(graphopt.Graph.load(mlp_onnx))


def test_good_files_still_read(tmp_path, mlp_onnx):
    x = np.arange(8, dtype=np.float32).reshape(1, 8)
    np.savez(tmp_path / "a.npz", x=x)
    np.savez_compressed(tmp_path / "b.npz", x=x)
    np.save(tmp_path / "c.npy", np.asfortranarray(x))
    for name in ("a.npz", "b.npz", "c.npy"):
        (feed,) = graphopt.DataSource(tmp_path / name).samples(graphopt.Graph.load(mlp_onnx))
        np.testing.assert_array_equal(feed["x"], x)
    assert len(graphopt.DataSource(tmp_path).samples(graphopt.Graph.load(mlp_onnx))) == 3


@pytest.mark.parametrize("where", ["data", "folder-entry", "pipeline"])
def test_fifo_is_refused_without_blocking(tmp_path, mlp_onnx, where):
    fifo_dir = tmp_path / "in"
    fifo_dir.mkdir()
    fifo = fifo_dir / ("p.toml" if where == "pipeline" else "x.npz")
    os.mkfifo(fifo)
    args = ["optimize", mlp_onnx, "-o", tmp_path / "out.onnx"]
    args += {"data": ["--data", fifo], "folder-entry": ["--data", fifo_dir], "pipeline": ["--pipeline", fifo]}[where]
    res = cli(*args)  # on a blocking open this raises TimeoutExpired
    assert res.returncode == 2, res.stderr
    err = one_error_line(res)
    assert str(fifo) in err and "FIFO" in err
    assert not (tmp_path / "out.onnx").exists()


def test_folder_of_inputs_is_capped_in_total(tmp_path, mlp_onnx, monkeypatch):
    from graphopt import data

    for i in range(3):
        np.savez(tmp_path / f"{i}.npz", x=np.zeros((1, 8), np.float32))
    monkeypatch.setattr(data, "MAX_INPUTS_TOTAL_BYTES", 2 * 32 + 1)  # two feeds of 32 bytes fit, three do not
    with pytest.raises(DataError, match=r"over the 65 byte cap for all inputs together"):
        graphopt.DataSource(tmp_path).samples(graphopt.Graph.load(mlp_onnx))
    monkeypatch.setattr(data, "MAX_INPUTS_TOTAL_BYTES", 3 * 32)
    assert len(graphopt.DataSource(tmp_path).samples(graphopt.Graph.load(mlp_onnx))) == 3


def test_device_as_inputs_is_refused(mlp_onnx):
    with pytest.raises(DataError, match="is a device"):
        graphopt.DataSource("/dev/zero").samples(graphopt.Graph.load(mlp_onnx))


# --------------------------------------------------------------------------- pipeline TOML files
@pytest.mark.parametrize("text, message", [
    ("passes = 3\n", r"'passes' must be a list .* got an integer"),
    ('passes = "cleanup"\n', r"'passes' must be a list .* got a string"),
    ("[pass]\nname = 'cleanup'\n", r"'pass' must be a list .* got a table"),
    ("[[pass]]\nmax_mb = 1.0\n", r"pass\[0\]: a pass table needs a string 'name', got none"),
    ("[[pass]]\nname = 3\n", r"pass\[0\]: a pass table needs a string 'name', got an integer"),
    ("passes = [3]\n", r"passes\[0\]: each pass must be a string or a table .* got an integer"),
    ("[[pass]]\nname = 'fold-constants'\nmax_mb = [1, 2]\n", r"option 'max_mb' of pass 'fold-constants' must be a bool"),
    ("[[pass]]\nname = 'fold-constants'\n[pass.max_mb]\nx = 1\n", r"option 'max_mb' .* got a table"),
    ("[[pass]]\nname = 'fold-constants'\nmax_rounds = 1979-05-27\n", r"option 'max_rounds' .* got a date"),
    ("[[pass]]\nname = 'fold-constants'\nmax_mb = nan\n", r"expects a number, got NaN"),
    ("pipeline = 3\n", r"'pipeline' must be a string"),
    ("passes = [" * 2000 + "]" * 2000, r"invalid TOML"),
    ("\xff\xfe", r"cannot read pipeline file|invalid TOML"),
])
def test_malformed_pipeline_files_are_option_errors(tmp_path, text, message):
    f = tmp_path / "p.toml"
    f.write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
    with pytest.raises(OptionError, match=message) as e:
        graphopt.Pipeline.from_toml(f)
    assert str(f) in str(e.value) or "fold-constants" in str(e.value)


def test_huge_pipeline_file_is_refused(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text("# " + "x" * (2 << 20) + "\npasses = ['cleanup']\n")
    with pytest.raises(OptionError, match="over the 1048576 byte cap"):
        graphopt.Pipeline.from_toml(f)


def test_malformed_pipeline_file_cli_exit_2(tmp_path, mlp_onnx):
    f = tmp_path / "p.toml"
    f.write_text("passes = 3\n")
    res = cli("optimize", mlp_onnx, "--pipeline", f, "-o", tmp_path / "out.onnx")
    assert res.returncode == 2, res.stderr
    assert "'passes' must be a list" in one_error_line(res)


# --------------------------------------------------------------------------- tolerances, option values, dumps
@pytest.mark.parametrize("atol, rtol", [(float("nan"), 1e-3), (1e-4, float("nan")), (float("inf"), 1e-3),
                                        (-1e-4, 1e-3), (1e-4, -1.0)])
def test_bad_tolerances_are_refused_by_the_api(mlp_onnx, tmp_path, atol, rtol):
    with pytest.raises(OptionError, match="tolerance (atol|rtol) must be a finite number >= 0"):
        graphopt.optimize(mlp_onnx, "cleanup", atol=atol, rtol=rtol)
    with pytest.raises(OptionError, match="tolerance"):
        graphopt.lower(mlp_onnx, "cpu", tmp_path / "art", atol=atol, rtol=rtol, verify_passes=False)
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("flag, value", [("--atol", "nan"), ("--rtol", "-1"), ("--atol", "inf")])
def test_bad_tolerances_cli_exit_2(tmp_path, mlp_onnx, flag, value):
    res = cli("optimize", mlp_onnx, "-o", tmp_path / "out.onnx", flag, value)
    assert res.returncode == 2, res.stderr
    assert "tolerance" in one_error_line(res)
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("text", ["fold-constants(max_mb=nan)", "fold-constants(max_mb=NaN)"])
def test_nan_pass_options_are_refused(text):
    with pytest.raises(OptionError, match="max_mb' expects a number, got NaN"):
        graphopt.Pipeline.parse(text)
    from graphopt.passes.cleanup import FoldConstants

    with pytest.raises(OptionError, match="NaN"):
        FoldConstants(max_mb=float("nan"))


def test_unknown_dump_after_name_is_refused_before_anything_runs(tmp_path, mlp_onnx):
    out = tmp_path / "out.onnx"
    res = cli("optimize", mlp_onnx, "--passes", "cleanup", "-o", out, "--dump-after", "fold-batchnorm")
    assert res.returncode == 2, res.stderr
    err = one_error_line(res)
    assert "'fold-batchnorm'" in err and "not a pass in the pipeline" in err and "cleanup" in err
    assert sorted(tmp_path.iterdir()) == [mlp_onnx]  # nothing written, not even a dump
    with pytest.raises(OptionError, match="not a pass in the pipeline"):
        graphopt.optimize(mlp_onnx, "cleanup", dump_after=["clean-up"])
    # names that are in the pipeline still work
    res = graphopt.optimize(mlp_onnx, "cleanup", dump_after=["cleanup"], dump_dir=tmp_path / "dumps")
    assert (tmp_path / "dumps" / "01-cleanup.onnx").is_file()


# --------------------------------------------------------------------------- models
def test_model_without_outputs_is_refused_naming_the_file(tmp_path):
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [])
    p = tmp_path / "no_outputs.onnx"
    p.write_bytes(m.SerializeToString())
    with pytest.raises(ModelError, match="no graph outputs"):
        graphopt.Graph.load(p)
    res = cli("optimize", p, "-o", tmp_path / "out.onnx")
    assert res.returncode == 2
    err = one_error_line(res)
    assert str(p) in err and "no graph outputs" in err


def _external(tensor: onnx.TensorProto, location: str, nbytes: int) -> onnx.TensorProto:
    tensor.ClearField("raw_data")
    for fld in ("float_data", "int64_data", "int32_data"):
        tensor.ClearField(fld)
    tensor.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(nbytes))):
        e = tensor.external_data.add()
        e.key, e.value = k, v
    return tensor


def sparse_model(folder: Path, location: str) -> Path:
    """y = x + dense(sparse initializer s); s's values live in external data at ``location``."""
    values = np.array([5.0, 7.0], np.float32)
    vals = _external(numpy_helper.from_array(values, "s"), location, values.nbytes)
    idx = numpy_helper.from_array(np.array([1, 3], np.int64), "s_idx")
    sp = helper.make_sparse_tensor(vals, idx, [4])
    g = helper.make_graph([helper.make_node("Add", ["x", "s"], ["y"])], "g", [vi("x", [4])], [vi("y", [4])],
                          sparse_initializer=[sp])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "sparse.onnx"
    p.write_bytes(m.SerializeToString())
    return p


def test_sparse_initializer_external_data_is_never_resolved_against_the_cwd(tmp_path, monkeypatch):
    """ONNX Runtime reads a sparse initializer's external data relative to the *current* directory."""
    model = sparse_model(tmp_path / "A", "secret.bin")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "secret.bin").write_bytes(np.array([1.0, 2.0], np.float32).tobytes())
    monkeypatch.chdir(cwd)
    with pytest.raises(ModelError, match=r"sparse initializer 's'.*not found next to the model"):
        graphopt.Graph.load(model)
    res = cli("optimize", model, "-o", tmp_path / "out.onnx", cwd=cwd)
    assert res.returncode == 2 and "sparse initializer" in one_error_line(res)


def test_sparse_initializer_external_data_inside_the_folder_is_loaded(tmp_path, monkeypatch):
    model = sparse_model(tmp_path / "A", "vals.bin")
    (tmp_path / "A" / "vals.bin").write_bytes(np.array([5.0, 7.0], np.float32).tobytes())
    monkeypatch.chdir(tmp_path)
    g = graphopt.Graph.load(model)
    sp = g.graph.sparse_initializer[0]
    assert sp.values.data_location == TensorProto.DEFAULT and not sp.values.external_data  # nothing left to resolve
    (out,), = graphopt.reference.run_reference(g, [{"x": np.zeros(4, np.float32)}])
    np.testing.assert_array_equal(out, [0, 5, 0, 7])


def _escaping_models():
    w = np.arange(4, dtype=np.float32)
    const = lambda: _external(numpy_helper.from_array(w, "c"), "../secret.bin", w.nbytes)  # noqa: E731
    out = {}
    # a Constant with an external sparse_value
    sp = helper.make_sparse_tensor(_external(numpy_helper.from_array(w[:2], "v"), "../secret.bin", 8),
                                   numpy_helper.from_array(np.array([0, 1], np.int64), "i"), [4])
    out["sparse_value"] = make_model(
        [helper.make_node("Constant", [], ["c"], sparse_value=sp), helper.make_node("Add", ["x", "c"], ["y"])],
        [vi("x", [4])], [vi("y", [4])])
    # a Constant inside an If branch
    branch = helper.make_graph([helper.make_node("Constant", [], ["t"], value=const())], "then", [], [vi("t", [4])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [vi("e", [4])])
    out["subgraph"] = make_model(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other)],
        [vi("x", [4]), vi("cond", [], TensorProto.BOOL)], [vi("y", [4])])
    # a Constant inside a model-local function
    fn = helper.make_function("local", "AddConst", ["a"], ["b"],
                              [helper.make_node("Constant", [], ["k"], value=const()),
                               helper.make_node("Add", ["a", "k"], ["b"])],
                              [helper.make_opsetid("", 17)])
    m = make_model([helper.make_node("AddConst", ["x"], ["y"], domain="local")], [vi("x", [4])], [vi("y", [4])])
    m.opset_import.append(helper.make_opsetid("local", 1))
    m.functions.append(fn)
    out["function"] = m
    return out


@pytest.mark.parametrize("kind", ["sparse_value", "subgraph", "function"])
def test_external_data_anywhere_in_the_model_must_stay_in_its_folder(tmp_path, kind):
    (tmp_path / "secret.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    p = folder / f"{kind}.onnx"
    p.write_bytes(_escaping_models()[kind].SerializeToString())
    with pytest.raises(ModelError, match="outside the model's folder") as e:
        graphopt.Graph.load(p)
    assert str(p) in str(e.value)


def test_ort_default_logger_is_quiet(tmp_path):
    """ONNX Runtime's own warnings (here: an unused initializer, from a session with default options) stay off
    the terminal once graphopt has imported onnxruntime through its reference module."""
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])],
                   [init("unused", np.ones(3, np.float32))])
    p = tmp_path / "m.onnx"
    p.write_bytes(m.SerializeToString())
    code = ("import sys; from graphopt.reference import onnxruntime; ort = onnxruntime(); "
            f"ort.InferenceSession({str(p)!r}, providers=['CPUExecutionProvider']); print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    assert res.stderr == ""
    control = subprocess.run([sys.executable, "-c", code.replace("ort = onnxruntime()", "import onnxruntime as ort")],
                             capture_output=True, text=True, timeout=60)
    assert "Removing initializer 'unused'" in control.stderr  # the control: ORT does print it by default


# --------------------------------------------------------------------------- artifacts
@pytest.fixture(scope="module")
def built_artifact(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("art")
    rng = np.random.default_rng(0)
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [1, 64])], [vi("y", [1, 32])],
                   [init("w", rng.standard_normal((64, 32)).astype(np.float32))])
    onnx.save(m, tmp / "m.onnx")
    return graphopt.lower(tmp / "m.onnx", "cpu", tmp / "art", verify_passes=False).artifact


@pytest.fixture
def artifact(built_artifact, tmp_path) -> Path:
    dst = tmp_path / "art"
    shutil.copytree(built_artifact, dst)
    return dst


def edit_manifest(art: Path, fn) -> None:
    doc = json.loads((art / "manifest.json").read_text())
    fn(doc)
    (art / "manifest.json").write_text(json.dumps(doc))


def test_intact_artifact_loads(artifact):
    art = graphopt.load(artifact)
    assert len(art.weights) == 1  # the manifest tests below edit the weight index
    assert art.run({"x": np.ones((1, 64), np.float32)})["y"].shape == (1, 32)


def test_run_verify_with_bad_tolerance_is_exit_2_not_a_failed_verification(artifact):
    res = cli("run", artifact, "--verify", "--atol", "nan")
    assert res.returncode == 2, res.stderr
    assert "tolerance atol" in one_error_line(res)
    art = graphopt.load(artifact)
    for kw in ({"atol": float("nan")}, {"rtol": -0.5}):
        with pytest.raises(OptionError, match="tolerance"):
            graphopt.verify_artifact(art, **kw)


def test_manifest_cannot_make_run_load_an_unhashed_library(artifact):
    shutil.copy(artifact / "main.so", artifact / "evil.so")

    def point_at_evil(doc):
        doc["programs"][0]["library"] = "evil.so"

    edit_manifest(artifact, point_at_evil)
    with pytest.raises(ArtifactError, match="program library 'evil.so' is not among the hashed files"):
        graphopt.load(artifact)
    res = cli("run", artifact)
    assert res.returncode == 2 and "evil.so" in one_error_line(res)


def test_artifact_files_must_be_regular_files_not_links(artifact, tmp_path):
    real = tmp_path / "elsewhere.so"
    shutil.move(artifact / "main.so", real)
    (artifact / "main.so").symlink_to(real)  # same bytes, same hash: only the link is wrong
    with pytest.raises(ArtifactError, match="'main.so' is a symbolic link"):
        graphopt.load(artifact)


def test_a_fifo_in_an_artifact_is_refused_without_blocking(artifact):
    os.mkfifo(artifact / "extra.bin")
    edit_manifest(artifact, lambda d: d["files"].__setitem__("extra.bin", "0" * 64))
    res = cli("run", artifact)  # hashing a FIFO would block: TimeoutExpired on the old code
    assert res.returncode == 2
    assert "'extra.bin' is not a regular file" in one_error_line(res)


def test_manifest_that_is_a_link_is_refused(artifact, tmp_path):
    shutil.move(artifact / "manifest.json", tmp_path / "m.json")
    (artifact / "manifest.json").symlink_to(tmp_path / "m.json")
    with pytest.raises(ArtifactError, match="not a regular file"):
        graphopt.load(artifact)


def _del(key):
    return lambda d: d.pop(key)


def _set(path, value):
    def f(d):
        *head, last = path
        for k in head:
            d = d[k]
        d[last] = value
    return f


@pytest.mark.parametrize("edit, message", [
    (_del("inputs"), "'inputs' is missing"),
    (_del("target"), "'target' is missing"),
    (_del("programs"), "'programs' is missing"),
    (_set(["files"], ["main.so"]), "'files' is missing or has the wrong type"),
    (_set(["format_version"], "1"), "'format_version'"),
    (_set(["programs"], ["main.so"]), r"programs\[0\]"),
    (_set(["programs", 0, "library"], 3), r"programs\[0\].library"),
    (_set(["inputs", 0, "shape"], "1,4"), r"inputs\[0\].shape"),
    (_set(["inputs", 0, "dtype"], "object"), "object dtype"),
    (_set(["inputs", 0, "dtype"], "float99"), "unknown dtype"),
    (_set(["weights", 0, "offset"], "0"), r"weights\[0\].offset"),
    (_set(["weights", 0, "shape"], [1 << 40]), "declares shape"),
    (_set(["weights", 0, "dtype"], "float64"), "declares shape"),
    (_set(["target", "name"], None), "target.name"),
    (_set(["files", "main.so"], "not-a-digest"), "no valid SHA-256"),
    (lambda d: d["files"].pop("model.onnx"), "'model.onnx' is not among the hashed files"),
    (lambda d: d["files"].pop("weights.bin"), "'weights.bin' is not among the hashed files"),
])
def test_malformed_manifests_are_artifact_errors(artifact, edit, message):
    edit_manifest(artifact, edit)
    with pytest.raises(ArtifactError, match=message):
        graphopt.load(artifact)


@pytest.mark.parametrize("text", ["{", "[]", "null", '"graphopt-artifact"', "[" * 100000])
def test_unparsable_manifests_exit_2(artifact, text):
    (artifact / "manifest.json").write_text(text)
    with pytest.raises(ArtifactError):
        graphopt.load(artifact)
    res = cli("run", artifact)
    assert res.returncode == 2, res.stderr
    one_error_line(res)


def test_ort_execution_errors_are_not_printed_by_ort_itself(tmp_path):
    """A model ONNX Runtime fails to run on generated inputs (a Reshape to a generated, wrong shape): graphopt
    reports what it needs to, but ORT's own coloured "[E:onnxruntime:...]" line never reaches the terminal."""
    m = make_model([helper.make_node("Reshape", ["x", "s"], ["y"])],
                   [vi("x", [4]), vi("s", [2], TensorProto.INT64)], [vi("y", ["a", "b"])])
    p = tmp_path / "reshape.onnx"
    p.write_bytes(m.SerializeToString())
    res = cli("optimize", p, "-o", tmp_path / "out.onnx", "-q")
    # graphopt's own line may quote ORT's message; ORT's log lines start "[E:onnxruntime:" / "[W:onnxruntime:".
    assert ":onnxruntime:" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    debug = cli("optimize", p, "-o", tmp_path / "out2.onnx", "-q", "--debug")
    assert "[E:onnxruntime" in debug.stderr  # the control: the failure is real, and --debug shows ORT's own line
