"""The bundled example (the README's first command): a digits classifier trained with scikit-learn."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import graphopt

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_bundled_digits_model_keeps_its_accuracy_after_lowering(tmp_path):
    res = graphopt.lower(EXAMPLES / "digits_mlp.onnx", "cpu", tmp_path / "digits", verify=True)
    assert res.verification.ok
    art = graphopt.load(tmp_path / "digits")
    with np.load(EXAMPLES / "digits_inputs.npz") as z:
        images = z["image"]
    labels = np.load(EXAMPLES / "digits_labels.npy")
    probs = art.run({"image": images})["probabilities"]
    accuracy = float((probs.argmax(axis=1) == labels).mean())
    assert accuracy >= 0.9  # the trained model scores 0.97 on its held-out split
    ref = graphopt.reference.run_reference(graphopt.Graph.load(EXAMPLES / "digits_mlp.onnx"), [{"image": images}])[0][0]
    assert (probs.argmax(axis=1) == ref.argmax(axis=1)).all()
