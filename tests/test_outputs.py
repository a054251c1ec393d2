"""Outputs never overwrite, sit inside or contain an input; reports record failures; writes fail with exit 2."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import graphopt

from .conftest import make_model, run_cli, run_cli_subprocess, vi


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_exit_2(code, capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("graphopt: error:") and "Traceback" not in err, err
    for n in needles:
        assert str(n) in err, (n, err)
    return err


def _external_model(folder: Path) -> Path:
    """x[1,8] @ w[8,4] -> y, with w stored as external data in weights.data next to the model."""
    folder.mkdir(parents=True, exist_ok=True)
    w = np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [1, 8])], [vi("y", [1, 4])],
                   [onnx.numpy_helper.from_array(w, "w")])
    path = folder / "ext.onnx"
    onnx.save(m, path, save_as_external_data=True, location="weights.data", size_threshold=0)
    return path


def test_outputs_that_are_inputs_are_refused(tmp_path, mlp_onnx, capsys, monkeypatch):
    """-o/--report equal to the model, its external data, --data or --pipeline (by any spelling) → exit 2, input intact."""
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "x.npz"
    np.savez(data, x=np.zeros((1, 8), np.float32))
    toml = tmp_path / "p.toml"
    toml.write_text('passes = ["cleanup"]\n')
    (tmp_path / "link.onnx").symlink_to(mlp_onnx)
    os.link(mlp_onnx, tmp_path / "hard.onnx")
    ext = _external_model(tmp_path / "extdir")
    (tmp_path / "d").mkdir()
    np.savez(tmp_path / "d" / "a.npz", x=np.zeros((1, 8), np.float32))
    cases = [
        (["optimize", mlp_onnx, "-o", mlp_onnx], "would overwrite the model"),
        (["optimize", "mlp.onnx", "-o", "./d/../mlp.onnx"], "would overwrite the model"),
        (["optimize", mlp_onnx, "-o", "link.onnx"], "would overwrite the model"),
        (["optimize", mlp_onnx, "-o", "hard.onnx"], "would overwrite the model"),
        (["optimize", mlp_onnx, "-o", "o.onnx", "--report", mlp_onnx], "the report would overwrite the model"),
        (["optimize", ext, "-o", ext.parent / "weights.data"], "external data of the model"),
        (["lower", ext, "-o", ext.parent], "contains the model"),
        (["optimize", mlp_onnx, "-o", "o.onnx", "--data", data, "--report", data], "would overwrite the data"),
        (["optimize", mlp_onnx, "-o", "d/o.onnx", "--data", "d"], "lies inside the data folder"),
        (["optimize", mlp_onnx, "-o", "o.onnx", "--pipeline", toml, "--report", toml], "the pipeline file"),
        (["optimize", mlp_onnx, "-o", "o.onnx", "--report", "o.onnx"], "would overwrite each other"),
        (["lower", mlp_onnx, "-o", "art", "--report", "art/r.json"], "the report lies inside the artifact"),
    ]
    before = _snapshot(tmp_path)
    for args, message in cases:
        _one_line_exit_2(run_cli(*args), capsys, message)
        assert _snapshot(tmp_path) == before, args
        assert not (tmp_path / "o.onnx").exists()


def test_lower_into_the_folder_that_holds_the_model_keeps_it(tmp_path, mlp_onnx, capsys):
    """Re-lowering an artifact's own model.onnx into that artifact used to delete the input (exit 0)."""
    art = tmp_path / "art"
    assert run_cli("lower", mlp_onnx, "-o", art, "--quiet") == 0
    before = _snapshot(art)
    _one_line_exit_2(run_cli("lower", art / "model.onnx", "-o", art), capsys, "contains the model")
    assert _snapshot(art) == before


