"""SIGTERM/SIGHUP unwind like Ctrl-C: nothing half-written, none of TVM's or the compiler's temp files, exit 128+N."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from .conftest import init, make_model, run_cli_subprocess, vi


def _deep_mlp(path: Path, layers: int = 24) -> Path:
    """A chain of MatMul+Add+Tanh layers: small, but TVM takes seconds to compile it."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]),
                  helper.make_node("Add", [f"h{i}", f"b{i}"], [f"a{i}"]),
                  helper.make_node("Tanh", [f"a{i}"], [f"t{i}"])]
        inits += [init(f"w{i}", (rng.standard_normal((32, 32)) * 0.1).astype(np.float32)),
                  init(f"b{i}", np.zeros(32, np.float32))]
        prev = f"t{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    onnx.save(make_model(nodes, [vi("x", [1, 32])], [vi("y", [1, 32])], inits), path)
    return path


#: ONNX Runtime's telemetry SDK keeps one fixed-name state file in the temp dir, written at
#: `import onnxruntime` by any program that uses it; it is not a temporary file of a run.
ORT_STATE = {".ses"}


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name not in ORT_STATE)


def _lower_and_signal(work: Path, temp: Path, model: Path, signum: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, TMPDIR=str(temp))
    proc = subprocess.Popen([sys.executable, "-m", "graphopt.cli", "lower", str(model), "-o", str(work / "art"),
                             "--no-verify-passes"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    # Weights are written into the artifact's temp folder just before TVM starts: then signal.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if any((d / "weights.bin").exists() for d in work.glob(".art.*.tmp")):
            break
        time.sleep(0.01)
    time.sleep(0.2)  # inside import/compile
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_signal_while_compiling_leaves_nothing_behind(tmp_path, signum):
    work = tmp_path / "work"
    work.mkdir()
    temp = tmp_path / "tmp"  # the process's TMPDIR: TVM and gcc would write here
    temp.mkdir()
    for layers in (40, 120):
        model = _deep_mlp(work / "deep.onnx", layers)
        before = _listing(work)
        p = _lower_and_signal(work, temp, model, signum)
        if (work / "art" / "manifest.json").is_file() and p.returncode in (0, -signum):
            # A loaded machine let the whole lowering finish before the signal: try a longer one.
            shutil.rmtree(work / "art")
            continue
        break
    assert p.returncode == 128 + signum, p.stderr
    assert "interrupted" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert _listing(work) == before
    assert _listing(temp) == []


def test_successful_lowering_leaves_no_temp_files(tmp_path, mlp_onnx):
    temp = tmp_path / "tmp"
    temp.mkdir()
    p = run_cli_subprocess("lower", mlp_onnx, "-o", tmp_path / "art", "--verify", env={"TMPDIR": str(temp)})
    assert p.returncode == 0, p.stderr
    assert _listing(temp) == []
    assert sorted(x.name for x in (tmp_path / "art").iterdir()) == ["main.so", "manifest.json", "model.onnx",
                                                                     "weights.bin"]
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".")] == []


def test_interrupt_removes_a_report_written_in_the_same_run(tmp_path, mlp_onnx):
    """Reports are written before the artifact is published; an interrupt after that must not leave one behind."""
    from graphopt.outputs import Reporting
    from graphopt.signals import Interrupted

    report = tmp_path / "r.json"
    with pytest.raises(Interrupted):
        with Reporting(report, command="lower") as rep:
            rep.success({"model": "m"})
            assert report.is_file()
            raise Interrupted(signal.SIGTERM)
    assert not report.exists()


def test_orderly_unwind_restores_handlers_and_ignores_a_second_signal():
    from graphopt.signals import Interrupted, orderly_unwind

    old = signal.getsignal(signal.SIGTERM)
    cleaned = []
    with pytest.raises(Interrupted) as info:
        with orderly_unwind():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            finally:
                os.kill(os.getpid(), signal.SIGTERM)  # during clean-up: ignored
                time.sleep(0.05)
                cleaned.append(True)
    assert info.value.exit_code == 128 + signal.SIGTERM and cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) is old


def test_interrupt_between_the_two_renames_puts_the_old_artifact_back(tmp_path, monkeypatch):
    """Replacing an artifact is two renames; an interrupt between them must not lose the old one."""
    from graphopt import fsutil
    from graphopt.signals import Interrupted

    art = tmp_path / "art"
    art.mkdir()
    (art / "manifest.json").write_text("old")
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the signal lands after the old artifact moved aside
            raise Interrupted(signal.SIGTERM)
        real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", replace)
    with pytest.raises(Interrupted):
        with fsutil.atomic_directory(art, replace_if=lambda p: True) as tmp:
            (tmp / "manifest.json").write_text("new")
    monkeypatch.setattr(fsutil.os, "replace", real_replace)
    assert (art / "manifest.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_a_signal_that_a_library_wraps_or_swallows_still_stops_the_run(tmp_path):
    """TVM calls Python from C++: the handler's exception can come back as a library error, or not at all."""
    from graphopt.fsutil import atomic_write_bytes
    from graphopt.signals import Interrupted, orderly_unwind

    def library_call(swallow: bool):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except BaseException as e:  # what a foreign-function boundary does with a Python exception
            if not swallow:
                raise RuntimeError(f"TVMError: {e}") from None

    with pytest.raises(Interrupted):
        with orderly_unwind():
            library_call(swallow=False)
    out = tmp_path / "o.bin"
    with pytest.raises(Interrupted):
        with orderly_unwind():
            library_call(swallow=True)
            atomic_write_bytes(out, b"x")  # no output is published after a stop request
    assert list(tmp_path.iterdir()) == []


def test_a_signal_inside_a_finalizer_is_not_lost(monkeypatch):
    """Python drops an exception raised in __del__: the stop must still come promptly, not at the end of the run."""
    from graphopt.signals import Interrupted, orderly_unwind

    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", dropped.append)

    class Resource:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs here, inside __del__
                pass

    t0 = time.monotonic()
    with pytest.raises(Interrupted):
        with orderly_unwind():
            r = Resource()
            del r
            time.sleep(5)  # a long step of the run
    assert time.monotonic() - t0 < 2 and dropped == []
