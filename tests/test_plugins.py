"""The plugin mechanism, end to end, through real entry points (no mocks of pluggy or importlib).

* the example plugin (``plugins/graphopt-example-plugin``, pip-installed into the
  environment) is found through its ``graphopt`` entry point, its pass runs in a
  pipeline and its instrument hook reaches the pass records;
* throw-away plugins are made "installed" by writing a module plus a
  ``*.dist-info`` folder (``METADATA`` + ``entry_points.txt``) into ``tmp_path``
  and putting that folder on ``PYTHONPATH`` / ``sys.path``: a plugin that fails
  to import, one whose registration hook raises, one whose pass raises in
  ``run``, one whose instrument raises, and one whose pass name is taken.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "plugins" / "graphopt-example-plugin"
BUILTIN_PASSES = {"cleanup", "fold-constants", "eliminate-identity", "eliminate-dead", "dedup-initializers"}


# --------------------------------------------------------------------------- models
def doc_model(with_subgraph: bool = True) -> onnx.ModelProto:
    """x[1,4] -> MatMul(w) -> Add(b) -> Relu -> y[1,3], doc strings everywhere, metadata.

    With ``with_subgraph`` an If node (constant condition) adds a second output
    whose branches carry doc strings of their own.
    """
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")
    w.doc_string = "weight"
    b = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm", doc_string="File model.py, line 10"),
        helper.make_node("Add", ["h", "b"], ["h2"], name="add", doc_string="File model.py, line 11"),
        helper.make_node("Relu", ["h2"], ["y"], name="relu"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    x.doc_string = "the input"
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])]
    inits = [w, b]
    if with_subgraph:
        then_g = helper.make_graph(
            [helper.make_node("Neg", ["y"], ["t"], doc_string="then node")], "then",
            [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 3])], doc_string="then branch")
        else_g = helper.make_graph(
            [helper.make_node("Abs", ["y"], ["e"], doc_string="else node")], "else",
            [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 3])], doc_string="else branch")
        nodes.append(helper.make_node("If", ["cond"], ["z"], name="if", then_branch=then_g, else_branch=else_g,
                                      doc_string="the If"))
        inits.append(numpy_helper.from_array(np.array(True), "cond"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3]))
    g = helper.make_graph(nodes, "g", [x], outputs, inits, doc_string="the graph")
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="graphopt-tests",
                          doc_string="the model")
    m.ir_version = 8
    helper.set_model_props(m, {"author": "someone", "run": "42"})
    onnx.checker.check_model(m)
    return m


def doc_strings(msg) -> list[str]:
    """Every non-empty ``doc_string`` in a proto, found generically (independent of the plugin's walk)."""
    found = []
    for fd, value in msg.ListFields():
        if fd.name == "doc_string" and value:
            found.append(value)
        elif fd.type == fd.TYPE_MESSAGE:
            items = [value] if hasattr(value, "ListFields") else value  # one message or a repeated field
            for item in items:
                found += doc_strings(item)
    return found


# --------------------------------------------------------------------------- throw-away plugins
def write_plugin(root: Path, dist: str, module: str, entry_point: str, source: str) -> None:
    """Make ``module`` an installed distribution ``dist`` exposing ``entry_point`` in the graphopt group."""
    (root / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(f"[graphopt]\n{entry_point} = {module}\n", encoding="utf-8")


BROKEN = '''
    import os
    marker = os.environ.get("BROKEN_PLUGIN_MARKER")
    if marker:  # lets a test see whether graphopt imported this module at all
        with open(marker, "a") as f:
            f.write("imported\\n")
    raise RuntimeError("boom")
'''

HOOK_RAISES = '''
    import graphopt

    @graphopt.hookimpl
    def graphopt_register_passes():
        raise ValueError("no passes today")

    @graphopt.hookimpl
    def graphopt_pass_end(pass_, graph, record, context):
        record.details["hookfail.ran"] = True
'''

RAISER = '''
    import graphopt

    class RaisingPass(graphopt.Pass):
        """Always fails."""
        name = "raising-pass"

        def run(self, graph, ctx):
            raise RuntimeError("kaput")

    @graphopt.hookimpl
    def graphopt_register_passes():
        return [RaisingPass]
'''

BAD_INSTRUMENT = '''
    import graphopt

    @graphopt.hookimpl
    def graphopt_pass_end(pass_, graph, record, context):
        raise KeyError("no such detail")
'''

PARTIAL = '''
    import graphopt

    class Good(graphopt.Pass):
        """Fine on its own."""
        name = "partial-good"

        def run(self, graph, ctx):
            return graph

    @graphopt.hookimpl
    def graphopt_register_passes():
        return [Good]

    @graphopt.hookimpl
    def graphopt_register_targets():
        raise RuntimeError("no targets")
'''

DUPLICATE = '''
    import graphopt

    class OtherStripDocs(graphopt.Pass):
        """A second pass that claims the name strip-docs."""
        name = "strip-docs"

        def run(self, graph, ctx):
            return graph

    @graphopt.hookimpl
    def graphopt_register_passes():
        return [OtherStripDocs]
'''


def cli(*args, cwd: Path, pythonpath: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m graphopt.cli ARGS`` as a real process (so entry points are discovered from scratch)."""
    full = {k: v for k, v in os.environ.items() if k not in ("GRAPHOPT_DISABLE_PLUGINS", "PYTHONPATH")}
    if pythonpath is not None:
        full["PYTHONPATH"] = str(pythonpath)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *map(str, args)], capture_output=True, text=True,
                          env=full, cwd=cwd, timeout=120)


def plugins_json(*args, **kw) -> dict[str, dict]:
    res = cli("plugins", "--json", *args, **kw)
    assert res.returncode == 0, res.stderr
    return {p["name"]: p for p in json.loads(res.stdout)}


def stderr_lines(res) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.strip()]


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    """No plugin disabled from outside; tests here rebuild the process-wide registry, so leave a fresh one."""
    monkeypatch.delenv("GRAPHOPT_DISABLE_PLUGINS", raising=False)
    yield
    graphopt.get_registry(reload=True)


@pytest.fixture
def installed(tmp_path):
    """Install throw-away plugins into this process: write_plugin + tmp_path on sys.path, undone afterwards."""
    modules: list[str] = []

    def add(dist, module, entry_point, source):
        write_plugin(tmp_path, dist, module, entry_point, source)
        modules.append(module)

    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    try:
        yield add
    finally:
        sys.path.remove(str(tmp_path))
        for m in modules:
            sys.modules.pop(m, None)
        importlib.invalidate_caches()
        graphopt.get_registry(reload=True)


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(doc_model(), path)
    return path


# --------------------------------------------------------------------------- the example plugin
def test_example_plugin_is_an_installed_distribution_with_a_graphopt_entry_point():
    try:
        dist = importlib.metadata.distribution("graphopt-example-plugin")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"the example plugin is not installed; run: pip install -e {EXAMPLE_DIR}")
    eps = [ep for ep in dist.entry_points if ep.group == "graphopt"]
    assert [(ep.name, ep.value) for ep in eps] == [("example", "graphopt_example_plugin")]
    assert any(r.startswith("graphopt") for r in dist.requires or [])


def test_example_plugin_uses_only_the_public_api():
    src = (EXAMPLE_DIR / "graphopt_example_plugin" / "__init__.py").read_text(encoding="utf-8")
    tree = ast.parse(src)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert not (node.module or "").startswith("graphopt"), f"imports graphopt internals: {node.module}"
        if isinstance(node, ast.Import):
            assert all(a.name == "graphopt" or not a.name.startswith("graphopt.") for a in node.names)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "graphopt":
            assert node.attr in graphopt.__all__, f"graphopt.{node.attr} is not public API"


def test_registry_finds_example_plugin_through_entry_points():
    reg = graphopt.get_registry(reload=True)
    info = reg.plugins["example"]
    assert info.status == "loaded" and info.error is None
    assert info.passes == ["strip-docs"] and info.targets == []
    assert "graphopt_example_plugin" in info.source and "graphopt-example-plugin 0.1.0" in info.source
    cls = reg.get_pass("strip-docs")
    assert issubclass(cls, graphopt.Pass) and cls.plugin == "example" and cls.lossless
    assert [o.name for o in cls.options] == ["keep_metadata"]
    # the example's hookimpls are registered with pluggy under the entry-point name
    assert "example" in [impl.plugin_name for impl in reg.pm.hook.graphopt_pass_end.get_hookimpls()]
    # built-ins register through the same mechanism and are unaffected
    assert BUILTIN_PASSES <= set(reg.passes) and "cpu" in reg.targets


def test_strip_docs_runs_in_a_pipeline_and_removes_doc_strings():
    model = doc_model()
    before = doc_strings(model)
    assert len(before) == 11  # the test model really has doc strings, in the subgraphs too
    graph = graphopt.Graph(model)
    res = graphopt.optimize(graph, "strip-docs")
    out = res.graph.model
    assert doc_strings(out) == []
    assert doc_strings(graph.model) == before, "the input graph must not be modified"
    assert {p.key: p.value for p in out.metadata_props} == {"author": "someone", "run": "42"}  # kept by default
    assert len(out.graph.node) == 4 and out.graph.node[3].attribute  # nothing but docs removed

    (rec,) = res.records
    assert (rec.name, rec.plugin, rec.pipeline, rec.lossless) == ("strip-docs", "example", "strip-docs", True)
    assert rec.details["doc_strings_removed"] == len(before)
    assert rec.details["metadata_props_removed"] == 0
    assert rec.verification["max_abs"] == 0.0  # checked against ONNX Runtime as a lossless pass
    assert rec.details["example.node_count"] == 4  # the example's instrument hook ran
    assert res.report["passes"][0]["details"]["example.node_count"] == 4


def test_strip_docs_keep_metadata_false_clears_metadata_props():
    res = graphopt.optimize(graphopt.Graph(doc_model(with_subgraph=False)), "strip-docs(keep_metadata=false)")
    assert list(res.graph.model.metadata_props) == []
    assert res.records[0].details["metadata_props_removed"] == 2
    assert res.pipeline == "strip-docs(keep_metadata=false)"


def test_strip_docs_rejects_bad_option_values():
    with pytest.raises(graphopt.OptionError, match="keep_metadata"):
        graphopt.optimize(graphopt.Graph(doc_model()), "strip-docs(keep_metadata=maybe)")
    with pytest.raises(graphopt.OptionError, match="valid options: keep_metadata"):
        graphopt.optimize(graphopt.Graph(doc_model()), "strip-docs(keep_docs=true)")


def test_example_instrument_sees_every_pass_including_built_ins():
    g = graphopt.Graph(doc_model(with_subgraph=False))
    res = graphopt.optimize(g, "eliminate-dead,strip-docs")
    assert [r.details.get("example.node_count") for r in res.records] == [3, 3]


def test_disabling_the_example_plugin_removes_its_pass_and_instrument(monkeypatch):
    with monkeypatch.context() as mp:
        mp.setenv("GRAPHOPT_DISABLE_PLUGINS", "example")
        reg = graphopt.get_registry(reload=True)
        assert reg.plugins["example"].status == "disabled"
        assert "strip-docs" not in reg.passes
        with pytest.raises(graphopt.OptionError, match="unknown pass 'strip-docs'"):
            graphopt.optimize(graphopt.Graph(doc_model()), "strip-docs")
        res = graphopt.optimize(graphopt.Graph(doc_model()), "eliminate-dead")
        assert "example.node_count" not in res.records[0].details
    assert graphopt.get_registry().plugins["example"].status == "loaded"  # env gone: rebuilt with it


def test_disable_list_tolerates_spaces_and_the_registry_is_reused(monkeypatch):
    with monkeypatch.context() as mp:
        mp.setenv("GRAPHOPT_DISABLE_PLUGINS", " example , not-installed")
        reg = graphopt.get_registry()
        assert reg.plugins["example"].status == "disabled"
        assert graphopt.get_registry() is reg  # not rebuilt (and plugins not re-imported) on every call
        assert graphopt.get_registry(["example"]) is reg
        assert graphopt.get_registry(["graphopt.targets"]) is not reg


def test_cli_plugins_json_shows_example_with_its_source(tmp_path):
    plugins = plugins_json(cwd=tmp_path)
    ex = plugins["example"]
    assert ex["status"] == "loaded" and ex["error"] is None
    assert ex["passes"] == ["strip-docs"]
    assert ex["source"] == "graphopt_example_plugin (graphopt-example-plugin 0.1.0)"
    assert plugins["graphopt.passes"]["status"] == "loaded"


def test_cli_optimize_with_the_example_pass(tmp_path, model_file):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    res = cli("optimize", model_file, "--passes", "cleanup,strip-docs", "-o", out, "--report", report, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert doc_strings(onnx.load(out)) == []
    passes = json.loads(report.read_text())["passes"]
    assert [p["plugin"] for p in passes] == ["graphopt.passes", "example"]
    assert passes[1]["details"]["doc_strings_removed"] > 0
    assert all("example.node_count" in p["details"] for p in passes)


# --------------------------------------------------------------------------- a plugin that fails to import
@pytest.fixture
def broken(tmp_path) -> Path:
    write_plugin(tmp_path, "broken-plugin", "broken_plugin", "broken", BROKEN)
    return tmp_path


def test_broken_plugin_is_listed_as_failed_and_the_others_load(broken):
    plugins = plugins_json(cwd=broken, pythonpath=broken)
    b = plugins["broken"]
    assert b["status"] == "failed"
    assert "boom" in b["error"] and "RuntimeError" in b["error"] and "import" in b["error"]
    assert b["source"] == "broken_plugin (broken-plugin 0.1)"
    assert b["passes"] == [] and b["targets"] == []
    assert plugins["example"]["status"] == "loaded"
    assert plugins["graphopt.passes"]["status"] == "loaded"
    assert plugins["graphopt.targets"]["status"] == "loaded"


def test_broken_plugin_does_not_stop_listing_passes(broken):
    res = cli("passes", cwd=broken, pythonpath=broken)
    assert res.returncode == 0, res.stderr
    assert "fold-constants" in res.stdout and "strip-docs" in res.stdout
    (warning,) = stderr_lines(res)
    assert warning.startswith("graphopt: warning:") and "'broken'" in warning and "boom" in warning


def test_broken_plugin_does_not_stop_optimize(broken, model_file):
    out = broken / "out.onnx"
    res = cli("optimize", model_file, "--passes", "cleanup", "-o", out, cwd=broken, pythonpath=broken)
    assert res.returncode == 0, res.stderr
    (warning,) = stderr_lines(res)  # exactly one line, naming the plugin and how to switch it off
    assert "warning" in warning and "'broken'" in warning and "--disable-plugin broken" in warning
    assert "Traceback" not in res.stderr
    assert graphopt.Graph.load(out).graph.node


@pytest.mark.parametrize("how", ["flag", "env"])
def test_disabled_broken_plugin_is_not_loaded_and_not_warned_about(broken, model_file, how):
    if how == "flag":
        args, env = ["--disable-plugin", "broken"], None
    else:
        args, env = [], {"GRAPHOPT_DISABLE_PLUGINS": "broken"}
    plugins = plugins_json(*args, cwd=broken, pythonpath=broken, env=env)
    assert plugins["broken"]["status"] == "disabled" and plugins["broken"]["error"] is None
    assert plugins["example"]["status"] == "loaded"
    out = broken / "out.onnx"
    res = cli("optimize", model_file, "--passes", "cleanup", "-o", out, *args, cwd=broken, pythonpath=broken, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert out.exists()


@pytest.mark.parametrize("how", [
    "flag",
    "env",
])
def test_disabled_plugin_is_never_imported(broken, model_file, how):
    marker = broken / "imported.txt"
    args = ["--disable-plugin", "broken"] if how == "flag" else []
    env = {"BROKEN_PLUGIN_MARKER": str(marker)}
    if how == "env":
        env["GRAPHOPT_DISABLE_PLUGINS"] = "broken"
    res = cli("optimize", model_file, "--passes", "cleanup", "-o", broken / "out.onnx", *args,
              cwd=broken, pythonpath=broken, env=env)
    assert res.returncode == 0, res.stderr
    assert not marker.exists(), f"disabled plugin was imported: {marker.read_text()!r}"


def test_marker_shows_an_enabled_broken_plugin_is_imported(broken, model_file):
    """Control for the test above: the marker does work when the plugin is not disabled."""
    marker = broken / "imported.txt"
    res = cli("passes", "-q", cwd=broken, pythonpath=broken, env={"BROKEN_PLUGIN_MARKER": str(marker)})
    assert res.returncode == 0
    assert marker.read_text().count("imported") >= 1


def test_unknown_pass_hint_names_the_broken_plugin(broken, model_file):
    res = cli("optimize", model_file, "--passes", "from-broken", "-o", broken / "out.onnx", cwd=broken,
              pythonpath=broken)
    assert res.returncode == 2
    err = stderr_lines(res)[-1]
    assert "unknown pass 'from-broken'" in err and "plugins that failed to load: broken" in err


# --------------------------------------------------------------------------- a registration hook that raises
def test_registration_hook_that_raises_is_recorded_as_failed(installed):
    installed("hookfail-plugin", "hookfail_plugin", "hookfail", HOOK_RAISES)
    reg = graphopt.get_registry(reload=True)
    info = reg.plugins["hookfail"]
    assert info.status == "failed"
    assert "graphopt_register_passes" in info.error and "ValueError" in info.error and "no passes today" in info.error
    assert info.source == "hookfail_plugin (hookfail-plugin 0.1)"
    assert [p.name for p in reg.failures()] == ["hookfail"]
    # a failed plugin is unregistered: its instrument hook does not run
    assert "hookfail" not in [i.plugin_name for i in reg.pm.hook.graphopt_pass_end.get_hookimpls()]
    # the others keep working
    assert reg.plugins["example"].status == "loaded" and reg.plugins["graphopt.passes"].status == "loaded"
    res = graphopt.optimize(graphopt.Graph(doc_model()), "cleanup,strip-docs", registry=reg)
    assert doc_strings(res.graph.model) == []
    assert all("hookfail.ran" not in r.details and "example.node_count" in r.details for r in res.records)


def test_registration_hook_that_raises_cli(tmp_path, model_file):
    write_plugin(tmp_path, "hookfail-plugin", "hookfail_plugin", "hookfail", HOOK_RAISES)
    plugins = plugins_json(cwd=tmp_path, pythonpath=tmp_path)
    assert plugins["hookfail"]["status"] == "failed"
    assert "graphopt_register_passes raised ValueError: no passes today" in plugins["hookfail"]["error"]
    res = cli("optimize", model_file, "--passes", "cleanup", "-o", tmp_path / "out.onnx", "--report",
              tmp_path / "r.json", cwd=tmp_path, pythonpath=tmp_path)
    assert res.returncode == 0, res.stderr
    (warning,) = stderr_lines(res)
    assert "'hookfail'" in warning and "graphopt_register_passes" in warning
    assert "hookfail.ran" not in (tmp_path / "r.json").read_text()


# --------------------------------------------------------------------------- a plugin pass that raises in run
def test_plugin_pass_that_raises_fails_cleanly(tmp_path, model_file):
    write_plugin(tmp_path, "raiser-plugin", "raiser_plugin", "raiser", RAISER)
    out = tmp_path / "out.onnx"
    for pipeline in ("raising-pass", "cleanup,raising-pass"):
        res = cli("optimize", model_file, "--passes", pipeline, "-o", out, cwd=tmp_path, pythonpath=tmp_path)
        assert res.returncode == 2, (pipeline, res.stderr)
        (err,) = stderr_lines(res)
        assert err.startswith("graphopt: error:")
        assert "'raising-pass'" in err and "'raiser'" in err and "RuntimeError: kaput" in err
        assert "Traceback" not in res.stderr
        assert not out.exists()
        assert list(tmp_path.glob("out*")) == []  # no temporary left behind either


def test_plugin_pass_error_stays_one_line_for_multiline_messages(tmp_path, model_file):
    source = RAISER.replace('"kaput"', '"kaput\\nsecond line"')
    write_plugin(tmp_path, "raiser-plugin", "raiser_plugin", "raiser", source)
    res = cli("optimize", model_file, "--passes", "raising-pass", "-o", tmp_path / "out.onnx", cwd=tmp_path,
              pythonpath=tmp_path)
    assert res.returncode == 2
    (err,) = stderr_lines(res)
    assert "RuntimeError: kaput" in err


def test_plugin_pass_that_raises_api(installed):
    installed("raiser-plugin", "raiser_plugin", "raiser", RAISER)
    reg = graphopt.get_registry(reload=True)
    assert reg.plugins["raiser"].passes == ["raising-pass"]
    with pytest.raises(graphopt.PluginError, match=r"pass 'raising-pass' from plugin 'raiser' failed") as ei:
        graphopt.optimize(graphopt.Graph(doc_model()), "raising-pass", registry=reg)
    assert isinstance(ei.value.__cause__, RuntimeError)  # the original error stays reachable (--debug)


def test_plugin_instrument_that_raises_names_the_plugin(tmp_path, model_file):
    write_plugin(tmp_path, "badinstr-plugin", "badinstr_plugin", "badinstr", BAD_INSTRUMENT)
    out = tmp_path / "out.onnx"
    res = cli("optimize", model_file, "--passes", "cleanup", "-o", out, cwd=tmp_path, pythonpath=tmp_path)
    assert res.returncode == 2
    (err,) = stderr_lines(res)
    assert "plugin 'badinstr'" in err and "graphopt_pass_end" in err and "KeyError" in err
    assert "Traceback" not in res.stderr and not out.exists()


# --------------------------------------------------------------------------- name conflicts
def test_pass_name_conflict_keeps_the_first_and_reports_the_second(installed):
    installed("zz-dupe-plugin", "zz_dupe_plugin", "zz-dupe", DUPLICATE)  # sorts after "example"
    reg = graphopt.get_registry(reload=True)
    assert reg.passes["strip-docs"].plugin == "example"
    dupe = reg.plugins["zz-dupe"]
    assert dupe.passes == []
    assert dupe.status == "loaded"  # a conflict skips the pass, not the plugin
    assert dupe.error is None
    assert dupe.warnings == ["pass 'strip-docs' is already provided by plugin 'example'; this plugin's version is ignored"]


def test_a_plugin_that_fails_in_one_hook_provides_nothing(installed):
    installed("partial-plugin", "partial_plugin", "partial", PARTIAL)
    reg = graphopt.get_registry(reload=True)
    assert reg.plugins["partial"].status == "failed"
    assert "graphopt_register_targets" in reg.plugins["partial"].error
    assert "partial-good" not in reg.passes


# --------------------------------------------------------------------------- unknown pass
def test_unknown_pass_lists_the_available_ones(tmp_path, model_file):
    out = tmp_path / "out.onnx"
    res = cli("optimize", model_file, "--passes", "cleanup,no-such-pass", "-o", out, cwd=tmp_path)
    assert res.returncode == 2
    (err,) = stderr_lines(res)
    assert "unknown pass 'no-such-pass'" in err and "available:" in err
    available = err.split("available:")[1]
    for name in (*BUILTIN_PASSES, "fold-batchnorm", "strip-docs"):
        assert name in available
    assert "Traceback" not in res.stderr and not out.exists()


def test_unknown_pass_api():
    with pytest.raises(graphopt.OptionError, match=r"unknown pass 'strip-doc' \(available: .*strip-docs"):
        graphopt.optimize(graphopt.Graph(doc_model()), "strip-doc")


# --------------------------------------------------------------------------- sys.exit and other BaseExceptions
EXITS_AT_IMPORT = '''
    import sys
    sys.exit(0)
'''

EXITS_IN_REGISTER = '''
    import sys, graphopt

    @graphopt.hookimpl
    def graphopt_register_passes():
        sys.exit(0)
'''

EXITS_IN_RUN = '''
    import sys, graphopt

    class Quitter(graphopt.Pass):
        """Calls sys.exit(0) instead of returning a graph."""
        name = "quitter"

        def run(self, graph, ctx):
            sys.exit(0)

    @graphopt.hookimpl
    def graphopt_register_passes():
        return [Quitter]
'''

EXITS_IN_INSTRUMENT = '''
    import sys, graphopt

    @graphopt.hookimpl
    def graphopt_pass_start(pass_, graph, context):
        sys.exit(0)
'''

RAISES_BASE_EXCEPTION = '''
    import graphopt

    class Weird(BaseException):
        pass

    @graphopt.hookimpl
    def graphopt_pass_end(pass_, graph, record, context):
        raise Weird("not an Exception")
'''


def test_plugin_calling_sys_exit_at_import_is_failed_not_a_silent_exit(tmp_path, model_file):
    write_plugin(tmp_path, "quits-plugin", "quits_plugin", "quits", EXITS_AT_IMPORT)
    plugins = plugins_json(cwd=tmp_path, pythonpath=tmp_path)
    assert plugins["quits"]["status"] == "failed" and "SystemExit" in plugins["quits"]["error"]
    out = tmp_path / "out.onnx"
    res = cli("optimize", model_file, "--passes", "cleanup", "-o", out, cwd=tmp_path, pythonpath=tmp_path)
    assert res.returncode == 0, res.stderr
    (warning,) = stderr_lines(res)
    assert "'quits'" in warning and "sys.exit(0)" in warning
    assert out.exists()  # the command did its work: the exit did not end it


def test_plugin_calling_sys_exit_in_a_registration_hook_is_failed(installed):
    installed("quits-plugin", "quits_plugin", "quits", EXITS_IN_REGISTER)
    reg = graphopt.get_registry(reload=True)
    info = reg.plugins["quits"]
    assert info.status == "failed" and "graphopt_register_passes raised SystemExit" in info.error
    assert reg.plugins["graphopt.passes"].status == "loaded"


@pytest.mark.parametrize("source, pipeline, expected", [
    (EXITS_IN_RUN, "quitter", ["'quitter'", "'quits'", "SystemExit"]),
    (EXITS_IN_INSTRUMENT, "cleanup", ["plugin 'quits'", "graphopt_pass_start", "SystemExit"]),
    (RAISES_BASE_EXCEPTION, "cleanup", ["plugin 'quits'", "graphopt_pass_end", "Weird: not an Exception"]),
])
def test_plugin_exiting_during_a_run_is_a_named_error_exit_2(tmp_path, model_file, source, pipeline, expected):
    write_plugin(tmp_path, "quits-plugin", "quits_plugin", "quits", source)
    out = tmp_path / "out.onnx"
    res = cli("optimize", model_file, "--passes", pipeline, "-o", out, cwd=tmp_path, pythonpath=tmp_path)
    assert res.returncode == 2, (res.returncode, res.stderr)
    (err,) = stderr_lines(res)
    assert err.startswith("graphopt: error:") and all(e in err for e in expected), err
    assert not out.exists()


def test_plugin_sys_exit_in_a_pass_api(installed):
    installed("quits-plugin", "quits_plugin", "quits", EXITS_IN_RUN)
    reg = graphopt.get_registry(reload=True)
    with pytest.raises(graphopt.PluginError, match="pass 'quitter' from plugin 'quits' failed: SystemExit") as ei:
        graphopt.optimize(graphopt.Graph(doc_model()), "quitter", registry=reg)
    assert isinstance(ei.value.__cause__, SystemExit)


# --------------------------------------------------------------------------- shadowing built-ins
SHADOWS_PASS = '''
    import graphopt

    class FakeCleanup(graphopt.Pass):
        """Claims the built-in name cleanup."""
        name = "cleanup"

        def run(self, graph, ctx):
            return graph

    class Extra(graphopt.Pass):
        """A pass of its own."""
        name = "shadow-extra"

        def run(self, graph, ctx):
            return graph

    @graphopt.hookimpl
    def graphopt_register_passes():
        return [Extra, FakeCleanup]
'''

SHADOWS_TARGET = '''
    import graphopt

    class FakeCpu(graphopt.Target):
        """Claims the built-in name cpu."""
        name = "cpu"

    @graphopt.hookimpl
    def graphopt_register_targets():
        return [FakeCpu]
'''


@pytest.mark.parametrize("source, kind, name", [(SHADOWS_PASS, "pass", "cleanup"), (SHADOWS_TARGET, "target", "cpu")])
def test_a_plugin_cannot_shadow_a_built_in(installed, source, kind, name):
    installed("aa-shadow-plugin", "aa_shadow_plugin", "aa-shadow", source)
    reg = graphopt.get_registry(reload=True)
    info = reg.plugins["aa-shadow"]
    assert info.status == "failed"
    assert f"{kind} '{name}' would shadow graphopt's built-in {kind}" in info.error
    table = reg.passes if kind == "pass" else reg.targets
    assert table[name].plugin in ("graphopt.passes", "graphopt.targets")
    assert "shadow-extra" not in reg.passes  # a failed plugin provides nothing
    assert reg.plugins["graphopt.passes"].builtin and not reg.plugins["example"].builtin


def test_shadowing_plugin_is_reported_by_the_cli(tmp_path, model_file):
    write_plugin(tmp_path, "aa-shadow-plugin", "aa_shadow_plugin", "aa-shadow", SHADOWS_PASS)
    res = cli("optimize", model_file, "--passes", "cleanup", "-o", tmp_path / "out.onnx", "--report",
              tmp_path / "r.json", cwd=tmp_path, pythonpath=tmp_path)
    assert res.returncode == 0, res.stderr
    (warning,) = stderr_lines(res)
    assert "'aa-shadow'" in warning and "shadow graphopt's built-in pass" in warning
    assert json.loads((tmp_path / "r.json").read_text())["passes"][0]["plugin"] == "graphopt.passes"


# --------------------------------------------------------------------------- hook wrappers through pluggy
WRAPPER = '''
    import graphopt

    EVENTS = []

    @graphopt.hookimpl(wrapper=True, specname="graphopt_pass_end")
    def around_end(pass_, graph, record, context):
        EVENTS.append(("before", pass_.name, sorted(record.details)))
        result = yield
        EVENTS.append(("after", pass_.name, sorted(record.details)))
        record.details["wrap.saw_node_count"] = "example.node_count" in record.details
        return result

    @graphopt.hookimpl(tryfirst=True)
    def graphopt_pass_start(pass_, graph, context):
        EVENTS.append(("start", pass_.name, None))
'''

WRAPPER_FAILS_AFTER_YIELD = '''
    import graphopt

    @graphopt.hookimpl(wrapper=True, specname="graphopt_pass_end")
    def around_end(pass_, graph, record, context):
        yield
        raise RuntimeError("teardown broke")
'''

WRAPPER_WITHOUT_YIELD = '''
    import graphopt

    @graphopt.hookimpl(wrapper=True)
    def graphopt_pass_start(pass_, graph, context):
        if False:
            yield
'''


def test_hook_wrapper_instrument_runs_around_the_other_instruments(installed):
    installed("wrap-plugin", "wrap_plugin", "wrap", WRAPPER)
    reg = graphopt.get_registry(reload=True)
    assert reg.plugins["wrap"].status == "loaded", reg.plugins["wrap"].error
    res = graphopt.optimize(graphopt.Graph(doc_model(with_subgraph=False)), "eliminate-dead,strip-docs", registry=reg)
    import wrap_plugin

    # For each pass: start, then the wrapper before the example's instrument ran, then after it.
    assert [(e[0], e[1]) for e in wrap_plugin.EVENTS] == [
        ("start", "eliminate-dead"), ("before", "eliminate-dead"), ("after", "eliminate-dead"),
        ("start", "strip-docs"), ("before", "strip-docs"), ("after", "strip-docs")]
    before, after = wrap_plugin.EVENTS[1][2], wrap_plugin.EVENTS[2][2]
    assert "example.node_count" not in before and "example.node_count" in after
    assert all(r.details["wrap.saw_node_count"] is True for r in res.records)


def test_the_example_plugin_ships_a_hook_wrapper():
    res = graphopt.optimize(graphopt.Graph(doc_model(with_subgraph=False)), "eliminate-dead")
    assert res.records[0].details["example.wrapped_instruments"] == ["example.node_count"]


@pytest.mark.parametrize("source, message", [
    (WRAPPER_FAILS_AFTER_YIELD, "plugin 'wrapfail' failed in graphopt_pass_end: RuntimeError: teardown broke"),
    (WRAPPER_WITHOUT_YIELD, "plugin 'wrapfail': hook wrapper graphopt_pass_start did not yield"),
])
def test_a_failing_hook_wrapper_is_named(installed, source, message):
    installed("wrapfail-plugin", "wrapfail_plugin", "wrapfail", source)
    reg = graphopt.get_registry(reload=True)
    with pytest.raises(graphopt.PluginError, match=message):
        graphopt.optimize(graphopt.Graph(doc_model()), "cleanup", registry=reg)


def test_an_error_passing_through_a_wrapper_keeps_the_name_of_the_plugin_that_raised(installed):
    installed("wrap-plugin", "wrap_plugin", "wrap", WRAPPER)
    installed("badinstr-plugin", "badinstr_plugin", "badinstr", BAD_INSTRUMENT)
    reg = graphopt.get_registry(reload=True)
    with pytest.raises(graphopt.PluginError, match="plugin 'badinstr' failed in graphopt_pass_end: KeyError"):
        graphopt.optimize(graphopt.Graph(doc_model()), "cleanup", registry=reg)


QUITTING_TARGET = '''
    import sys, graphopt

    class QuitTarget(graphopt.Target):
        """Calls sys.exit(0) while lowering."""
        name = "quit-target"

        def lower(self, graph, out_dir, ctx):
            sys.exit(0)

    class PickyTarget(graphopt.Target):
        """Refuses every model with its own GraphoptError, which must reach the user unchanged."""
        name = "picky-target"

        def check(self, graph):
            raise graphopt.LoweringError("picky-target lowers nothing")

    @graphopt.hookimpl
    def graphopt_register_targets():
        return [QuitTarget, PickyTarget]
'''


def test_plugin_target_calling_sys_exit_is_a_named_error(tmp_path, model_file):
    write_plugin(tmp_path, "qt-plugin", "qt_plugin", "qt", QUITTING_TARGET)
    out = tmp_path / "art"
    res = cli("lower", model_file, "-t", "quit-target", "-o", out, cwd=tmp_path, pythonpath=tmp_path)
    assert res.returncode == 2, res.stderr
    (err,) = stderr_lines(res)
    assert "plugin 'qt'" in err and "target 'quit-target' lower()" in err and "sys.exit(0)" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".art")] == []
    res = cli("lower", model_file, "-t", "picky-target", "-o", out, cwd=tmp_path, pythonpath=tmp_path)
    assert res.returncode == 2
    (err,) = stderr_lines(res)
    assert err == "graphopt: error: picky-target lowers nothing"


EXITS_IN_INIT = '''
    import sys, graphopt

    class BadInit(graphopt.Pass):
        """Exits while being configured."""
        name = "bad-init"

        def __init__(self, **options):
            sys.exit(0)

    @graphopt.hookimpl
    def graphopt_register_passes():
        return [BadInit]
'''


def test_plugin_pass_exiting_in_its_constructor_is_named(tmp_path, model_file):
    write_plugin(tmp_path, "badinit-plugin", "badinit_plugin", "badinit", EXITS_IN_INIT)
    res = cli("optimize", model_file, "--passes", "bad-init", "-o", tmp_path / "out.onnx", cwd=tmp_path,
              pythonpath=tmp_path)
    assert res.returncode == 2, res.stderr
    (err,) = stderr_lines(res)
    assert "pass 'bad-init' from plugin 'badinit' failed to configure: SystemExit" in err
