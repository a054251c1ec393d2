"""Lower every model of the real-model corpus and print what happened, as a markdown table.

    python benchmarks/corpus_table.py                      # all models of graphopt.testing.REAL_MODELS
    python benchmarks/corpus_table.py --models magika,tashkeel --json table.json

Each model goes through ``graphopt.lower(..., verify=True)`` on the CPU target with
its ``input_shapes``, ``input_values`` and feeds of its own kind (``make_feeds``),
exactly as ``tests/test_corpus.py`` lowers it through the CLI. Everything in the
table is measured in this run: node counts (subgraph nodes included) before and
after the passes, whether it lowered (or the one-line reason it did not), the
largest absolute difference from ONNX Runtime on those feeds, and wall-clock
seconds spent in the passes, in TVM (import + build) and in verification.
Models download once into ``--cache`` (default: the test cache, ``.cache/models``).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def count_nodes(graph_proto) -> int:
    """Nodes of a GraphProto, those of If/Loop/Scan bodies included."""
    n = 0
    for node in graph_proto.node:
        n += 1
        for a in node.attribute:
            if a.HasField("g"):
                n += count_nodes(a.g)
            for g in a.graphs:
                n += count_nodes(g)
    return n


def _step_timer():
    from graphopt.console import Progress

    class StepTimer(Progress):
        """A silent Progress that adds up the seconds of each step graphopt reports."""

        def __init__(self):
            super().__init__(enabled=False)
            self.seconds: dict[str, float] = {}

        @contextlib.contextmanager
        def step(self, label):
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t0

    return StepTimer()


def lower_one(name: str, cache: Path, workdir: Path) -> dict:
    """Lower and verify one corpus model; a dict of what was measured (never raises for graphopt errors)."""
    import graphopt
    from graphopt.data import DataSource
    from graphopt.graph import Graph
    from graphopt.testing import REAL_MODELS, ModelUnavailable, fetch_real_model

    spec = REAL_MODELS[name]
    row = {"model": name, "expected": "lowers" if spec.lowers else "refused: " + ", ".join(spec.refused_ops)}
    try:
        path = fetch_real_model(name, cache)
    except ModelUnavailable as e:
        return {**row, "lowered": False, "error": f"unavailable: {e}"}
    original = Graph.load(path)
    row["nodes_before"] = count_nodes(original.graph)
    kwargs = {"input_shapes": spec.input_shapes, "data": DataSource(feeds=spec.make_feeds(seed=0))}
    if spec.input_values:
        if "input_values" not in inspect.signature(graphopt.lower).parameters:
            return {**row, "lowered": False, "error": "graphopt.lower() has no input_values= in this build"}
        kwargs["input_values"] = spec.input_values
    timer = _step_timer()
    t0 = time.perf_counter()
    try:
        res = graphopt.lower(original, "cpu", workdir / name, verify=True, progress=timer, **kwargs)
    except graphopt.GraphoptError as e:
        row.update(lowered=False, error=f"{type(e).__name__}: {str(e).splitlines()[0]}")
    except Exception as e:  # noqa: BLE001 - an internal error is a result worth tabulating too
        row.update(lowered=False, error=f"internal {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
    else:
        row.update(lowered=True, nodes_after=count_nodes(res.graph.graph),
                   max_abs_error=res.verification.max_abs, verified=res.verification.ok)
    row["total_s"] = round(time.perf_counter() - t0, 2)
    secs = timer.seconds
    row["passes_s"] = round(sum(v for k, v in secs.items() if k.startswith("pass ")), 2)
    row["tvm_s"] = round(sum(v for k, v in secs.items() if k.startswith(("import into", "compile for"))), 2)
    row["verify_s"] = round(sum(v for k, v in secs.items() if k.startswith("verify")), 2)
    return row


def markdown(rows: list[dict]) -> str:
    head = ("| model | nodes before | nodes after | lowered? | max abs error vs ORT | passes s | TVM import+build s "
            "| verify s | total s | expected |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        if r.get("lowered"):
            status = "yes" + ("" if r.get("verified") else " (outside tolerance)")
            err = f"{r['max_abs_error']:.2g}"
        else:
            reason = r.get("error", "?")
            status = "no: " + (reason if len(reason) <= 320 else reason[:317] + "...").replace("|", "\\|")
            err = "–"
        lines.append(
            f"| {r['model']} | {r.get('nodes_before', '–')} | {r.get('nodes_after', '–')} | {status} | {err} "
            f"| {r.get('passes_s', '–')} | {r.get('tvm_s', '–')} | {r.get('verify_s', '–')} | {r.get('total_s', '–')} "
            f"| {r['expected']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    sys.path.insert(0, str(REPO))
    from graphopt.testing import REAL_MODELS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", help=f"comma-separated subset of: {', '.join(REAL_MODELS)}")
    p.add_argument("--cache", default=str(REPO / ".cache" / "models"), help="model cache folder")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    names = args.models.split(",") if args.models else list(REAL_MODELS)
    unknown = [n for n in names if n not in REAL_MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(REAL_MODELS)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="graphopt-corpus-") as tmp:
        for name in names:
            print(f"… {name}", file=sys.stderr, flush=True)
            rows.append(lower_one(name, Path(args.cache), Path(tmp)))
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
