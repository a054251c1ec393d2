"""Rebuild the bundled example model: a digits classifier trained here, written as ONNX.

    python examples/build_digits_model.py

Trains scikit-learn's MLPClassifier on its bundled 8x8 digits data set
(deterministic: fixed seed and split), writes its weights as an ONNX graph
(Gemm, Relu, Gemm, Softmax) with a symbolic batch, and saves 32 held-out
images with their labels as example inputs. Needs scikit-learn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent


def main() -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.25, random_state=0)
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=400, random_state=0).fit(x_train, y_train)
    print(f"held-out accuracy: {clf.score(x_test, y_test):.4f}")

    w1, w2 = (w.astype(np.float32) for w in clf.coefs_)
    b1, b2 = (b.astype(np.float32) for b in clf.intercepts_)
    nodes = [
        helper.make_node("Gemm", ["image", "w1", "b1"], ["h"], name="hidden"),
        helper.make_node("Relu", ["h"], ["h_relu"], name="relu"),
        helper.make_node("Gemm", ["h_relu", "w2", "b2"], ["logits"], name="classifier"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1, name="softmax"),
    ]
    graph = helper.make_graph(
        nodes, "digits_mlp",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="graphopt-example")
    model.ir_version = 8
    onnx.checker.check_model(model)
    (HERE / "digits_mlp.onnx").write_bytes(model.SerializeToString(deterministic=True))
    np.savez(HERE / "digits_inputs.npz", image=x_test[:32])
    np.save(HERE / "digits_labels.npy", y_test[:32].astype(np.int64))
    print(f"wrote {HERE / 'digits_mlp.onnx'}, digits_inputs.npz, digits_labels.npy")


if __name__ == "__main__":
    main()
