"""Knowledge distillation of torch models: train a student on a teacher's softened outputs, then capture it.

:func:`distill` trains a copy of ``student`` to match ``teacher`` (a
``torch.nn.Module``, a :class:`~graphopt.graph.Graph` or an ``.onnx`` path run by
ONNX Runtime) on ``data``, optionally with a hard-label term, and returns the
captured :class:`~graphopt.graph.Graph` of the trained student. The loss is::

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

over the class dimension (dim 1), summed over classes and averaged over the rest.

``weights="binary"`` or ``"ternary"`` trains the student's Conv1d/2d/3d and
Linear layers (but the first and the last one run, unless
``quantize_first_last``) through a straight-through estimator: the forward pass
uses the quantized weight, per output channel (dim 0), of the latent float
weight ``W``:

* binary: ``a * sign(W)`` with ``a = mean |W|`` (``sign(0) = +1``), two values;
* ternary: ``{-a, 0, +a}``: ``0`` where ``|W| <= 0.7 * mean |W|``, ``a`` the
  mean of ``|W|`` above that threshold, three values;

and the backward pass hands the gradient to ``W`` unchanged where ``|W| <= 1``
and zero elsewhere (the clipped STE). After training the quantized values
replace the weights, so the captured graph holds exactly those values. Biases,
normalization layers and the float layers stay float.

Training is reproducible: a deep copy of the student is trained (the modules
given are not changed), on CPU, with one torch thread, deterministic algorithms
and a seeded ``torch.Generator`` for the shuffle, inside a forked RNG state (the
caller's global torch RNG is left as it was); the same inputs and options give a
byte-identical graph. The teacher's outputs are computed once, in eval mode
(ONNX Runtime with one thread for a Graph teacher).
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .console import Progress
from .errors import DataError, GraphoptError, ModelError, OptionError
from .graph import Graph

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant", "step")
WEIGHTS = ("float", "binary", "ternary")
#: Default learning rate per optimizer (``lr=None``).
DEFAULT_LR = {"adam": 1e-3, "adamw": 1e-3, "sgd": 1e-2}
#: Hard-label weight when labels are given and ``alpha`` is not: ``alpha = DEFAULT_ALPHA_WITH_LABELS``.
DEFAULT_ALPHA_WITH_LABELS = 0.5
#: Ternary threshold, relative to the channel's mean |W| (Li & Liu, "Ternary weight networks").
TERNARY_THRESHOLD = 0.7
#: The clipped straight-through estimator passes the gradient where |W| <= STE_CLIP.
STE_CLIP = 1.0
#: Batch size for computing the teacher's outputs.
TEACHER_BATCH = 256

_WHERE = "distill"


@dataclass(frozen=True)
class EpochLosses:
    """Mean losses over one epoch's batches (``hard`` is None without labels)."""

    epoch: int
    loss: float
    soft: float
    hard: float | None
    lr: float  # the learning rate at the end of the epoch


@dataclass
class DistillRecord:
    """What :func:`distill` did; the returned graph's ``training`` attribute.

    ``student`` is the trained module (eval mode, quantized weights in place),
    the one the graph was captured from; it is not part of :meth:`to_json`.
    """

    epochs: int
    steps: int
    samples: int
    temperature: float
    alpha: float
    optimizer: str
    lr: float
    schedule: str
    weight_decay: float
    seed: int
    weights: str
    history: list[EpochLosses]
    quantized_layers: list[str]  # Conv/Linear layers trained and stored binary/ternary
    float_layers: list[str]  # Conv/Linear layers left float (all of them for weights="float")
    seconds: float  # checks, teacher outputs and training (not the capture)
    student: Any = field(default=None, repr=False, compare=False)

    @property
    def final_loss(self) -> float:
        return self.history[-1].loss

    @property
    def final_soft(self) -> float:
        return self.history[-1].soft

    @property
    def final_hard(self) -> float | None:
        return self.history[-1].hard

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("student")
        d.update(final_loss=self.final_loss, final_soft=self.final_soft, final_hard=self.final_hard)
        return d


