"""Artifact format 2: programs with device, rank, inputs and outputs; format 1 still loads; programs load
lazily, so an artifact is inspected on a machine that cannot run it; the default pipeline per target."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import graphopt
from graphopt.artifact import FORMAT_VERSION, MANIFEST, Artifact
from graphopt.errors import ArtifactError

from .conftest import run_cli


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The bundled digits MLP lowered for the CPU, once for the module (tests copy it before editing)."""
    from pathlib import Path

    out = tmp_path_factory.mktemp("fmt") / "digits"
    graphopt.lower(str(Path(__file__).resolve().parents[1] / "examples" / "digits_mlp.onnx"), output=out)
    return out


def _copy(built, tmp_path, edit=None):
    dst = tmp_path / "art"
    shutil.copytree(built, dst)
    if edit is not None:
        doc = json.loads((dst / MANIFEST).read_text())
        edit(doc)
        (dst / MANIFEST).write_text(json.dumps(doc))  # the manifest itself is not hashed
    return dst


def _feed():
    return {"image": np.random.default_rng(0).random((3, 64), dtype=np.float32)}


def test_programs_carry_device_rank_inputs_outputs(built):
    doc = json.loads((built / MANIFEST).read_text())
    assert doc["format_version"] == FORMAT_VERSION == 2
    (prog,) = doc["programs"]
    assert prog["device"] == "cpu" and prog["rank"] == 0 and prog["entry"] == "main"
    assert [s["name"] for s in prog["inputs"]] == ["image"]
    assert [s["name"] for s in prog["outputs"]] == ["probabilities"]
    # the weights main reads: all of them, except an original whose packed copy (appended) replaced it, which
    # depends on the schedules the host's ISA gets
    assert prog["params"] == sorted(set(prog["params"])) and set(prog["params"]) <= set(range(len(doc["weights"])))
    packed = [i for i, w in enumerate(doc["weights"]) if w["name"].startswith("main.packed")]
    assert set(range(len(doc["weights"]))) - set(prog["params"]) <= set(range(len(doc["weights"]) - len(packed)))


def test_format_1_artifact_still_loads_and_runs(built, tmp_path):
    def to_v1(doc):
        doc["format_version"] = 1
        for p in doc["programs"]:
            for k in ("device", "rank", "inputs", "outputs"):
                p.pop(k)

    old = _copy(built, tmp_path, to_v1)
    new = graphopt.load(built).run(_feed())
    got = graphopt.load(old).run(_feed())
    np.testing.assert_array_equal(got["probabilities"], new["probabilities"])


@pytest.mark.parametrize("version, words", [(0, "lower the model again"), (FORMAT_VERSION + 1, "upgrade graphopt")])
def test_other_format_versions_are_refused_with_what_to_do(built, tmp_path, capsys, version, words):
    art = _copy(built, tmp_path, lambda d: d.update(format_version=version))
    with pytest.raises(ArtifactError, match=words):
        Artifact(art)
    code = run_cli("run", str(art))
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err


def test_program_missing_a_format_2_field_is_a_damaged_manifest(built, tmp_path):
    art = _copy(built, tmp_path, lambda d: d["programs"][0].pop("outputs"))
    with pytest.raises(ArtifactError, match=r"programs\[0\]\.outputs is missing"):
        Artifact(art)


def test_unknown_device_kind_is_refused(built, tmp_path):
    art = _copy(built, tmp_path, lambda d: d["programs"][0].update(device="quantum"))
    with pytest.raises(ArtifactError, match="device 'quantum'"):
        Artifact(art)


def test_programs_load_lazily_so_an_artifact_is_inspected_where_it_cannot_run(built, tmp_path, capsys):
    art = _copy(built, tmp_path, lambda d: d["target"].update(machine="riscv64"))
    opened = Artifact(art)  # manifest and hashes checked, no code loaded
    assert opened.describe()["runs_here"].startswith("built for riscv64")
    with pytest.raises(ArtifactError, match="built for riscv64"):
        opened.run(_feed())
    code = run_cli("inspect", str(art))
    out = capsys.readouterr().out
    assert code == 0 and "runs here: no: built for riscv64" in out and "program main: cpu, rank 0" in out
    code = run_cli("run", str(art))
    err = capsys.readouterr().err
    assert code == 2 and "built for riscv64" in err and "Traceback" not in err
    with pytest.raises(ArtifactError, match="built for riscv64"):
        graphopt.load(art)  # load() loads the programs: the refusal comes at once


def test_inspect_describes_an_artifact_of_a_target_not_installed_here(built, tmp_path, capsys):
    art = _copy(built, tmp_path, lambda d: d["target"].update(name="fancy-npu"))
    code = run_cli("inspect", str(art), "--json")
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["target"]["name"] == "fancy-npu"
    assert "fancy-npu" in doc["runs_here"] and doc["programs"][0]["device"] == "cpu"


def test_inspect_checks_hashes(built, tmp_path, capsys):
    art = _copy(built, tmp_path)
    with open(art / "main.so", "ab") as f:
        f.write(b"\0")
    code = run_cli("inspect", str(art))
    err = capsys.readouterr().err
    assert code == 2 and "does not match its hash" in err


def test_default_pipeline_unrolls_recurrences_for_targets_without_them():
    from graphopt.api import default_lower_pipeline
    from graphopt.plugins import get_registry
    from graphopt.target import Target

    class Bare(Target):
        name = "bare"

    assert "lower-recurrent" in default_lower_pipeline(Bare())
    assert "lower-recurrent" not in default_lower_pipeline(get_registry().get_target("cpu")())


def test_threads_running_a_fresh_artifact_share_one_load(built, monkeypatch):
    """Lazy loading under threads: the second caller waits for the first's programs (it got None before)."""
    import threading
    import time

    from graphopt.plugins import get_registry

    cpu = get_registry().get_target("cpu")
    calls = []
    original = cpu.load_programs.__func__

    def slow_load(cls, artifact):
        calls.append(1)
        time.sleep(0.3)
        return original(cls, artifact)

    monkeypatch.setattr(cpu, "load_programs", classmethod(slow_load))
    art = Artifact(built)
    results, errors = [], []

    def go():
        try:
            results.append(art.run(_feed())["probabilities"])
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1 and len(results) == 3
    assert all(np.array_equal(r, results[0]) for r in results)


def test_device_is_checked_and_must_be_the_programs_kind(built, capsys):
    from graphopt.errors import OptionError

    with pytest.raises(OptionError, match="not a device"):
        Artifact(built, device="tpu:0")
    assert graphopt.load(built, device="cpu").run(_feed())["probabilities"].shape == (3, 10)
    with pytest.raises(ArtifactError, match="run on cpu, not on 'cuda:1'"):
        graphopt.load(built, device="cuda:1")
    assert run_cli("run", str(built), "--device", "cuda") == 2
    err = capsys.readouterr().err
    assert "not on 'cuda'" in err and "Traceback" not in err
