"""The README's Python example runs exactly as written (only the model file is ours: a small one made here)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from .conftest import init, make_model, vi

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def api_example() -> str:
    """The README block that uses the Python API (the one that loads ``model.onnx``)."""
    blocks = [b for b in readme_python_blocks() if "graphopt.Graph.load(" in b]
    assert len(blocks) == 1, "the README should have exactly one Python API example"
    return blocks[0]


def small_image_model(path: Path) -> None:
    """x[N,3,H,W] -> Conv -> BatchNormalization -> Relu -> GlobalAveragePool -> y: what the example expects."""
    rng = np.random.default_rng(0)
    m = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
            helper.make_node("BatchNormalization", ["c", "s", "b", "mu", "var"], ["n"], name="bn"),
            helper.make_node("Relu", ["n"], ["r"], name="relu"),
            helper.make_node("GlobalAveragePool", ["r"], ["y"], name="pool"),
        ],
        [vi("x", ["N", 3, "H", "W"])],
        [vi("y", ["N", 4, 1, 1])],
        [init("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
         init("s", rng.uniform(0.5, 1.5, 4).astype(np.float32)), init("b", rng.standard_normal(4).astype(np.float32)),
         init("mu", rng.standard_normal(4).astype(np.float32)), init("var", rng.uniform(0.5, 1.5, 4).astype(np.float32))],
    )
    onnx.save(m, path)


def test_readme_python_api_example_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("torch")  # the example imports torch
    code = api_example()
    small_image_model(tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, str(README) + ":python-api", "exec"), namespace)
    # What the example promises: a verified artifact, a report, outputs of the right shape.
    assert namespace["res"].verification.ok
    assert (tmp_path / "report.json").is_file() and (tmp_path / "build" / "model" / "manifest.json").is_file()
    (out,) = namespace["outputs"].values()
    assert out.shape == (1, 4, 1, 1) and np.isfinite(out).all()


def test_readme_plugin_example_is_valid_python():
    """The plugin example defines a pass class and a hook; it is compiled (running it needs an installed package)."""
    blocks = [b for b in readme_python_blocks() if "graphopt_register_passes" in b]
    assert blocks, "the README's plugin example is missing"
    namespace: dict = {"__name__": "readme_plugin"}
    exec(compile(blocks[0], str(README) + ":plugin", "exec"), namespace)
    import graphopt

    cls = namespace["StripDocs"]
    assert issubclass(cls, graphopt.Pass) and namespace["graphopt_register_passes"]() == [cls]


def test_readme_example_with_its_capture_alternative(tmp_path, monkeypatch):
    """The example's commented alternative, ``graphopt.capture(module, (x,), dynamic_batch=True)``, feeds the
    same lines: a module whose ``forward(self, x)`` names its input ``x`` yields a graph input ``x``."""
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3), keepdim=True)

    code = api_example()
    line = next(ln for ln in code.splitlines() if "graphopt.Graph.load(" in ln)
    alternative = line.split("# or:")[1].strip()
    assert alternative.startswith("graphopt.capture(module, (x,)")
    code = code.replace(line, f"g = {alternative}")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_example", "module": Net().eval(), "x": torch.randn(1, 3, 224, 224)}
    exec(compile(code, str(README) + ":python-api", "exec"), namespace)
    assert [s.name for s in namespace["g"].inputs] == ["x"]
    assert namespace["res"].verification.ok
    assert namespace["outputs"][namespace["g"].outputs[0].name].shape == (1, 4, 1, 1)


def test_capture_names_inputs_after_forward_arguments():
    torch = pytest.importorskip("torch")
    import graphopt

    class Two(torch.nn.Module):
        def forward(self, image, mask):
            return image * mask

    g = graphopt.capture(Two(), (torch.ones(2, 3), torch.ones(2, 3)))
    assert [s.name for s in g.inputs] == ["image", "mask"]
    g = graphopt.capture(Two(), (torch.ones(2, 3), torch.ones(2, 3)), input_names=["a", "b"])
    assert [s.name for s in g.inputs] == ["a", "b"]


def test_api_errors_do_not_name_cli_flags(mlp_onnx):
    import graphopt

    g = graphopt.Graph.load(mlp_onnx)
    for shapes in ({"nope": [1, 8]}, {"x": [1, 8, 1]}, {"x": [2, 8]}):
        with pytest.raises(graphopt.OptionError) as e:
            g.with_input_shapes(shapes)
        assert "--" not in str(e.value), str(e.value)