# ------------------------------------------------------------------------------------------ options
def _option_error(name: str, text: str, value) -> OptionError:
    return OptionError(f"{_WHERE}: option '{name}' {text}, got {value!r}")


def _real(name: str, value, *, low: float, low_open: bool, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _option_error(name, "must be a number", value)
    v = float(value)
    bound = (f"in ({low:g}, {high:g}]" if low_open else f"in [{low:g}, {high:g}]") if high is not None \
        else (f"> {low:g}" if low_open else f">= {low:g}")
    if not math.isfinite(v) or (v <= low if low_open else v < low) or (high is not None and v > high):
        raise _option_error(name, f"must be a finite number {bound}" if high is None else f"must be {bound}", value)
    return v


def _int(name: str, value, *, low: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _option_error(name, "must be an integer", value)
    if low is not None and value < low:
        raise _option_error(name, f"must be an integer >= {low}", value)
    return int(value)


def _choice(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise OptionError(f"{_WHERE}: option '{name}' must be one of {', '.join(choices)}; got {value!r}")
    return value


# --------------------------------------------------------------------------------------------- data
class _Data:
    """Inputs, labels and teacher outputs as torch tensors, either one array of samples or a list of batches."""

    def __init__(self, inputs, labels, batched: bool, input_name: str | None):
        self.inputs = inputs  # tensor [N, ...] or list of tensors
        self.labels = labels  # tensor [N, ...] / list / None
        self.batched = batched
        self.input_name = input_name
        self.targets = None  # teacher outputs, like inputs

    @property
    def samples(self) -> int:
        return sum(len(b) for b in self.inputs) if self.batched else len(self.inputs)

    def first_batch(self, batch_size: int):
        return self.inputs[0] if self.batched else self.inputs[:batch_size]

    def steps(self, batch_size: int) -> int:
        """Steps in one epoch (as :meth:`epoch` yields them)."""
        if self.batched:
            return len(self.inputs)
        n = len(self.inputs)
        full, rest = divmod(n, batch_size)
        return full + (rest > 1 or (rest == 1 and full == 0))

    def eval_chunks(self):
        """Input tensors covering every sample once, in order (for the teacher)."""
        if self.batched:
            return list(self.inputs)
        return [self.inputs[i:i + TEACHER_BATCH] for i in range(0, len(self.inputs), TEACHER_BATCH)]

    def epoch(self, batch_size: int, gen):
        """(inputs, teacher outputs, labels) per step of one epoch, in a seeded order."""
        import torch

        if self.batched:
            for i in torch.randperm(len(self.inputs), generator=gen).tolist():
                yield self.inputs[i], self.targets[i], None if self.labels is None else self.labels[i]
            return
        n = len(self.inputs)
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) == 1 < batch_size and i > 0:
                continue  # a trailing batch of one sample: batch-norm layers cannot train on it
            yield self.inputs[idx], self.targets[idx], None if self.labels is None else self.labels[idx]


def _as_tensor(value, what: str):
    import torch

    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
    elif isinstance(value, np.ndarray):
        if value.dtype == object or not (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
            raise DataError(f"{_WHERE}: {what} has dtype {value.dtype}; expected numbers")
        t = torch.from_numpy(np.ascontiguousarray(value))
    else:
        raise DataError(f"{_WHERE}: {what} must be a numpy array or torch tensor, got {type(value).__name__}")
    if t.ndim == 0:
        raise DataError(f"{_WHERE}: {what} is a scalar; expected samples along the first dimension")
    if t.is_complex():
        raise DataError(f"{_WHERE}: {what} is complex; expected real numbers")
    if t.is_floating_point():
        t = t.to(torch.float32)
        if not bool(torch.isfinite(t).all()):
            raise DataError(f"{_WHERE}: {what} holds NaN or infinite values")
    return t.contiguous()


def _unwrap_feed(value, what: str, name: str | None):
    """A ``{name: array}`` dict of one entry -> (array, name); anything else passes through."""
    if isinstance(value, Mapping):
        if len(value) != 1:
            keys = ", ".join(map(str, value)) or "none"
            raise DataError(f"{_WHERE}: {what} is a dict of {len(value)} inputs ({keys}); distill takes "
                            "single-input models, so give one {name: array}")
        (key, arr), = value.items()
        if name is not None and key != name:
            raise DataError(f"{_WHERE}: {what} feeds input '{key}' but the first batch fed '{name}'")
        return arr, str(key)
    return value, name


def _labels_tensor(value, what: str, count: int):
    import torch

    t = _as_tensor(value, what)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise DataError(f"{_WHERE}: {what} must be integer class indices, got {str(t.dtype).replace('torch.', '')}")
    if len(t) != count:
        raise DataError(f"{_WHERE}: {what} has {len(t)} entries for {count} samples")
    return t.to(torch.int64)


def _prepare_data(data, labels, batch_size_given: bool) -> _Data:
    if isinstance(data, (list, tuple)):
        if batch_size_given:
            raise OptionError(f"{_WHERE}: option 'batch_size' applies to an array of samples; the data given is "
                              "already a list of batches (leave batch_size out)")
        if not data:
            raise DataError(f"{_WHERE}: data is an empty list of batches")
        name = None
        batches = []
        for i, b in enumerate(data):
            arr, name = _unwrap_feed(b, f"data batch {i}", name)
            t = _as_tensor(arr, f"data batch {i}")
            if len(t) == 0:
                raise DataError(f"{_WHERE}: data batch {i} has no samples")
            if batches and (t.shape[1:] != batches[0].shape[1:] or t.dtype != batches[0].dtype):
                raise DataError(f"{_WHERE}: data batch {i} is {_shape(t)} {_dtype(t)}, batch 0 "
                                f"{_shape(batches[0])} {_dtype(batches[0])}; every batch must hold samples of "
                                "one shape and dtype")
            batches.append(t)
        ys = None
        if labels is not None:
            if not isinstance(labels, (list, tuple)) or len(labels) != len(batches):
                raise DataError(f"{_WHERE}: with data as a list of {len(batches)} batches, labels must be a list "
                                f"of as many label arrays, got {_describe(labels)}")
            ys = [_labels_tensor(y, f"labels of batch {i}", len(b)) for i, (y, b) in enumerate(zip(labels, batches))]
        return _Data(batches, ys, True, name)
    if isinstance(data, Mapping):
        arr, name = _unwrap_feed(data, "data", None)
    else:
        arr, name = data, None
    import torch

    if not isinstance(arr, (np.ndarray, torch.Tensor)):
        raise DataError(f"{_WHERE}: data must be an array or tensor of samples [N, ...], a {{name: array}} dict "
                        f"(single-input models) or a list of batches; got {type(arr).__name__}")
    x = _as_tensor(arr, "data")
    if len(x) == 0:
        raise DataError(f"{_WHERE}: data has no samples (its first dimension is 0)")
    y = None if labels is None else _labels_tensor(labels, "labels", len(x))
    return _Data(x, y, False, name)


def _describe(v) -> str:
    return f"a list of {len(v)}" if isinstance(v, (list, tuple)) else type(v).__name__


def _shape(t) -> str:
    return "[" + ", ".join(map(str, t.shape)) + "]"


def _dtype(t) -> str:
    return str(t.dtype).replace("torch.", "")


def _out_shape(t) -> str:
    return "[" + ", ".join(["N", *map(str, t.shape[1:])]) + "]"


# ------------------------------------------------------------------------------------------ teacher
class _OrtTeacher:
    """A Graph teacher: its first output, from ONNX Runtime with one thread."""

    def __init__(self, graph: Graph):
        import onnxruntime as ort

        inputs = graph.inputs
        if len(inputs) != 1:
            names = ", ".join(s.name for s in inputs)
            raise ModelError(f"{_WHERE}: the teacher graph has {len(inputs)} inputs ({names}); distill takes "
                             "single-input models")
        self.name = inputs[0].name
        shape = inputs[0].shape
        self.fixed_batch = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(graph.to_bytes(), so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ModelError(f"{_WHERE}: ONNX Runtime cannot load the teacher {graph.source or 'graph'}: "
                             f"{_first_line(e)}") from e
        self.source = graph.source or "graph"

    def __call__(self, x):
        import torch

        arr = x.numpy()
        step = self.fixed_batch or len(arr)
        outs = []
        for i in range(0, len(arr), step):
            chunk = arr[i:i + step]
            n = len(chunk)
            if self.fixed_batch and n < step:  # pad the last chunk up to the model's fixed batch
                chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), chunk.dtype)])
            try:
                y = self.session.run(None, {self.name: chunk})[0]
            except Exception as e:
                raise ModelError(f"{_WHERE}: the teacher {self.source} cannot run on data {_shape(x)} "
                                 f"{_dtype(x)}: {_first_line(e)}") from e
            outs.append(np.asarray(y)[:n])
        return torch.from_numpy(np.concatenate(outs))


