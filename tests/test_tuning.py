"""`lower --tune`: the tuning database, the budget, applying records, and what is refused.

Most tests replace MetaSchedule's measuring (:class:`_Tools`) by a stand-in
that commits a hand-made record, so the database logic (budget and ledger,
baseline comparison, applying, digest, determinism) runs in seconds; one slow
test tunes for real.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np
import pytest
from onnx import helper

import graphopt
from graphopt.errors import OptionError
from graphopt.targets import tuning

from .conftest import init, make_model, run_cli, vi


@pytest.fixture
def mm_onnx(tmp_path):
    """x[16,24] -> MatMul -> Relu -> y[16,20]: one fused kernel."""
    rng = np.random.default_rng(0)
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"])],
                   [vi("x", [16, 24])], [vi("y", [16, 20])], [init("w", rng.standard_normal((24, 20)).astype(np.float32))])
    p = tmp_path / "mm.onnx"
    p.write_bytes(m.SerializeToString())
    return p


class FakeTools:
    """Stands in for MetaSchedule's builder/runner: each "trial" commits one hand-made record."""

    tuned_secs = 1e-6
    default_secs = 1e-3
    calls: list = []

    def __init__(self, target, threads):
        self.target = target

    def tune(self, task, func, trials, db, bar, on_batch):
        from tvm import s_tir
        from tvm.s_tir import meta_schedule as ms

        sch = s_tir.Schedule(func)
        block = sch.get_child_blocks(sch.get_sblock("root"))[0]
        sch.parallel(sch.get_loops(block)[0])
        wl = db.commit_workload(func)
        for _ in range(trials):
            db.commit_tuning_record(ms.database.TuningRecord(
                sch.trace, wl, [self.tuned_secs], self.target, ms.arg_info.ArgInfo.from_prim_func(func["main"])))
        FakeTools.calls.append((task.task_name, trials))
        bar.done += trials
        on_batch(trials)
        return trials

    def measure(self, mod, func):
        FakeTools.calls.append(("baseline", 0))
        return self.default_secs

    def close(self):
        pass


@pytest.fixture
def fake_tools(monkeypatch):
    FakeTools.calls = []
    monkeypatch.setattr(tuning, "_Tools", FakeTools)
    return FakeTools


def records(db_root) -> int:
    (folder,) = [p for p in db_root.iterdir() if p.is_dir()]
    text = (folder / tuning.RECORDS).read_text()
    return sum(1 for line in text.splitlines() if line.strip())


def test_tuned_records_are_applied_reused_and_deterministic(tmp_path, mm_onnx, fake_tools):
    db = tmp_path / "db"
    first = graphopt.lower(mm_onnx, "cpu", tmp_path / "a1", tune=5, tuning_db=db, verify=True)
    assert first.verification.ok
    assert fake_tools.calls == [("fused_matmul_relu", 5), ("baseline", 0)]
    assert records(db) == 5
    t = first.manifest["tuning"]
    assert t["trials"] == 5 and t["tasks"] == 1 and t["tuned_tasks"] == 1
    assert t["database_digest"].startswith("sha256:") and t["database"].startswith("llvm-")

    # Same budget again: nothing measured (not even the baseline), same records, same bytes.
    fake_tools.calls = []
    second = graphopt.lower(mm_onnx, "cpu", tmp_path / "a2", tune=5, tuning_db=db, verify=True)
    assert fake_tools.calls == [] and records(db) == 5
    assert second.manifest["tuning"] == t
    assert (tmp_path / "a1" / "main.so").read_bytes() == (tmp_path / "a2" / "main.so").read_bytes()

    # A larger budget spends only the difference.
    graphopt.lower(mm_onnx, "cpu", tmp_path / "a3", tune=8, tuning_db=db)
    assert fake_tools.calls == [("fused_matmul_relu", 3)] and records(db) == 8

    # Without --tune the database is not read: the default artifact differs from the tuned one.
    plain = graphopt.lower(mm_onnx, "cpu", tmp_path / "plain")
    assert "tuning" not in plain.manifest
    assert (tmp_path / "plain" / "main.so").read_bytes() != (tmp_path / "a1" / "main.so").read_bytes()


def test_default_schedule_is_kept_when_it_measured_faster(tmp_path, mm_onnx, fake_tools, monkeypatch):
    monkeypatch.setattr(FakeTools, "tuned_secs", 2e-3)  # slower than the default's 1e-3
    res = graphopt.lower(mm_onnx, "cpu", tmp_path / "a", tune=3, tuning_db=tmp_path / "db", verify=True)
    assert res.verification.ok
    assert res.manifest["tuning"]["tuned_tasks"] == 0
    plain = graphopt.lower(mm_onnx, "cpu", tmp_path / "plain")
    assert (tmp_path / "a" / "main.so").read_bytes() == (tmp_path / "plain" / "main.so").read_bytes()


def test_records_are_kept_per_target(tmp_path, mm_onnx, fake_tools):
    db = tmp_path / "db"
    graphopt.lower(mm_onnx, "cpu", tmp_path / "host", tune=2, tuning_db=db)
    graphopt.lower(mm_onnx, "cpu", tmp_path / "avx2", tune=2, tuning_db=db, target_options={"mcpu": "x86-64-v3"})
    folders = sorted(p.name for p in db.iterdir() if p.is_dir())
    assert len(folders) == 2 and any("x86-64-v3" in f for f in folders)
    assert [c for c in fake_tools.calls if c[0] != "baseline"] == [("fused_matmul_relu", 2)] * 2


