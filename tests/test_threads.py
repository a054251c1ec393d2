"""Threads at run time: the manifest's count, capped by threads= / --threads / GRAPHOPT_THREADS, really in effect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import graphopt
from graphopt.artifact import run_threads
from graphopt.target import THREADS_ENV, available_cores

from .conftest import run_cli

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The bundled digits model, lowered for 2 threads (whatever this machine has)."""
    out = tmp_path_factory.mktemp("threads") / "digits"
    graphopt.lower(EXAMPLES / "digits_mlp.onnx", "cpu", out, threads=2)
    return out


def test_manifest_records_the_threads_and_load_uses_them(digits, monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    art = graphopt.load(digits)
    assert art.manifest["target"]["threads"] == 2
    assert art.manifest["target"]["tvm_target"]["num-cores"] == 2
    assert art.threads == min(2, available_cores())
    import tvm

    assert tvm.runtime.num_threads() == art.threads  # TVM's own pool says so, not only graphopt


def test_cap_from_argument_and_environment(digits, monkeypatch):
    import tvm

    monkeypatch.delenv(THREADS_ENV, raising=False)
    art = graphopt.load(digits, threads=1)
    assert art.threads == 1 and tvm.runtime.num_threads() == 1
    monkeypatch.setenv(THREADS_ENV, "1")
    art = graphopt.load(digits)
    assert art.threads == 1 and tvm.runtime.num_threads() == 1
    # The argument wins over the environment; a cap never raises the manifest's count.
    art = graphopt.load(digits, threads=8)
    assert art.threads == 2
    assert any("does not raise the 2 threads" in n for n in art.notes)


def test_run_threads_policy(monkeypatch):
    monkeypatch.setattr("graphopt.target.available_cores", lambda: 4)
    assert run_threads(2, None) == (2, [])
    assert run_threads(None, None) == (4, [])  # an artifact from before threads were recorded: every core
    n, notes = run_threads(16, None)  # lowered on a bigger machine: every core here, said so
    assert n == 4 and "16 threads" in notes[0]
    assert run_threads(4, 1) == (1, [])
    n, notes = run_threads(8, 6)  # an explicit cap above the cores is honoured, with a note
    assert n == 6 and "more than the 4 cores" in notes[0]


@pytest.mark.parametrize("args, env, message", [
    (["--threads", "0"], {}, "threads = 0 must be an integer of at least 1"),
    (["--threads", "-3"], {}, "must be an integer of at least 1"),
    ([], {THREADS_ENV: "lots"}, "is not an integer"),
    ([], {THREADS_ENV: "0"}, "must be at least 1"),
])
def test_bad_thread_counts_exit_2_with_one_line(digits, monkeypatch, capsys, args, env, message):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert run_cli("run", digits, *args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_run_reports_the_threads_in_effect(digits, monkeypatch, capsys):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert run_cli("run", digits, "--threads", "1", "--verify", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["threads"] == 1 and doc["verification"]["ok"]


_PROBE = textwrap.dedent('''
    import json, os, sys, time
    import numpy as np
    import graphopt, tvm
    from tvm import te

    def cpu_ticks():
        """CPU time (clock ticks) of each thread of this process."""
        out = {}
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[int(tid)] = int(fields[11]) + int(fields[12])  # utime + stime
        return out

    n = 1 << 22
    A = te.placeholder((n,), name="A")
    B = te.compute((n,), lambda i: te.sqrt(A[i] * A[i] + 1.0), name="B")
    sch = tvm.s_tir.Schedule(te.create_prim_func([A, B]))
    (i,) = sch.get_loops(sch.get_sblock("B"))
    sch.parallel(i)
    kernel = tvm.compile(sch.mod, target="llvm")
    a = tvm.runtime.tensor(np.ones(n, "float32"))
    b = tvm.runtime.tensor(np.zeros(n, "float32"))
    main = __import__("threading").get_native_id()
    result = {}
    for cap in map(int, sys.argv[2:]):
        art = graphopt.load(sys.argv[1], threads=cap)
        # A new pool's workers spin (sched_yield) for a while before they sleep: let that pass first.
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.5:
            kernel(a, b)
        time.sleep(0.5)
        before = cpu_ticks()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 1.0:
            kernel(a, b)
        after = cpu_ticks()
        busy = sorted(t for t in after if t != main and after[t] - before.get(t, 0) >= 5)
        result[cap] = {"threads": art.threads, "num_threads": tvm.runtime.num_threads(), "busy_others": len(busy)}
    print(json.dumps(result))
''')


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts per-thread CPU time in /proc")
def test_cap_of_one_really_runs_on_one_thread(digits, tmp_path):
    """A parallel kernel after loading with threads=1 keeps every other thread idle; with 2 another one works."""
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    caps = ["1", "2"] if available_cores() >= 2 else ["1"]
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("TVM_NUM_THREADS", THREADS_ENV)}
    proc = subprocess.run([sys.executable, str(script), str(digits), *caps], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    res = {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
    assert res[1] == {"threads": 1, "num_threads": 1, "busy_others": 0}
    if 2 in res:
        assert res[2]["threads"] == 2 and res[2]["num_threads"] == 2
        assert res[2]["busy_others"] >= 1


def test_verify_gives_onnx_runtime_the_artifacts_thread_count(digits, monkeypatch):
    import graphopt.api as api

    seen = []
    real = api.reference_session

    def spy(graph, threads=0):
        seen.append(threads)
        return real(graph, threads)

    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.setattr(api, "reference_session", spy)
    art = graphopt.load(digits, threads=1)
    assert api.verify_artifact(art).ok
    assert seen == [1]


_AFFINITY_PROBE = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    import numpy as np
    import graphopt

    import tvm
    from tvm import te

    art = graphopt.load(sys.argv[1], threads=2)  # configures the pool, before its first use
    n = 1 << 20  # a parallel kernel, so the pool's worker thread exists
    A = te.placeholder((n,), name="A")
    B = te.compute((n,), lambda i: A[i] * 2.0, name="B")
    sch = tvm.s_tir.Schedule(te.create_prim_func([A, B]))
    (i,) = sch.get_loops(sch.get_sblock("B"))
    sch.parallel(i)
    kernel = tvm.compile(sch.mod, target="llvm")
    a, b = tvm.runtime.tensor(np.ones(n, "float32")), tvm.runtime.tensor(np.zeros(n, "float32"))
    for _ in range(3):
        kernel(a, b)
    allowed = {}
    for task in Path("/proc/self/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                allowed[task.name] = line.split(":", 1)[1].strip()
    print(json.dumps({"env": {k: os.environ.get(k) for k in ("TVM_BIND_THREADS", "TVM_THREAD_POOL_SPIN_COUNT")},
                      "pinned": sorted(v for v in allowed.values() if "-" not in v and "," not in v)}))
''')


@pytest.mark.skipif(not Path("/proc/self/task").is_dir() or available_cores() < 2
                    or len(os.sched_getaffinity(0)) < 2, reason="reads per-thread CPU affinity in /proc; needs 2 cores")
@pytest.mark.parametrize("user_env", [{}, {"TVM_BIND_THREADS": "1", "TVM_THREAD_POOL_SPIN_COUNT": "300000"}])
def test_runtime_threads_are_unpinned_unless_the_user_says(digits, tmp_path, user_env):
    """TVM pins its workers to single cores by default; graphopt leaves them free (see RUNTIME_POOL_ENV)."""
    from graphopt.targets.cpu import RUNTIME_POOL_ENV

    script = tmp_path / "affinity.py"
    script.write_text(_AFFINITY_PROBE)
    env = {k: v for k, v in os.environ.items() if k not in (*RUNTIME_POOL_ENV, "TVM_NUM_THREADS", THREADS_ENV)}
    proc = subprocess.run([sys.executable, str(script), str(digits)], capture_output=True, text=True,
                          timeout=300, env={**env, **user_env})
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["env"] == (user_env or RUNTIME_POOL_ENV)
    if user_env:
        assert res["pinned"], "TVM's own default pins its worker; the user's TVM_BIND_THREADS=1 must be kept"
    else:
        assert res["pinned"] == []