def _module_call(module, x, who: str):
    import torch

    try:
        y = module(x)
    except Exception as e:
        raise ModelError(f"{_WHERE}: the {who} ({type(module).__name__}) cannot run on data {_shape(x)} "
                         f"{_dtype(x)}: {_first_line(e)}") from e
    if not isinstance(y, torch.Tensor):
        raise ModelError(f"{_WHERE}: the {who} returns {type(y).__name__}; distill needs a module returning one "
                         "tensor of logits")
    return y


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------- quantizers
def quantize_weight(w, mode: str):
    """The binary/ternary value of weight ``w``, per output channel (dim 0); see the module docstring."""
    import torch

    flat = w.detach().abs().reshape(len(w), -1)
    shape = (-1,) + (1,) * (w.ndim - 1)
    mean = flat.mean(1)
    if mode == "binary":
        a = mean.reshape(shape)
        return torch.where(w >= 0, a, -a)
    above = flat > TERNARY_THRESHOLD * mean[:, None]
    a = ((flat * above).sum(1) / above.sum(1).clamp_min(1)).reshape(shape)
    keep = above.reshape(w.shape)
    return torch.where(keep, torch.where(w > 0, a, -a), torch.zeros_like(w))


def _ste_parametrization(mode: str):
    import torch
    from torch import nn

    class _STE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            ctx.save_for_backward(w)
            return quantize_weight(w, mode)

        @staticmethod
        def backward(ctx, grad):
            (w,) = ctx.saved_tensors
            return grad * (w.abs() <= STE_CLIP).to(grad.dtype)

    class QuantizedWeight(nn.Module):
        def forward(self, w):
            return _STE.apply(w)

    return QuantizedWeight()


