"""`graphopt compare`: the bundled digits MLP through two cheap pipelines, end to end (one run, shared by
the tests of its table, JSON and report), then the command's other paths with the building and timing
replaced by stand-ins (fast), and bad input (exit 2, one line, nothing written)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from graphopt import cli
from graphopt import compare as C
from graphopt import compare_report as R
from graphopt.errors import OptionError

from .conftest import run_cli_subprocess

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MODEL = EXAMPLES / "digits_mlp.onnx"
INPUTS = EXAMPLES / "digits_inputs.npz"


def _eval_npz(path: Path, labels=None, **extra) -> Path:
    """--eval takes one .npz: the model's inputs plus 'labels' (one per sample)."""
    with np.load(INPUTS) as z:
        image = z["image"]
    labels = np.load(EXAMPLES / "digits_labels.npy") if labels is None else labels
    np.savez(path, image=image, labels=labels, **extra)
    return path


def _pipelines(folder: Path) -> tuple[Path, Path]:
    int8 = folder / "int8.toml"
    int8.write_text('passes = ["quantize(mode=dynamic)"]\n')
    prune = folder / "prune50.toml"
    prune.write_text('[[pass]]\nname = "prune"\nsparsity = 0.5\n')
    return int8, prune


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One real `graphopt compare` (a process of its own, stdout not a terminal: no progress)."""
    tmp = tmp_path_factory.mktemp("compare")
    int8, prune = _pipelines(tmp)
    ev = _eval_npz(tmp / "eval.npz")
    out = tmp / "report"
    p = run_cli_subprocess("compare", MODEL, "--pipelines", int8, prune, "--data", INPUTS, "--eval", ev,
                           "-o", out, "--seconds", "0.5")
    doc = json.loads((out / "compare.json").read_text()) if (out / "compare.json").is_file() else None
    return {"proc": p, "out": out, "doc": doc, "tmp": tmp, "int8": int8, "prune": prune, "eval": ev}


def _row(doc, name):
    return next(r for r in doc["rows"] if r["name"] == name)


def test_table_and_exit_code(run):
    p = run["proc"]
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""  # not a terminal: no progress; no note, no error
    lines = p.stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("name "))
    assert lines[head].split() == ["name", "pipeline", ".onnx", "weights", "FLOPs", "accuracy", "drop", "latency",
                                   "x", "orig", "artifact", "front"]
    rows = lines[head + 1:head + 4]
    assert [r.split()[0] for r in rows] == ["original", "int8", "prune50"]
    assert "quantize(mode=dynamic)" in rows[1] and "prune(sparsity=0.5)" in rows[2]
    # Aligned: every row's numeric columns end where the header's do.
    end = lines[head].index("accuracy") + len("accuracy")
    assert all(r[end - 1] != " " and r[end] == " " for r in rows)
    assert rows[0].split()[-4] == "1.00"  # the original's latency ratio (then "86.7 KiB  latency")
    assert lines[-1] == f"report: {run['out'] / 'report.html'} (figures in {run['out'] / 'compare.json'})"
    assert sorted(os.listdir(run["out"])) == ["compare.json", "report.html"]  # the artifacts are not kept
    assert not [n for n in os.listdir(run["out"].parent) if n.startswith(".report")]  # no temp folder left


def test_json_document(run):
    doc = run["doc"]
    assert doc["format"] == "graphopt-compare" and doc["ok"] is True and doc["exit_code"] == 0
    assert {"model", "target", "data", "eval", "metric", "eval_samples", "baseline", "timing", "rows", "notes",
            "report", "graphopt", "format_version"} <= set(doc)
    assert doc["target"] == {"name": "cpu", "options": {}} and doc["eval_samples"] == 32
    assert doc["metric"] == "top-1 accuracy" and doc["baseline"] == "original" and doc["notes"] == []
    t = doc["timing"]
    assert t["batch"] == 32 and t["rounds"] >= 5 and t["error"] is None
    keys = set(C._empty_row(C.Candidate("x", "", None)))
    assert all(set(r) == keys for r in doc["rows"])  # the same keys in every row, failed or not
    orig, int8, prune = (_row(doc, n) for n in ("original", "int8", "prune50"))
    assert orig["baseline"] and not int8["baseline"]
    assert orig["spec"] == "cleanup,unroll-loops,fold-batchnorm,cleanup"
    assert int8["spec"] == "quantize(mode=dynamic)" and int8["source"] == str(run["int8"])
    for r in (orig, int8, prune):
        assert r["ok"] and r["error"] is None
        assert r["onnx_bytes"] > 0 and r["weight_bytes"] > 0 and r["flops"] > 0 and r["artifact_bytes"] > 0
        assert r["latency_ms"] > 0 and r["latency_p10_ms"] <= r["latency_ms"] <= r["latency_p90_ms"]
        assert r["verification"]["ok"] is True
        assert abs(r["accuracy_drop"] - (orig["accuracy"] - r["accuracy"])) < 1e-9
        assert r["latency_ratio"] == pytest.approx(r["latency_ms"] / orig["latency_ms"], rel=1e-3)
        assert abs(r["artifact_accuracy"] - r["accuracy"]) <= 100 / 32 + 1e-9  # at most one sample apart
    assert orig["accuracy"] >= 90 and orig["accuracy_drop"] == 0 and orig["latency_ratio"] == 1
    assert orig["flops"] == orig["flops_all_nodes"] > 9000  # no constant subgraph in the float model
    assert int8["weight_bytes"] < orig["weight_bytes"] / 3 and int8["onnx_bytes"] < orig["onnx_bytes"]
    assert prune["weight_bytes"] < orig["weight_bytes"] and prune["nonzeros"] < 0.7 * orig["nonzeros"]
    assert any("2368 of 4736 weights zeroed" in n for n in prune["notes"])
    # The sparse weights' decoding runs once at lower time: not in the per-run FLOPs, in the all-nodes count.
    assert prune["flops"] <= orig["flops"] < prune["flops_all_nodes"]
    assert int8["pareto"]["size"]  # the smallest model, as accurate as any
    assert any(r["pareto"]["latency"] for r in doc["rows"])
    assert doc["report"]["html"] == str(run["out"] / "report.html")


def test_accuracy_agrees_with_optimize_eval(run, tmp_path, capsys):
    doc = run["doc"]
    for name, toml in (("int8", run["int8"]), ("prune50", run["prune"])):
        rep = tmp_path / f"{name}.json"
        assert cli.main(["optimize", str(MODEL), "--pipeline", str(toml), "--data", str(INPUTS), "--eval",
                         str(run["eval"]), "-o", str(tmp_path / f"{name}.onnx"), "--report", str(rep), "-q"]) == 0
        acc = json.loads(rep.read_text())["accuracy"]
        assert acc["final"] == _row(doc, name)["accuracy"]
        assert acc["float"] == _row(doc, "original")["accuracy"]
        assert acc["drop"] == pytest.approx(_row(doc, name)["accuracy_drop"], abs=1e-6)


def test_report_html_is_self_contained_with_plots(run):
    text = (run["out"] / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>")
    low = text.lower()
    for banned in ("http://", "https://", "src=", "<script", "<link", "@import", "<img", "<iframe", "<object"):
        assert banned not in low, banned
    refs = re.findall(r'href="([^"]*)"', text) + re.findall(r"url\(([^)]*)\)", text)
    assert refs and all(h.startswith("#") for h in refs)  # only inside the page (SVG markers, clip paths)
    assert text.count("<svg") == 2 and text.count("</svg>") == 2
    assert 'id="plot-size"' in text and 'id="plot-latency"' in text
    assert "Accuracy vs model size" in text and "Accuracy vs latency" in text
    for name in ("original", "int8", "prune50"):
        assert text.count(f">{name}<") >= 3  # table, and a label in each plot


def test_report_html_is_deterministic(run):
    """The page is a function of compare.json: rendering it again (another process) gives the same bytes."""
    doc = json.loads((run["out"] / "compare.json").read_text())
    again = R.render_html(doc, R.plots_svg(doc))
    assert again == (run["out"] / "report.html").read_text()


@pytest.mark.slow
def test_report_renders_in_headless_chromium(run, tmp_path):
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
                    if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no chromium here (apt-get install chromium)")
    png = tmp_path / "report.png"
    p = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1400,1300", f"--screenshot={png}", (run["out"] / "report.html").as_uri()],
                       capture_output=True, text=True, timeout=120)
    if not png.is_file():
        pytest.skip(f"{browser} made no screenshot: {p.stderr.strip().splitlines()[-1:]}")
    from matplotlib import image

    img = image.imread(str(png))[..., :3]
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    not_white = np.any(img < 0.9, axis=-1)
    assert not_white.mean() > 0.01  # text, table and plots, not a blank page
    # The plots' Pareto-front green (#0b6e4f) is drawn: filled points and the staircase.
    green = np.all(np.abs(img - np.array([0x0b, 0x6e, 0x4f]) / 255) < 0.08, axis=-1)
    assert green[img.shape[0] // 4:].sum() > 50


# --------------------------------------------------------------------------- stand-ins for build and timing
@pytest.fixture
def fake(monkeypatch, tmp_path):
    """compare with its building and timing replaced: rows from a table, one interleaved 'measurement'."""
    made = {"original": dict(onnx_bytes=19000, weight_bytes=18000, flops=9550, accuracy=96.875),
            "int8": dict(onnx_bytes=7000, weight_bytes=5000, flops=14000, accuracy=96.875),
            "prune50": dict(onnx_bytes=13000, weight_bytes=11000, flops=9000, accuracy=93.75)}
    latency = {"original": 0.05, "int8": 0.07, "prune50": 0.04}
    calls = {"timed": None}

    def build_row(c, graph, tgt, dest, data, eval_set, **kw):
        if c.name not in made:
            raise OptionError(f"pass 'x': {c.name} cannot be built")
        dest.mkdir()
        (dest / "main.so").write_bytes(b"x" * 1000)
        row = C._empty_row(c)
        row.update(made[c.name], ok=True, nodes=4, params=1, nonzeros=1, flops_all_nodes=made[c.name]["flops"],
                   artifact_bytes=1000, artifact_accuracy=made[c.name]["accuracy"])
        return row

    def time_artifacts(built, feed, **kw):
        calls["timed"] = sorted(built)
        return {"runtimes": {n: {"median_ms": latency[n], "p10_ms": latency[n] * 0.9, "p90_ms": latency[n] * 1.2,
                                 "runs": 100, "peak_rss_bytes": 1 << 20} for n in built},
                "batch": 32, "threads": 1, "rounds": 5, "seconds": 0.5}

    monkeypatch.setattr(C, "_build_row", build_row)
    monkeypatch.setattr(C, "_time_artifacts", time_artifacts)
    int8, prune = _pipelines(tmp_path)
    return {"int8": int8, "prune": prune, "eval": _eval_npz(tmp_path / "eval.npz"), "calls": calls,
            "out": tmp_path / "rep"}


def _args(f, *pipes, out=True, extra=()):
    a = ["compare", str(MODEL), "--pipelines", *map(str, pipes), "--data", str(INPUTS), "--eval", str(f["eval"])]
    return a + (["-o", str(f["out"])] if out else []) + list(extra)


def test_pareto_front():
    pts = {"a": (1, 90), "b": (2, 95), "c": (3, 94), "d": (1, 90), "e": (4, 95)}
    assert C.pareto_front(pts) == {"a", "b", "d"}


def test_json_flag_prints_only_the_document(fake, capsys):
    assert cli.main(_args(fake, fake["int8"], fake["prune"], extra=["--json"])) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)  # exactly one JSON document on stdout
    assert doc == json.loads((fake["out"] / "compare.json").read_text()) and err == ""
    assert fake["calls"]["timed"] == ["int8", "original", "prune50"]  # one interleaved run over all
    assert [r["name"] for r in doc["rows"]] == ["original", "int8", "prune50"]
    assert _row(doc, "prune50")["accuracy_drop"] == pytest.approx(3.125)
    assert _row(doc, "prune50")["latency_ratio"] == pytest.approx(0.8)
    assert _row(doc, "int8")["pareto"] == {"size": True, "latency": False}
    assert _row(doc, "prune50")["pareto"] == {"size": False, "latency": True}  # int8: smaller, more accurate
    assert _row(doc, "original")["pareto"] == {"size": False, "latency": True}


def test_failing_pipeline_is_a_row_and_exit_1(fake, capsys):
    code = cli.main(_args(fake, fake["int8"], "prune(sparsity=0.9)"))
    out, err = capsys.readouterr()
    assert code == 1
    assert err.splitlines() == ["graphopt: error: pipeline 'prune(sparsity=0.9)' failed: "
                                "pass 'x': prune(sparsity=0.9) cannot be built"]
    row = next(ln for ln in out.splitlines() if ln.startswith("prune(sparsity=0.9)"))
    assert "FAILED: pass 'x': prune(sparsity=0.9) cannot be built" in row
    doc = json.loads((fake["out"] / "compare.json").read_text())
    bad = _row(doc, "prune(sparsity=0.9)")
    assert doc["ok"] is False and doc["exit_code"] == 1 and bad["ok"] is False
    assert bad["error"]["kind"] == "OptionError" and bad["accuracy"] is None
    assert fake["calls"]["timed"] == ["int8", "original"]
    html = (fake["out"] / "report.html").read_text()
    assert "FAILED: pass &#x27;x&#x27;: prune(sparsity=0.9) cannot be built" in html


def test_internal_error_in_a_row_exits_3(fake, monkeypatch, capsys):
    build = C._build_row

    def boom(c, *a, **kw):
        if c.name == "int8":
            raise ZeroDivisionError("division by zero")
        return build(c, *a, **kw)

    monkeypatch.setattr(C, "_build_row", boom)
    assert cli.main(_args(fake, fake["int8"], fake["prune"])) == 3
    out, err = capsys.readouterr()
    assert "internal error: ZeroDivisionError: division by zero" in err and "Traceback" not in err
    assert json.loads((fake["out"] / "compare.json").read_text())["exit_code"] == 3


def test_without_matplotlib_the_page_has_the_table_and_says_why(fake, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert cli.main(_args(fake, fake["int8"], fake["prune"])) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"graphopt: note: {R.NO_MATPLOTLIB}"]
    html = (fake["out"] / "report.html").read_text()
    assert "<svg" not in html and "pip install &#x27;graphopt[report]&#x27;" in html and ">int8<" in html
    assert json.loads((fake["out"] / "compare.json").read_text())["notes"] == [R.NO_MATPLOTLIB]


def test_quiet_prints_nothing_and_default_folder(fake, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert cli.main(_args(fake, fake["int8"], out=False, extra=["-q"])) == 0
    assert capsys.readouterr() == ("", "")
    assert sorted(os.listdir(tmp_path / "build" / "digits_mlp-compare")) == ["compare.json", "report.html"]


def test_rerun_replaces_a_report_but_not_another_folder(fake, capsys):
    assert cli.main(_args(fake, fake["int8"])) == 0
    assert cli.main(_args(fake, fake["prune"])) == 0  # a compare report: replaced
    assert [r["name"] for r in json.loads((fake["out"] / "compare.json").read_text())["rows"]] == \
        ["original", "prune50"]
    other = fake["out"].parent / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    capsys.readouterr()
    assert cli.main(_args(fake, fake["int8"])[:-2] + ["-o", str(other)]) == 2
    assert "is not a graphopt compare report" in capsys.readouterr().err
    assert os.listdir(other) == ["keep.txt"]


def test_interrupted_run_leaves_nothing(fake, monkeypatch, capsys):
    def stop(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "_time_artifacts", stop)
    assert cli.main(_args(fake, fake["int8"])) == 130
    assert not fake["out"].exists()
    assert not [n for n in os.listdir(fake["out"].parent) if n.startswith(".rep")]


# --------------------------------------------------------------------------- bad input: exit 2, one line
NO_DATA = object()


def _bad_cases(tmp: Path) -> dict:
    """case: (arguments after the model, text the error line must hold); --data and --eval are added unless
    the case gives its own (NO_DATA: no --data at all)."""
    bad_toml = tmp / "bad.toml"
    bad_toml.write_text("passes = 3\n")
    short = _eval_npz(tmp / "short.npz", labels=np.zeros(31, dtype=np.int64))
    with np.load(INPUTS) as z:
        np.savez(tmp / "nolabels.npz", image=z["image"])
        np.savez(tmp / "wrongname.npz", x=z["image"])
    return {
        "missing pipeline file": (["--pipelines", str(tmp / "missing.toml")], "missing.toml"),
        "missing file, no suffix": (["--pipelines", str(tmp / "sub" / "int8")], "no such pipeline file"),
        "bad option": (["--pipelines", "prune(sparsity=2)"], "option 'sparsity' must be in [0, 1)"),
        "unknown pass": (["--pipelines", "cleanup", "nosuch"], "unknown pass 'nosuch'"),
        "bad TOML": (["--pipelines", str(bad_toml)], "bad.toml"),
        "labels mismatch": (["--pipelines", "cleanup", "--eval", str(short)], "'labels' has 31 entries"),
        "no labels": (["--pipelines", "cleanup", "--eval", str(tmp / "nolabels.npz")], "no 'labels' array"),
        "data mismatch": (["--pipelines", "cleanup", "--data", str(tmp / "wrongname.npz")], "wrongname.npz"),
        "no pipelines": (["--pipelines"], "--pipelines"),
        "pipelines missing": ([], "--pipelines"),
        "no eval": (["--pipelines", "cleanup", "--eval"], "--eval"),
        "needs data": (["--pipelines", "quantize(mode=static)", NO_DATA], "--data"),
        "bad seconds": (["--pipelines", "cleanup", "--seconds", "0"], "seconds = 0.0"),
        "unknown target": (["--pipelines", "cleanup", "--target", "nosuch"], "nosuch"),
    }


@pytest.mark.parametrize("case", ["missing pipeline file", "missing file, no suffix", "bad option", "unknown pass",
                                  "bad TOML", "labels mismatch", "no labels", "data mismatch", "no pipelines",
                                  "pipelines missing", "no eval", "needs data", "bad seconds", "unknown target"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(C, "_build_row", lambda *a, **k: pytest.fail("built despite bad input"))
    args, expect = _bad_cases(tmp_path)[case]
    ev = _eval_npz(tmp_path / "eval.npz")
    argv = ["compare", str(MODEL), "-o", str(tmp_path / "rep")]
    if "--data" not in args and NO_DATA not in args:
        argv += ["--data", str(INPUTS)]
    if "--eval" not in args:
        argv += ["--eval", str(ev)]
    argv += [a for a in args if a is not NO_DATA]
    before = sorted(os.listdir(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: error: ") and expect in lines[0], err
    assert sorted(os.listdir(tmp_path)) == before  # no report folder, no temp folder, no build/


def test_bad_input_with_json_prints_the_error_document(tmp_path, capsys):
    ev = _eval_npz(tmp_path / "eval.npz")
    assert cli.main(["compare", str(MODEL), "--pipelines", str(tmp_path / "missing.toml"), "--eval", str(ev),
                     "-o", str(tmp_path / "rep"), "--json"]) == 2
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["ok"] is False and doc["exit_code"] == 2 and "missing.toml" in doc["error"]["message"]
    assert not (tmp_path / "rep").exists()


def test_output_may_not_contain_an_input(tmp_path, capsys):
    ev = _eval_npz(tmp_path / "eval.npz")
    assert cli.main(["compare", str(MODEL), "--pipelines", "cleanup", "--eval", str(ev), "-o", str(tmp_path)]) == 2
    assert "contains the evaluation data" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["eval.npz"]


def test_pipeline_names_are_unique(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "q.toml").write_text('passes = ["cleanup"]\n')
    (tmp_path / "q.toml").write_text('passes = ["cleanup"]\n')
    from graphopt.pipeline import Pipeline

    rows = C.candidates([a / "q.toml", tmp_path / "q.toml", "cleanup", "cleanup", "  cleanup ",
                         "w2=quantize(mode=weight-only,bits=2)", f"mine={tmp_path / 'q.toml'}", "original=cleanup"],
                        Pipeline.parse("cleanup"))
    assert [r.name for r in rows] == ["original", "q", "q-2", "cleanup", "cleanup-2", "cleanup-3", "w2", "mine",
                                      "original-2"]
    assert rows[6].spec == "quantize(mode=weight-only,bits=2)" and rows[6].source is None
    assert rows[7].source == str(tmp_path / "q.toml")
    with pytest.raises(OptionError, match="no pipelines"):
        C.candidates([], Pipeline.parse("cleanup"))