def test_run_outputs_stay_out_of_the_artifact_and_off_the_inputs(tmp_path, mlp_onnx, capsys):
    art = tmp_path / "art"
    assert run_cli("lower", mlp_onnx, "-o", art, "--quiet") == 0
    x = tmp_path / "x.npz"
    np.savez(x, x=np.ones((1, 8), np.float32))
    before = _snapshot(tmp_path)
    _one_line_exit_2(run_cli("run", art, "-o", art / "y.npz"), capsys, "inside the artifact folder")
    _one_line_exit_2(run_cli("run", art, "--inputs", x, "-o", x), capsys, "would overwrite the inputs")
    assert _snapshot(tmp_path) == before


def test_dumps_never_overwrite_and_land_where_predicted(tmp_path, mlp_onnx, capsys):
    out = tmp_path / "o.onnx"
    keep = tmp_path / "01-cleanup.onnx"
    keep.write_bytes(b"mine")
    _one_line_exit_2(run_cli("optimize", mlp_onnx, "-o", out, "--dump-after", "cleanup"), capsys, keep,
                     "does not overwrite")
    assert keep.read_bytes() == b"mine" and not out.exists()
    keep.unlink()
    # The names the API checks are the names the pass manager writes.
    from graphopt.outputs import dump_paths
    from graphopt.pipeline import Pipeline

    pipe = Pipeline.parse("cleanup,fold-batchnorm,cleanup", graphopt.get_registry())
    expected = dump_paths(pipe, ["cleanup"], tmp_path)
    assert run_cli("optimize", mlp_onnx, "-o", out, "--passes", str(pipe), "--dump-after", "cleanup", "--quiet") == 0
    assert sorted(tmp_path.glob("0*.onnx")) == sorted(expected) and len(expected) == 2


def _report(path: Path) -> dict:
    return json.loads(path.read_text())


def test_report_is_written_on_failure_with_the_error(tmp_path, mlp_onnx, capsys):
    report = tmp_path / "r.json"
    assert run_cli("optimize", mlp_onnx, "-o", tmp_path / "o.onnx", "--report", report, "--quiet") == 0
    assert _report(report)["ok"] is True
    # Failure inside the API (unknown pass), inside lowering (unsupported op), and while parsing the CLI's values.
    celu = tmp_path / "celu.onnx"
    onnx.save(make_model([helper.make_node("Celu", ["x"], ["y"], name="c")], [vi("x", [4])], [vi("y", [4])]), celu)
    for args, kind in (
        (["optimize", mlp_onnx, "-o", tmp_path / "o2.onnx", "--passes", "nope"], "OptionError"),
        (["lower", celu, "-o", tmp_path / "art"], "UnsupportedOpsError"),
        (["lower", mlp_onnx, "-o", tmp_path / "art", "--input-shape", "x:a,b"], "OptionError"),
    ):
        assert run_cli(*args, "--report", report) == 2
        err = capsys.readouterr().err
        doc = _report(report)
        assert doc["ok"] is False and doc["error"]["kind"] == kind and doc["error"]["exit_code"] == 2, doc
        assert doc["error"]["message"] in err
        assert not (tmp_path / "art").exists() and not (tmp_path / "o2.onnx").exists()


def test_report_that_cannot_be_written_leaves_no_artifact_or_model(tmp_path, mlp_onnx, capsys):
    """The report is written before the output is published: its failure rolls the output back."""
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    bad_report = blocker / "r.json"
    _one_line_exit_2(run_cli("lower", mlp_onnx, "-o", tmp_path / "art", "--report", bad_report), capsys, bad_report)
    _one_line_exit_2(run_cli("optimize", mlp_onnx, "-o", tmp_path / "o.onnx", "--report", bad_report), capsys,
                     bad_report)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "mlp.onnx"]