def _layers_in_call_order(module, x) -> list[str]:
    """Names of the Conv1d/2d/3d and Linear layers of ``module``, in the order one forward call runs them."""
    import torch
    from torch import nn

    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    order: list[str] = []
    handles = []
    for name, m in module.named_modules():
        if isinstance(m, kinds):
            handles.append(m.register_forward_pre_hook(
                lambda _m, _a, name=name: order.append(name) if name not in order else None))
    try:
        with torch.no_grad():
            _module_call(module, x, "student")
    finally:
        for h in handles:
            h.remove()
    return order


# ------------------------------------------------------------------------------------------ progress
class _Bar:
    """A progress label that redraws itself: :class:`Progress` formats its label on every tick."""

    def __init__(self, epochs: int):
        self.epochs, self.done, self.loss = epochs, 0, None

    def __str__(self) -> str:
        filled = round(20 * self.done / self.epochs)
        loss = "" if self.loss is None else f" loss {self.loss:.4f}"
        return f"distill: epoch {self.done}/{self.epochs} [{'#' * filled}{'.' * (20 - filled)}]{loss}"


# -------------------------------------------------------------------------------------------- entry
def distill(
    teacher,
    student,
    data,
    labels=None,
    *,
    temperature: float = 4.0,
    alpha: float | None = None,
    epochs: int = 10,
    batch_size: int | None = None,
    optimizer: str = "adam",
    lr: float | None = None,
    schedule: str = "cosine",
    weight_decay: float = 0.0,
    seed: int = 0,
    weights: str = "float",
    quantize_first_last: bool = False,
    example_inputs=None,
    dynamic_batch: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    progress: bool | Progress = True,
) -> Graph:
    """Train a copy of ``student`` on ``teacher``'s outputs over ``data``; return its captured Graph.

    ``teacher``: a ``torch.nn.Module``, a :class:`Graph` or a path to an ``.onnx``
    file (single input; its first output is the logits). ``student``: a
    ``torch.nn.Module`` with one input, returning one logits tensor of the
    teacher's shape (classes on dim 1). ``data``: the training inputs, either an
    array/tensor of samples ``[N, ...]`` (shuffled and cut into ``batch_size``
    batches, default 64, every epoch), a ``{name: array}`` dict of one entry (the
    same, and ``name`` becomes the graph input's name), or a list/tuple of
    batches (arrays, tensors or one-entry dicts; visited in a shuffled order each
    epoch, ``batch_size`` not allowed). Floating data is used as float32.
    ``labels``: integer class indices, ``[N]`` for an array (a list of per-batch
    arrays for a list of batches), for the hard-label term.

    ``alpha`` in [0, 1] weighs the soft (KD) loss against the hard-label
    cross-entropy; default 1 without labels (anything else is refused: there is
    no hard term), 0.5 with them. ``temperature`` > 0 softens both
    distributions (the soft loss is scaled by T^2). ``optimizer`` adam | adamw |
    sgd (momentum 0.9), ``lr`` (default 1e-3, 1e-2 for sgd), ``schedule``
    cosine (to 0 over all steps) | constant | step (x0.1 at 50 % and 75 % of the
    steps), ``weight_decay`` >= 0. ``weights`` float | binary | ternary: see the
    module docstring; ``quantize_first_last`` quantizes the first and last layer
    too. ``progress``: a live bar on a terminal (or a :class:`Progress`).

    The graph is captured with ``example_inputs`` (default: the first batch of
    ``data``), ``dynamic_batch``, ``input_names`` (default: the dict key, else
    ``forward``'s parameter name) and ``output_names``, as :func:`graphopt.capture`.
    The returned graph's ``training`` attribute is a :class:`DistillRecord`
    (epochs, per-epoch losses, final losses, quantized and float layers, the
    trained module); it is not kept by ``Graph.copy()`` or a save. Training runs
    on CPU (a CUDA student is copied to CPU), one torch thread, reproducibly (see
    the module docstring). Options are checked before anything runs
    (:class:`OptionError`); bad data is a :class:`DataError`; a student whose
    output shape differs from the teacher's is a :class:`ModelError`.
    """
    # ---------------------------------------------------------------- options (before anything else)
    temperature = _real("temperature", temperature, low=0.0, low_open=True)
    epochs = _int("epochs", epochs, low=1)
    if batch_size is not None:
        batch_size = _int("batch_size", batch_size, low=1)
    optimizer = _choice("optimizer", optimizer, OPTIMIZERS)
    lr = DEFAULT_LR[optimizer] if lr is None else _real("lr", lr, low=0.0, low_open=True)
    schedule = _choice("schedule", schedule, SCHEDULES)
    weight_decay = _real("weight_decay", weight_decay, low=0.0, low_open=False)
    seed = _int("seed", seed, low=0)
    weights = _choice("weights", weights, WEIGHTS)
    for name, v in (("quantize_first_last", quantize_first_last), ("dynamic_batch", dynamic_batch)):
        if not isinstance(v, bool):
            raise _option_error(name, "must be True or False", v)
    if alpha is not None:
        alpha = _real("alpha", alpha, low=0.0, low_open=False, high=1.0)
        if labels is None and alpha != 1.0:
            raise OptionError(f"{_WHERE}: option 'alpha' = {alpha:g} weighs a hard-label loss but no labels were "
                              "given; pass labels= or leave alpha at 1")
    else:
        alpha = 1.0 if labels is None else DEFAULT_ALPHA_WITH_LABELS
    if isinstance(progress, bool):
        progress = Progress(enabled=progress)
    elif not isinstance(progress, Progress):
        raise _option_error("progress", "must be True, False or a graphopt.console.Progress", progress)

    try:
        import torch
        from torch import nn
    except ModuleNotFoundError as e:
        raise GraphoptError("distill needs torch: pip install 'graphopt[torch]'") from e
    from .torch_capture import capture

    if not isinstance(student, nn.Module):
        raise ModelError(f"{_WHERE}: the student must be a torch.nn.Module, got {type(student).__name__}")
    if isinstance(teacher, (str, os.PathLike)):
        teacher = Graph.load(teacher)
    if not isinstance(teacher, (nn.Module, Graph)):
        raise ModelError(f"{_WHERE}: the teacher must be a torch.nn.Module, a graphopt.Graph or an .onnx path, "
                         f"got {type(teacher).__name__}")

    # ------------------------------------------------------------------------------------ data
    ds = _prepare_data(data, labels, batch_size is not None)
    batch_size = batch_size or 64

    threads = torch.get_num_threads()
    det, det_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    teacher_mode = teacher.training if isinstance(teacher, nn.Module) else None
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    # Warn-only: an op without a deterministic CPU kernel should not stop training (there are few).
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = copy.deepcopy(student).cpu().eval()
            run_teacher = _OrtTeacher(teacher) if isinstance(teacher, Graph) else None
            if run_teacher is None:
                teacher.eval()

            def teach(x):
                with torch.no_grad():
                    y = run_teacher(x) if run_teacher else _module_call(teacher, x, "teacher")
                if not isinstance(y, torch.Tensor) or not y.is_floating_point():
                    raise ModelError(f"{_WHERE}: the teacher outputs {_dtype(y)}; distill needs float logits")
                return y.detach().cpu().to(torch.float32)

            # ------------------------------------------------ one batch: shapes and layer order
            first = ds.first_batch(batch_size)
            t_first = teach(first)
            s_first = _module_call(model, first, "student")
            if t_first.ndim < 2:
                raise ModelError(f"{_WHERE}: the teacher outputs {_out_shape(t_first)}; distillation needs a class "
                                 "dimension: [N, classes, ...]")
            if tuple(s_first.shape[1:]) != tuple(t_first.shape[1:]) or len(s_first) != len(first):
                raise ModelError(f"{_WHERE}: the student outputs {_out_shape(s_first)} but the teacher "
                                 f"{_out_shape(t_first)} (on a batch of {len(first)})")
            classes = t_first.shape[1]
            labels_all = ds.labels if ds.batched else ([ds.labels] if ds.labels is not None else None)
            for y in labels_all or ():
                if y.shape[1:] != t_first.shape[2:]:
                    raise DataError(f"{_WHERE}: labels are {_out_shape(y)}; for outputs {_out_shape(t_first)} "
                                    f"they must be class indices {_out_shape(t_first[:, 0])}")
                if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
                    raise DataError(f"{_WHERE}: labels must be class indices in [0, {classes - 1}], got values in "
                                    f"[{int(y.min())}, {int(y.max())}]")
            layers = _layers_in_call_order(model, first)
            if weights == "float" or not layers:
                quantized: list[str] = []
            elif quantize_first_last:
                quantized = list(layers)
            else:
                quantized = layers[1:-1]
            floats = [n for n in layers if n not in quantized]
            if weights != "float" and not quantized:
                raise OptionError(f"{_WHERE}: option 'weights' = {weights!r} but the student runs "
                                  f"{len(layers)} Conv/Linear layer(s), the first and last, which stay float; "
                                  "pass quantize_first_last=True to quantize them")

            # ------------------------------------------------------------- teacher outputs, once
            with progress.step(f"distill: teacher outputs on {ds.samples} samples"):
                outs = [teach(x) for x in ds.eval_chunks()]
                ds.targets = outs if ds.batched else torch.cat(outs)
            for y in outs:
                if not bool(torch.isfinite(y).all()):
                    raise ModelError(f"{_WHERE}: the teacher outputs NaN or infinite values on the data")

            # --------------------------------------------------------------------------- training
            mods = dict(model.named_modules())
            for name in quantized:
                torch.nn.utils.parametrize.register_parametrization(mods[name], "weight",
                                                                    _ste_parametrization(weights))
            params = [p for p in model.parameters() if p.requires_grad]
            if not params:
                raise ModelError(f"{_WHERE}: the student has no trainable parameters")
            if optimizer == "adam":
                opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
            elif optimizer == "adamw":
                opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
            else:
                opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
            gen = torch.Generator().manual_seed(seed)
            total = max(1, ds.steps(batch_size) * epochs)

            def factor(step: int) -> float:
                if schedule == "cosine":
                    return 0.5 * (1.0 + math.cos(math.pi * step / total))
                if schedule == "step":
                    return 0.1 ** ((step >= total // 2) + (step >= (3 * total) // 4))
                return 1.0

            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            history: list[EpochLosses] = []
            bar = _Bar(epochs)
            model.train()
            steps = 0
            with progress.step(bar):
                for epoch in range(epochs):
                    sums = [0.0, 0.0, 0.0]
                    count = 0
                    for x, t, y in ds.epoch(batch_size, gen):
                        s = model(x)
                        soft = _kd_loss(s, t, temperature)
                        hard = nn.functional.cross_entropy(s, y) if y is not None else None
                        loss = alpha * soft + (1.0 - alpha) * hard if hard is not None else soft
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        sched.step()
                        steps += 1
                        count += 1
                        sums[0] += loss.item()
                        sums[1] += soft.item()
                        sums[2] += hard.item() if hard is not None else 0.0
                    if not math.isfinite(sums[0]):
                        raise ModelError(f"{_WHERE}: the loss became {sums[0]} in epoch {epoch + 1}; lower lr "
                                         f"(now {lr:g})")
                    history.append(EpochLosses(epoch + 1, sums[0] / count, sums[1] / count,
                                               sums[2] / count if ds.labels is not None else None,
                                               opt.param_groups[0]["lr"]))
                    bar.done, bar.loss = epoch + 1, history[-1].loss
            model.eval()
            with torch.no_grad():
                for name in quantized:  # the quantized values become the weights
                    torch.nn.utils.parametrize.remove_parametrizations(mods[name], "weight",
                                                                       leave_parametrized=True)
            for p in model.parameters():
                p.requires_grad_(False)
            seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det, warn_only=det_warn)
        if teacher_mode is not None:
            teacher.train(teacher_mode)

    # ------------------------------------------------------------------------------------- capture
    if example_inputs is None:
        example_inputs = (ds.first_batch(batch_size),)
    if input_names is None and ds.input_name is not None:
        input_names = [ds.input_name]
    with progress.step("distill: capture the student"):
        graph = capture(model, example_inputs, dynamic_batch=dynamic_batch, input_names=input_names,
                        output_names=output_names)
    graph.training = DistillRecord(
        epochs=epochs, steps=steps, samples=ds.samples, temperature=temperature, alpha=alpha, optimizer=optimizer,
        lr=lr, schedule=schedule, weight_decay=weight_decay, seed=seed, weights=weights, history=history,
        quantized_layers=quantized, float_layers=floats, seconds=seconds, student=model)
    return graph


def _kd_loss(student_logits, teacher_logits, temperature: float):
    """T^2 * KL(softmax(t / T) || softmax(s / T)) over dim 1, summed over classes, averaged over the rest."""
    import torch

    log_p = torch.log_softmax(teacher_logits / temperature, dim=1)
    log_q = torch.log_softmax(student_logits / temperature, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(1)
    return kl.mean() * temperature * temperature