def test_interrupted_database_is_repaired(tmp_path, mm_onnx, fake_tools):
    """A torn last line (Ctrl-C in the middle of a write) is dropped; the rest is kept and used."""
    db = tmp_path / "db"
    graphopt.lower(mm_onnx, "cpu", tmp_path / "a1", tune=4, tuning_db=db)
    (folder,) = [p for p in db.iterdir() if p.is_dir()]
    with open(folder / tuning.RECORDS, "a") as f:
        f.write('[0, [[["GetSBl')
    with open(folder / tuning.WORKLOADS, "a") as f:
        f.write('["123", "nF0')
    fake_tools.calls = []
    res = graphopt.lower(mm_onnx, "cpu", tmp_path / "a2", tune=4, tuning_db=db, verify=True)
    assert res.verification.ok and fake_tools.calls == [] and records(db) == 4
    assert (tmp_path / "a1" / "main.so").read_bytes() == (tmp_path / "a2" / "main.so").read_bytes()


def test_split_budget_follows_weights_and_sums_to_the_budget():
    assert tuning.split_budget(10, [8.0, 1.0, 1.0]) == [8, 1, 1]
    assert sum(tuning.split_budget(7, [1.0, 1.0, 1.0])) == 7
    assert tuning.split_budget(3, [1e9, 1.0, 1.0]) == [3, 0, 0]
    assert tuning.split_budget(0, [1.0]) == [0] and tuning.split_budget(4, []) == []


def test_lock_waits_for_another_holder(tmp_path):
    waited, order = [], []
    with tuning._locked(tmp_path):
        def other():
            with tuning._locked(tmp_path, on_wait=lambda: waited.append(True)):
                order.append("other")

        th = threading.Thread(target=other)
        th.start()
        time.sleep(0.3)
        order.append("first")
    th.join(5)
    assert waited == [True] and order == ["first", "other"]


def test_default_database_is_under_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning.default_db_root() == tmp_path / "xdg" / "graphopt" / "tuning"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tuning.default_db_root() == tmp_path / "home" / ".cache" / "graphopt" / "tuning"


def test_bad_tuning_options_exit_2_with_one_line(tmp_path, mm_onnx, capsys):
    afile = tmp_path / "file"
    afile.write_text("x")
    cases = [
        (["--tune", "-1"], "at least 0"),
        (["--tune", "2", "--tuning-db", afile], "is a file"),
        (["--tune", "2", "--tuning-db", afile / "sub"], "cannot create"),
    ]
    for extra, words in cases:
        capsys.readouterr()
        assert run_cli("lower", mm_onnx, "-o", tmp_path / "out", *extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
        assert not (tmp_path / "out").exists()


def test_without_the_tune_extra_the_install_line_is_given(tmp_path, mm_onnx, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "xgboost", None)  # import xgboost now raises ImportError
    assert run_cli("lower", mm_onnx, "-o", tmp_path / "out", "--tune", "4", "--tuning-db", tmp_path / "db") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'graphopt[tune]'" in err and "xgboost" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(OptionError, match="graphopt\\[tune\\]"):
        tuning.check_requirements()


def test_json_stdout_stays_pure(tmp_path, mm_onnx, fake_tools, capsys):
    capsys.readouterr()
    assert run_cli("lower", mm_onnx, "-o", tmp_path / "a", "--tune", "2", "--tuning-db", tmp_path / "db", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["manifest"]["tuning"]["trials"] == 2


@pytest.mark.slow
def test_real_tuning_measures_into_the_database_and_verifies(tmp_path, mm_onnx):
    pytest.importorskip("xgboost")
    pytest.importorskip("psutil")
    db = tmp_path / "db"
    res = graphopt.lower(mm_onnx, "cpu", tmp_path / "a1", tune=2, tuning_db=db, verify=True)
    assert res.verification.ok
    assert records(db) == 2
    (folder,) = [p for p in db.iterdir() if p.is_dir()]
    ledger = json.loads((folder / tuning.LEDGER).read_text())
    assert list(ledger["spent"].values()) == [2]
    again = graphopt.lower(mm_onnx, "cpu", tmp_path / "a2", tune=2, tuning_db=db)
    assert records(db) == 2
    assert again.manifest["tuning"] == res.manifest["tuning"]
    assert (tmp_path / "a1" / "main.so").read_bytes() == (tmp_path / "a2" / "main.so").read_bytes()


def test_dynamic_batch_kernels_keep_the_default_schedule(tmp_path, fake_tools):
    """A symbolic-shape kernel cannot be timed: it is left to the default rules, and the artifact still verifies."""
    rng = np.random.default_rng(1)
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                   [vi("x", ["batch", 24])], [vi("y", ["batch", 20])],
                   [init("w", rng.standard_normal((24, 20)).astype(np.float32))])
    p = tmp_path / "dyn.onnx"
    p.write_bytes(m.SerializeToString())
    res = graphopt.lower(p, "cpu", tmp_path / "a", tune=4, tuning_db=tmp_path / "db", verify=True)
    assert res.verification.ok
    assert fake_tools.calls == [] and res.manifest["tuning"]["tuned_tasks"] == 0
    assert res.manifest["tuning"]["tasks"] == 0