def test_json_failure_is_one_json_object(tmp_path, mlp_onnx, capsys):
    # A real process once (nothing but the JSON object on stdout), then in-process for the other kinds of failure.
    p = run_cli_subprocess("optimize", mlp_onnx, "-o", mlp_onnx, "--json")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    docs = [json.loads(p.stdout)]
    for args in (["lower", tmp_path / "missing.onnx", "-o", tmp_path / "a", "--json"],
                 ["lower", "--json", "--bogus"]):
        assert run_cli(*args) == 2
        c = capsys.readouterr()
        assert len(c.err.strip().splitlines()) == 1, c.err
        docs.append(json.loads(c.out))
    for doc in docs:
        assert doc["ok"] is False and doc["exit_code"] == 2 and doc["error"]["exit_code"] == 2, doc
        assert doc["error"]["message"] and doc["error"]["kind"]
    assert run_cli("lower", mlp_onnx, "-o", tmp_path / "ok", "--json") == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_unwritable_outputs_exit_2_naming_the_path(tmp_path, mlp_onnx, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    long_name = tmp_path / ("n" * 300 + ".onnx")
    for out in (blocker / "o.onnx", long_name):
        _one_line_exit_2(run_cli("optimize", mlp_onnx, "-o", out), capsys, out)
    _one_line_exit_2(run_cli("lower", mlp_onnx, "-o", blocker / "art"), capsys, blocker / "art",
                     f"'{blocker}' is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "mlp.onnx"]


def test_read_only_output_folder_exits_2(tmp_path, mlp_onnx, capsys):
    if os.geteuid() == 0:
        folder = Path("/sys")  # sysfs refuses new files even to root
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
    try:
        with open(folder / "graphopt-probe", "wb"):
            pass
        pytest.skip(f"{folder} is writable here")
    except OSError:
        pass
    _one_line_exit_2(run_cli("optimize", mlp_onnx, "-o", folder / "o.onnx"), capsys, folder / "o.onnx")


def _limit_file_size():
    # A full disk, for this process only: writing past 64 KiB fails with EFBIG (Python ignores SIGXFSZ).
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))


def test_full_disk_exits_2_and_leaves_nothing(tmp_path):
    rng = np.random.default_rng(0)
    big = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [1, 256])], [vi("y", [1, 256])],
                     [onnx.numpy_helper.from_array(rng.standard_normal((256, 256)).astype(np.float32), "w")])
    src = tmp_path / "in" / "big.onnx"
    src.parent.mkdir()
    onnx.save(big, src)  # 256 KiB of weights
    out = tmp_path / "out"
    out.mkdir()
    for args in (["optimize", src, "-o", out / "o.onnx", "--no-verify-passes"],
                 ["lower", src, "-o", out / "art", "--no-verify-passes"]):
        p = subprocess.run([sys.executable, "-m", "graphopt.cli", *map(str, args)], capture_output=True, text=True,
                           preexec_fn=_limit_file_size, timeout=600)
        assert p.returncode == 2, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and str(out) in p.stderr, p.stderr
        assert list(out.iterdir()) == [], list(out.iterdir())


