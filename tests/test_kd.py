"""graphopt.distill: knowledge distillation of torch students (float, binary, ternary weights), captured to a Graph."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest

import graphopt
from graphopt.errors import DataError, ModelError, OptionError

from .conftest import ort_run

X = np.random.default_rng(0).standard_normal((40, 1, 6, 6)).astype(np.float32)


# ------------------------------------------------------------------------- options (no torch needed)
@pytest.mark.parametrize("kwargs,message", [
    ({"temperature": 0}, "option 'temperature' must be a finite number > 0, got 0"),
    ({"temperature": -2.0}, "option 'temperature' must be a finite number > 0"),
    ({"temperature": float("nan")}, "option 'temperature' must be a finite number > 0"),
    ({"temperature": "4"}, "option 'temperature' must be a number"),
    ({"alpha": 1.5, "labels": np.zeros(40, np.int64)}, "option 'alpha' must be in [0, 1], got 1.5"),
    ({"alpha": 0.5}, "option 'alpha' = 0.5 weighs a hard-label loss but no labels were given"),
    ({"optimizer": "rmsprop"}, "option 'optimizer' must be one of adam, adamw, sgd; got 'rmsprop'"),
    ({"schedule": "linear"}, "option 'schedule' must be one of cosine, constant, step; got 'linear'"),
    ({"weights": "int4"}, "option 'weights' must be one of float, binary, ternary; got 'int4'"),
    ({"epochs": 0}, "option 'epochs' must be an integer >= 1, got 0"),
    ({"epochs": 2.5}, "option 'epochs' must be an integer, got 2.5"),
    ({"batch_size": 0}, "option 'batch_size' must be an integer >= 1, got 0"),
    ({"lr": 0.0}, "option 'lr' must be a finite number > 0, got 0.0"),
    ({"weight_decay": -1e-4}, "option 'weight_decay' must be a finite number >= 0"),
    ({"seed": -1}, "option 'seed' must be an integer >= 0"),
    ({"quantize_first_last": "yes"}, "option 'quantize_first_last' must be True or False"),
    ({"progress": "bar"}, "option 'progress' must be True, False or a graphopt.console.Progress"),
])
def test_bad_options_are_one_line_option_errors_before_anything_runs(kwargs, message):
    # The models are not even looked at: options are checked first.
    with pytest.raises(OptionError) as e:
        graphopt.distill(None, None, X, **kwargs)
    text = str(e.value)
    assert message in text and "\n" not in text and text.startswith("distill: "), text


# ------------------------------------------------------------------------------------ torch models
def _tiny(out: int = 10, seed: int = 0):
    """conv -> relu -> conv -> relu -> linear -> relu -> linear: four quantizable layers."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 36, 16), nn.ReLU(), nn.Linear(16, out))


@pytest.mark.torch
@pytest.mark.parametrize("data,labels,kwargs,error,message", [
    (X[:0], None, {}, DataError, "data has no samples"),
    ([], None, {}, DataError, "data is an empty list of batches"),
    ([X[:8], X[:0]], None, {}, DataError, "data batch 1 has no samples"),
    ([X[:8], X[:8]], None, {"batch_size": 4}, OptionError, "option 'batch_size' applies to an array of samples"),
    ({"a": X, "b": X}, None, {}, DataError, "a dict of 2 inputs (a, b)"),
    ("x.npy", None, {}, DataError, "data must be an array or tensor of samples"),
    (np.full_like(X, np.nan), None, {}, DataError, "data holds NaN or infinite values"),
    (X, np.zeros(39, np.int64), {}, DataError, "labels has 39 entries for 40 samples"),
    (X, np.zeros(40, np.float32), {}, DataError, "labels must be integer class indices, got float32"),
    (X, np.full(40, 10), {}, DataError, "labels must be class indices in [0, 9], got values in [10, 10]"),
    (X, None, {"student_out": 5}, ModelError, "the student outputs [N, 5] but the teacher [N, 10]"),
    (X[:, :, :4], None, {}, ModelError, "the teacher (Sequential) cannot run on data [40, 1, 4, 6] float32"),
    (X, None, {"weights": "binary", "two_layers": True}, OptionError,
     "option 'weights' = 'binary' but the student runs 2 Conv/Linear layer(s), the first and last"),
])
def test_bad_data_and_mismatched_models_are_one_line_errors(data, labels, kwargs, error, message):
    from torch import nn

    student = _tiny(kwargs.pop("student_out", 10), seed=1)
    if kwargs.pop("two_layers", False):
        student = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 10))
    with pytest.raises(error) as e:
        graphopt.distill(_tiny(), student, data, labels, epochs=1, progress=False, **kwargs)
    text = str(e.value)
    assert message in text and "\n" not in text, text


@pytest.mark.torch
def test_same_inputs_give_a_byte_identical_graph_and_nothing_given_is_changed():
    import torch

    teacher, student = _tiny(), _tiny(seed=1)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    threads = torch.get_num_threads()
    runs = [graphopt.distill(teacher, student, X, epochs=1, batch_size=16, weights="binary", progress=False)
            for _ in range(2)]
    assert runs[0].to_bytes() == runs[1].to_bytes()
    assert torch.equal(torch.get_rng_state(), rng_before) and torch.get_num_threads() == threads
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # a copy was trained
    assert teacher.training and student.training  # modes restored / untouched
    rec = runs[0].training
    assert rec.epochs == 1 and rec.steps == 3 and rec.samples == 40 and rec.weights == "binary"
    assert rec.quantized_layers == ["2", "5"] and rec.float_layers == ["0", "7"]
    assert rec.final_hard is None and np.isfinite(rec.final_loss) and rec.final_loss == rec.final_soft
    assert rec.to_json()["history"][0]["epoch"] == 1 and "student" not in rec.to_json()
    # Another seed shuffles differently.
    other = graphopt.distill(teacher, student, X, epochs=1, batch_size=16, weights="binary", seed=1, progress=False)
    assert other.to_bytes() != runs[0].to_bytes()


