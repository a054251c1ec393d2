"""Pipeline text, TOML files and option validation: everything is rejected before a pass runs."""

from __future__ import annotations

import pytest

import graphopt
from graphopt.errors import OptionError
from graphopt.pipeline import parse_pipeline_text


def test_parse_and_print_round_trip():
    p = graphopt.Pipeline.parse("cleanup, fold-constants(max_mb=2.5,max_rounds=3),fold-batchnorm")
    assert str(p) == "cleanup,fold-constants(max_mb=2.5,max_rounds=3),fold-batchnorm"
    assert str(graphopt.Pipeline.parse(str(p))) == str(p)
    assert p.passes[1].opts.max_mb == 2.5 and p.passes[1].opts.max_rounds == 3


def test_defaults_are_not_printed():
    assert str(graphopt.Pipeline.parse("fold-constants(max_rounds=8)")) == "fold-constants"


def test_text_syntax_values():
    assert parse_pipeline_text('a(x="1,2",y=2:4,z=true)') == [("a", {"x": "1,2", "y": "2:4", "z": "true"})]
    for bad in ("a,,b", "a(x)", "a(x=1", "a)", "a(x='1)"):
        with pytest.raises(OptionError):
            parse_pipeline_text(bad)


@pytest.mark.parametrize(
    "text, message",
    [
        ("no-such-pass", r"unknown pass 'no-such-pass' \(available: cleanup, dedup-initializers"),
        ("fold-constants(bogus=1)", r"unknown option 'bogus' \(valid options: max_mb, max_rounds\)"),
        ("fold-constants(max_rounds=two)", r"option 'max_rounds' expects int, got 'two'"),
        ("fold-constants(max_rounds=0)", r"option 'max_rounds' must be >= 1"),
        ("fold-constants(max_mb=-1)", r"option 'max_mb' must be >= 0"),
    ],
)
def test_bad_pipelines_are_rejected_with_choices(text, message):
    with pytest.raises(OptionError, match=message):
        graphopt.Pipeline.parse(text)


def test_python_api_validates_types():
    from graphopt.passes.cleanup import FoldConstants

    assert FoldConstants(max_mb=3).opts.max_mb == 3.0
    with pytest.raises(OptionError, match="expects int"):
        FoldConstants(max_rounds=1.5)
    with pytest.raises(OptionError, match="expects int"):
        FoldConstants(max_rounds=True)


def test_toml_pipeline(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('passes = ["cleanup"]\n[[pass]]\nname = "fold-constants"\nmax_mb = 1.0\n')
    assert str(graphopt.Pipeline.from_toml(f)) == "cleanup,fold-constants(max_mb=1.0)"
    f.write_text('[[pass]]\nname = "fold-constants"\nmax_rounds = "x"\n')
    with pytest.raises(OptionError, match="expects int"):
        graphopt.Pipeline.from_toml(f)
    f.write_text("passes = [\n")
    with pytest.raises(OptionError, match="invalid TOML"):
        graphopt.Pipeline.from_toml(f)
    with pytest.raises(OptionError, match="not found"):
        graphopt.Pipeline.from_toml(tmp_path / "missing.toml")


def test_pipeline_file_need_not_end_in_toml(tmp_path, mlp_onnx, capsys):
    """--pipeline always names a file: 'p.txt' holding TOML is read as TOML, not parsed as pipeline text."""
    from .conftest import run_cli

    p = tmp_path / "p.txt"
    p.write_text('passes = ["eliminate-dead"]\n')
    assert run_cli("optimize", mlp_onnx, "-o", tmp_path / "o.onnx", "--pipeline", p, "--json") == 0
    import json

    assert json.loads(capsys.readouterr().out)["pipeline"] == "eliminate-dead"
    assert run_cli("optimize", mlp_onnx, "-o", tmp_path / "o2.onnx", "--pipeline", tmp_path / "missing") == 2
    assert "pipeline file not found" in capsys.readouterr().err
    # ... and, being an input, it may not be an output
    assert run_cli("optimize", mlp_onnx, "-o", p, "--pipeline", p) == 2
