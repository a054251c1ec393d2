#!/usr/bin/env python
"""How TVM's runtime thread-pool settings change an artifact's latency, alone and beside other work.

graphopt sets ``TVM_BIND_THREADS=0`` and ``TVM_THREAD_POOL_SPIN_COUNT=10000`` before an artifact's
first run unless the environment already says otherwise (``graphopt.targets.cpu.RUNTIME_POOL_ENV``);
TVM's own defaults are pinned workers that spin 300000 ``sched_yield``s after each parallel region.
This script measures both, each configuration in a fresh process (TVM reads them once, when its pool
starts), in three situations:

- ``alone``: median latency of one call on an otherwise idle machine;
- ``core busy``: the same while another process keeps the last core busy (a pure-Python busy loop
  pinned there: what a neighbouring service or build does to a deployed model);
- ``CPU after``: CPU time the process burns in the 50 ms after a call returns (its workers spinning),
  which a neighbour on the same cores loses; shown as % of one core.

Configurations alternate (A, B, A, B, ...) for ``--repeat`` rounds; medians of rounds are printed.

Usage::

    python benchmarks/bench_threadpool.py ARTIFACT [--inputs FEED.npz] [--repeat 3] [--seconds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

CONFIGS = {
    "TVM defaults (pinned, spin 300000)": {"TVM_BIND_THREADS": "1", "TVM_THREAD_POOL_SPIN_COUNT": "300000"},
    "graphopt defaults (unpinned, spin 10000)": {"TVM_BIND_THREADS": "0", "TVM_THREAD_POOL_SPIN_COUNT": "10000"},
}


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def child(artifact: str, inputs: str | None, seconds: float, busy_core: bool) -> dict:
    import graphopt

    art = graphopt.load(artifact)
    if inputs:
        with np.load(inputs) as z:
            feed = {k: z[k] for k in z.files}
    else:
        from graphopt.data import DataSource
        from graphopt.graph import Graph

        feed = DataSource(None, seed=0).samples(Graph.load(os.path.join(artifact, "model.onnx")), limit=1)[0]
    prog = art.programs["main"]
    args = [np.asarray(feed[s.name], order="C") for s in art.inputs]
    for _ in range(3):
        prog(args)
    hog = None
    if busy_core:
        core = max(os.sched_getaffinity(0))
        hog = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"])
        time.sleep(0.2)
    times = []
    end = time.perf_counter() + seconds
    try:
        while time.perf_counter() < end or len(times) < 5:
            t0 = time.perf_counter()
            prog(args)
            times.append(time.perf_counter() - t0)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    # CPU burnt after a call: run once, then sleep 50 ms and see how much CPU the process used meanwhile.
    burns = []
    for _ in range(5):
        prog(args)
        c0, w0 = _cpu_seconds(), time.perf_counter()
        time.sleep(0.05)
        burns.append((_cpu_seconds() - c0) / (time.perf_counter() - w0))
    return {"median_ms": float(np.median(times)) * 1e3, "runs": len(times), "cpu_after": float(np.median(burns)),
            "threads": art.threads}


def run_child(env_over: dict, args, busy: bool) -> dict:
    env = {**os.environ, **env_over}
    cmd = [sys.executable, __file__, "--child", args.artifact, "--seconds", str(args.seconds)]
    if args.inputs:
        cmd += ["--inputs", args.inputs]
    if busy:
        cmd.append("--busy")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact")
    p.add_argument("--inputs", help=".npz with one array per input (default: generated)")
    p.add_argument("--repeat", type=int, default=3, help="alternating rounds per configuration (default 3)")
    p.add_argument("--seconds", type=float, default=1.0, help="timed calls per measurement (default 1 s)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--busy", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.artifact, args.inputs, args.seconds, args.busy)))
        return 0
    res: dict[str, dict[str, list]] = {name: {"alone": [], "busy": [], "cpu_after": []} for name in CONFIGS}
    for _ in range(args.repeat):
        for name, env in CONFIGS.items():
            a = run_child(env, args, busy=False)
            b = run_child(env, args, busy=True)
            res[name]["alone"].append(a["median_ms"])
            res[name]["busy"].append(b["median_ms"])
            res[name]["cpu_after"].append(a["cpu_after"])
    print(f"{args.artifact}: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}, "
          f"{args.repeat} alternating rounds; medians of rounds")
    print(f"| configuration | alone ms | one core busy ms | busy / alone | CPU after a call |")
    print("|---|---|---|---|---|")
    for name, r in res.items():
        alone, busy = float(np.median(r["alone"])), float(np.median(r["busy"]))
        print(f"| {name} | {alone:.3f} | {busy:.3f} | {busy / alone:.2f}x | {100 * float(np.median(r['cpu_after'])):.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
