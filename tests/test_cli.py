"""The command line as a build system sees it: exit codes, one-line errors, clean JSON, nothing half-written."""

from __future__ import annotations

import json

import numpy as np
from onnx import helper

from .conftest import make_model, run_cli, run_cli_subprocess, vi


def _bad_input_cases(tmp_path, mlp_onnx):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    trunc = tmp_path / "truncated.onnx"
    trunc.write_bytes(mlp_onnx.read_bytes()[:40])
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"this is not a protobuf \xff\xfe" * 10)
    unsupported = tmp_path / "unsupported.onnx"
    unsupported.write_bytes(make_model([helper.make_node("Celu", ["x"], ["y"], name="my_celu")],
                                       [vi("x", [4])], [vi("y", [4])]).SerializeToString())
    text_npz = tmp_path / "inputs.npz"
    text_npz.write_text("not numpy")
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    escape_dir = tmp_path / "esc"
    escape_dir.mkdir()
    from .test_graph import _external_model

    escaping = _external_model(escape_dir, "../secret.bin")
    out = tmp_path / "out"
    return [
        (["lower", tmp_path / "missing.onnx", "-o", out], "no such file"),
        (["lower", empty, "-o", out], "file is empty"),
        (["lower", trunc, "-o", out], "not a valid ONNX model"),
        (["lower", corrupt, "-o", out], "not a valid ONNX model"),
        (["lower", escaping, "-o", out], "outside the model's folder"),
        (["lower", unsupported, "-o", out], "cannot lower 1 node(s): Celu (nodes: my_celu)"),
        (["lower", mlp_onnx, "-o", out, "--passes", "cleanup,nope"], "unknown pass 'nope'"),
        (["lower", mlp_onnx, "-o", out, "--passes", "fold-constants(max_mb=big)"], "expects float, got 'big'"),
        (["lower", mlp_onnx, "-o", out, "--target", "fpga"], "unknown target 'fpga' (available: cpu"),
        (["lower", mlp_onnx, "-o", out, "--target-opt", "mcpu=pentium9000"], "is not a CPU LLVM knows"),
        (["lower", mlp_onnx, "-o", out, "--input-shape", "y:1,2"], "no input 'y'"),
        (["optimize", mlp_onnx, "-o", tmp_path / "o.onnx", "--data", text_npz], "cannot read inputs"),
        (["optimize", mlp_onnx, "-o", tmp_path / "o.onnx", "--data", pickled], "cannot read inputs"),
        (["optimize", mlp_onnx, "-o", tmp_path / "o.onnx", "--data", tmp_path / "nope.npz"], "inputs file not found"),
        (["optimize", mlp_onnx], "required: -o/--output"),
        (["frobnicate"], "invalid choice"),
    ]


def test_bad_input_gives_one_line_error_exit_2_and_no_output(tmp_path, mlp_onnx, capsys):
    before = mlp_onnx.read_bytes()
    for args, message in _bad_input_cases(tmp_path, mlp_onnx):
        code = run_cli(*args)
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert code == 2, (args, err)
        assert message in err, (args, err)
        assert "Traceback" not in err and len(err.splitlines()) == 1, (args, err)
        assert err.startswith("graphopt: error:")
        assert not (tmp_path / "out").exists() and not (tmp_path / "o.onnx").exists(), args
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
        assert leftovers == [], leftovers
    assert mlp_onnx.read_bytes() == before


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert run_cli("inspect", tmp_path / "missing.onnx", "--debug") == 2
    assert "Traceback" in capsys.readouterr().err


def test_run_with_unreadable_inputs(tmp_path, mlp_onnx, capsys):
    assert run_cli("lower", mlp_onnx, "-o", tmp_path / "m", "--quiet") == 0
    bad = tmp_path / "x.npz"
    np.savez(bad, wrong_name=np.zeros((1, 8), np.float32))
    assert run_cli("run", tmp_path / "m", "--inputs", bad) == 2
    assert "missing ['x'], unexpected ['wrong_name']" in capsys.readouterr().err
    np.savez(bad, x=np.zeros((2, 3), np.float32))
    assert run_cli("run", tmp_path / "m", "--inputs", bad) == 2
    assert "has shape [2, 3], the model expects [1, 8]" in capsys.readouterr().err
    assert run_cli("run", tmp_path / "nothing") == 2
    assert "not a graphopt artifact" in capsys.readouterr().err


def test_verification_failure_exits_1(tmp_path, mlp_onnx, capsys):
    """An artifact whose compiled code and reference graph disagree (its model.onnx edited, hash updated to
    match) fails `run --verify` with exit 1, not 2. (A negative tolerance is now bad input, exit 2.)"""
    import hashlib

    import onnx

    art = tmp_path / "m"
    assert run_cli("lower", mlp_onnx, "-o", art, "--quiet") == 0
    model = onnx.load(art / "model.onnx", load_external_data=False)
    (relu,) = [n for n in model.graph.node if n.op_type == "Relu"]
    relu.op_type = "Neg"  # the reference now computes something else than main.so
    (art / "model.onnx").write_bytes(model.SerializeToString())
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = hashlib.sha256((art / "model.onnx").read_bytes()).hexdigest()
    (art / "manifest.json").write_text(json.dumps(manifest))
    code = run_cli("run", art, "--verify")
    assert code == 1
    assert "outputs differ from ONNX Runtime" in capsys.readouterr().err


def test_run_writes_outputs(tmp_path, mlp_onnx, capsys):
    assert run_cli("lower", mlp_onnx, "-o", tmp_path / "m", "--quiet") == 0
    assert run_cli("run", tmp_path / "m", "-o", tmp_path / "y.npz", "--quiet") == 0
    with np.load(tmp_path / "y.npz") as z:
        assert z["y"].shape == (1, 4)


def test_json_output_is_only_json(tmp_path, mlp_onnx):
    """A real process: nothing but one JSON document reaches stdout, even from TVM and ONNX Runtime."""
    p = run_cli_subprocess("lower", mlp_onnx, "-o", tmp_path / "m", "--verify", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["report"]["verification"]["ok"] is True
    assert p.stderr == ""
    p = run_cli_subprocess("inspect", mlp_onnx, "--json")
    assert json.loads(p.stdout)["ops"] == {"Add": 1, "MatMul": 2, "Relu": 1}


def test_quiet_prints_nothing(tmp_path, mlp_onnx, capsys):
    assert run_cli("optimize", mlp_onnx, "-o", tmp_path / "o.onnx", "--quiet") == 0
    c = capsys.readouterr()
    assert c.out == "" and c.err == ""


def test_listings(capsys):
    assert run_cli("passes", "--json") == 0
    names = {p["name"] for p in json.loads(capsys.readouterr().out)}
    assert {"cleanup", "fold-constants", "eliminate-identity", "eliminate-dead", "dedup-initializers",
            "fold-batchnorm"} <= names
    assert run_cli("targets") == 0
    assert "cpu" in capsys.readouterr().out


def test_help_has_examples_and_exit_codes():
    p = run_cli_subprocess("--help")
    assert p.returncode == 0
    assert "graphopt lower model.onnx --target cpu" in p.stdout and "exit codes" in p.stdout