def _weights_by_channel(graph, module) -> dict:
    """{layer name: the graph's copy of its weight as [out, -1]} for the module's Conv/Linear layers."""
    from torch import nn

    arrays = [graph.array(n) for n in graph.initializers()]
    found = {}
    for name, m in module.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight.detach().numpy()
            for a in arrays:
                if a.shape == w.shape and np.array_equal(a, w):
                    found[name] = a.reshape(len(a), -1)
                elif a.ndim == 2 and a.shape == w.T.shape and np.array_equal(a, w.T):  # a MatMul's [in, out]
                    found[name] = a.T
    return found


@pytest.mark.torch
@pytest.mark.parametrize("weights,values", [("binary", 2), ("ternary", 3)])
def test_quantized_layers_hold_two_or_three_values_per_channel_in_the_graph_and_ort_matches(weights, values):
    import torch

    teacher = _tiny()
    labels = np.arange(40) % 10
    g = graphopt.distill(teacher, _tiny(seed=1), {"image": X}, labels, epochs=2, batch_size=8, weights=weights,
                         alpha=0.7, optimizer="sgd", schedule="step", lr=0.05, progress=False)
    rec = g.training
    assert [s.name for s in g.inputs] == ["image"] and rec.alpha == 0.7 and rec.final_hard is not None
    found = _weights_by_channel(g, rec.student)
    assert set(found) == {"0", "2", "5", "7"}, found.keys()
    for name in rec.quantized_layers:
        counts = [len(np.unique(row)) for row in found[name]]
        assert max(counts) <= values and max(counts) == values, (name, counts)
        pos = np.array([row[row > 0].min() for row in found[name]])
        assert np.all(pos > 0) and np.all([np.all(np.isin(np.abs(row[row != 0]), p)) for row, p in
                                           zip(found[name], pos)])  # +a and -a, per channel
    for name in rec.float_layers:
        assert min(len(np.unique(row)) for row in found[name]) > values
    x = np.random.default_rng(5).standard_normal((7, 1, 6, 6)).astype(np.float32)  # any batch size
    with torch.no_grad():
        ref = rec.student(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ort_run(g, {"image": x})[0], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.torch
def test_graph_teacher_list_of_batches_first_last_quantized_and_a_progress_bar():
    import torch

    from graphopt.console import Progress

    from graphopt.kd import _OrtTeacher

    module = _tiny().eval()
    teacher = graphopt.capture(module, (torch.from_numpy(X[:3]),))  # a fixed batch of 3: run in padded chunks
    assert teacher.inputs[0].shape[0] == 3
    with torch.no_grad():
        np.testing.assert_allclose(_OrtTeacher(teacher)(torch.from_numpy(X[:16])).numpy(),
                                   module(torch.from_numpy(X[:16])).numpy(), rtol=1e-4, atol=1e-5)
    tty = io.StringIO()
    tty.isatty = lambda: True
    g = graphopt.distill(teacher, _tiny(seed=1), [X[:16], X[16:32], X[32:]], epochs=2, weights="binary",
                         quantize_first_last=True, progress=Progress(stream=tty))
    rec = g.training
    assert rec.quantized_layers == ["0", "2", "5", "7"] and rec.float_layers == [] and rec.steps == 6
    found = _weights_by_channel(g, rec.student)
    assert all(len(np.unique(row)) == 2 for name in found for row in found[name])
    out = tty.getvalue()
    assert "✓ distill: epoch 2/2 [####################] loss" in out, out
    assert "✓ distill: capture the student" in out and "✓ distill: teacher outputs on 40 samples" in out


@pytest.mark.torch
def test_binary_student_distilled_from_a_float_digits_cnn_is_within_3_points_of_it(digits_trained):
    """The done-means: the float digits CNN (the session's, 20 epochs) as the teacher, then a binary-weight
    student of the same architecture (first and last layers float) distilled from its graph, no labels."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from graphopt.testing import digits_cnn_module

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.25, random_state=0)  # its split

    torch.manual_seed(1)
    student_module = digits_cnn_module()
    teacher_graph = digits_trained["cnn"]
    t1 = time.perf_counter()
    student = graphopt.distill(teacher_graph, student_module, {"image": x_tr}, epochs=20, lr=0.01,
                               weights="binary", progress=False)
    t2 = time.perf_counter()

    def accuracy(g):
        return 100.0 * float(np.mean(ort_run(g, {"image": x_te})[0].argmax(1) == y_te))

    acc_t, acc_s = accuracy(teacher_graph), accuracy(student)
    rec = student.training
    print(f"digits: float teacher {acc_t:.2f} %, binary student {acc_s:.2f} % (layers {rec.quantized_layers}); "
          f"distill {t2 - t1:.1f} s (training {rec.seconds:.1f} s)")
    assert rec.quantized_layers == ["2", "5", "9"] and rec.float_layers == ["0", "11"]
    assert acc_t >= 96.0
    assert acc_s >= acc_t - 3.0, (acc_t, acc_s)