def test_lower_without_output_uses_a_printed_default(tmp_path, mlp_onnx, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    art = Path("build") / "mlp-cpu"
    assert run_cli("lower", mlp_onnx, "--target", "cpu") == 0
    assert (tmp_path / art / "manifest.json").is_file()
    assert str(art) in capsys.readouterr().out
    assert run_cli("lower", mlp_onnx, "--json") == 0  # replaces its own artifact
    assert json.loads(capsys.readouterr().out)["artifact"] == str(art)
    from graphopt.outputs import default_artifact_path

    assert default_artifact_path(mlp_onnx, "cpu") == art
    assert default_artifact_path(graphopt.Graph.load(mlp_onnx), "cpu") == art


def test_run_outputs_are_byte_deterministic(tmp_path, mlp_onnx):
    """A guard, not a fix: np.savez already writes zip members with the fixed 1980 date."""
    art = tmp_path / "art"
    assert run_cli("lower", mlp_onnx, "-o", art, "--quiet") == 0
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert run_cli("run", art, "-o", a, "--quiet") == 0
    assert run_cli("run", art, "-o", b, "--quiet") == 0
    assert a.read_bytes() == b.read_bytes()
    with zipfile.ZipFile(a) as z:
        assert [i.date_time for i in z.infolist()] == [(1980, 1, 1, 0, 0, 0)]
    with np.load(a, allow_pickle=False) as z:
        got = z["y"]
    feed = graphopt.DataSource().samples(graphopt.load(art).reference_graph(), limit=1)[0]
    np.testing.assert_array_equal(got, graphopt.load(art).run(feed)["y"])


def test_system_exit_inside_a_command_is_an_error(mlp_onnx, capsys, monkeypatch):
    """A library or plugin calling sys.exit(0) mid-command must not turn the command into a silent success."""
    from graphopt import api

    def exits(*a, **k):
        sys.exit(0)

    monkeypatch.setattr(api, "optimize", exits)
    code = run_cli("optimize", mlp_onnx, "-o", "x.onnx")
    err = capsys.readouterr().err.strip()
    assert code == 3 and "sys.exit(0)" in err and "test_outputs" in err and len(err.splitlines()) == 1, err

    class Odd(BaseException):
        pass

    def raises(*a, **k):
        raise Odd("strange")

    monkeypatch.setattr(api, "optimize", raises)
    assert run_cli("optimize", mlp_onnx, "-o", "x.onnx") == 3
    assert "Odd: strange" in capsys.readouterr().err
    assert run_cli_subprocess("--help").returncode == 0


def test_the_api_checks_outputs_too(tmp_path, mlp_onnx):
    before = mlp_onnx.read_bytes()
    with pytest.raises(graphopt.OutputError, match="would overwrite the model"):
        graphopt.optimize(mlp_onnx, "cleanup", output=mlp_onnx)
    g = graphopt.Graph.load(mlp_onnx)  # a loaded Graph remembers its file
    with pytest.raises(graphopt.OutputError, match="would overwrite the model"):
        graphopt.optimize(g, "cleanup", output=tmp_path / "." / "mlp.onnx")
    with pytest.raises(graphopt.OutputError, match="contains the model"):
        graphopt.lower(g, "cpu", tmp_path)
    assert mlp_onnx.read_bytes() == before


def test_output_failing_after_the_report_rewrites_the_report_as_failed(tmp_path):
    """optimize writes the report first; when the model then cannot be written the report says so."""
    rng = np.random.default_rng(0)
    big = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [1, 256])], [vi("y", [1, 256])],
                     [onnx.numpy_helper.from_array(rng.standard_normal((256, 256)).astype(np.float32), "w")])
    src = tmp_path / "big.onnx"
    onnx.save(big, src)
    out = tmp_path / "out"
    args = ["optimize", src, "-o", out / "o.onnx", "--report", out / "r.json", "--no-verify-passes"]
    p = subprocess.run([sys.executable, "-m", "graphopt.cli", *map(str, args)], capture_output=True, text=True,
                       preexec_fn=_limit_file_size, timeout=600)
    assert p.returncode == 2, p.stderr
    assert sorted(x.name for x in out.iterdir()) == ["r.json"]
    doc = json.loads((out / "r.json").read_text())
    assert doc["ok"] is False and doc["error"]["kind"] == "OutputError" and str(out / "o.onnx") in doc["error"]["message"]


def test_output_whose_weights_file_would_overwrite_an_input_is_refused(tmp_path):
    """A large model is saved as 'out.onnx' + 'out.onnx.data': the second file must not be an input either."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from graphopt.cli import main

    w = np.arange(16, dtype=np.float32)
    t = numpy_helper.from_array(w, "w")
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", "out.onnx.data"), ("offset", "0"), ("length", str(w.nbytes))):
        e = t.external_data.add()
        e.key, e.value = k, v
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [16])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [16])], [t])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    (tmp_path / "out.onnx.data").write_bytes(w.tobytes())
    (tmp_path / "m.onnx").write_bytes(m.SerializeToString())
    before = (tmp_path / "out.onnx.data").read_bytes()
    assert main(["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out.onnx"), "-q"]) == 2
    assert (tmp_path / "out.onnx.data").read_bytes() == before and not (tmp_path / "out.onnx").exists()
