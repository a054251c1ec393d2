"""The models of the CPU benchmark (``bench_cpu.py``): seeded builders, so every run measures the same weights.

- ``mlp``, ``cnn``, ``transformer``: :func:`graphopt.testing.torch_models`, captured at batch 1 (static);
- ``resnet18``: a ResNet-18-style CNN at 224² written out here (BasicBlock ×[2, 2, 2, 2], batch-norm,
  ReLU, max-pool, global average pool, fc to 1000 classes; no torchvision);
- ``encoder``: a 4-layer transformer encoder (d=256, 4 heads, ffn 1024, sequence 128, pre-softmax scaling,
  GELU, post-norm), written out with plain Linear/LayerNorm/softmax;
- ``digits``: the bundled scikit-learn digits MLP (``examples/digits_mlp.onnx``);
- the real corpus, :data:`graphopt.testing.REAL_MODELS` (all nine), with their shapes, fixed values and feeds.

``resnet18`` and ``encoder`` are captured with a dynamic batch: ONE artifact serves batch 1 and 8.

:func:`torch_runner` is what the benchmark's torch worker process calls (through
``graphopt.bench.measure``'s ``("python", "models.py:torch_runner", name)`` runner): it
rebuilds the same seeded module there, so torch eager runs in a process of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TEST_MODELS = ("mlp", "cnn", "transformer")
BUILT_MODELS = ("resnet18", "encoder")
#: Batches timed from one dynamic-batch artifact.
DYNAMIC_BATCHES = (1, 8)


@dataclass
class BenchModel:
    """One row group of the table: how to build the graph and the feeds."""

    name: str
    kind: str  # "torch" (captured; torch eager is timed too), "onnx" (a file), "real" (the corpus)
    about: str
    batches: tuple[int, ...] = (1,)
    dynamic: bool = False  # captured with a symbolic batch: one artifact for every batch
    input_shapes: dict = field(default_factory=dict)
    input_values: dict = field(default_factory=dict)
    refused: tuple[str, ...] = ()


def catalog() -> dict[str, BenchModel]:
    from graphopt.testing import REAL_MODELS

    out = {
        "mlp": BenchModel("mlp", "torch", "test MLP 64-128-128-10, GELU"),
        "cnn": BenchModel("cnn", "torch", "test CNN 32², 2 residual blocks"),
        "transformer": BenchModel("transformer", "torch", "test encoder, 2 layers d=64, seq 16"),
        "resnet18": BenchModel("resnet18", "torch", "ResNet-18-style CNN, 224²", DYNAMIC_BATCHES, dynamic=True),
        "encoder": BenchModel("encoder", "torch", "4-layer encoder d=256, 4 heads, ffn 1024, seq 128",
                              DYNAMIC_BATCHES, dynamic=True),
        "digits": BenchModel("digits", "onnx", "bundled digits MLP (scikit-learn), lowered at batch 1"),
    }
    for name, spec in REAL_MODELS.items():
        out[name] = BenchModel(name, "real", spec.about, input_shapes=dict(spec.input_shapes),
                               input_values=dict(spec.input_values), refused=tuple(spec.refused_ops))
    return out


# --------------------------------------------------------------------------- torch modules


def resnet18(num_classes: int = 1000):
    """A ResNet-18-style CNN in eval mode, seeded, with non-trivial batch-norm statistics."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
            layers, cin = [], 64
            for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
                cin = cout
            self.layers = nn.Sequential(*layers)
            self.fc = nn.Linear(512, num_classes)

        def forward(self, x):
            x = self.layers(self.stem(x))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    m = ResNet18().eval()
    _bn_statistics(m)
    return m


def encoder(layers: int = 4, d: int = 256, heads: int = 4, ffn: int = 1024):
    """A post-norm transformer encoder in eval mode, seeded; input ``[batch, seq, d]``."""
    import math

    import torch
    from torch import nn

    torch.manual_seed(0)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)
            self.norm1 = nn.LayerNorm(d)
            self.ff1 = nn.Linear(d, ffn)
            self.ff2 = nn.Linear(ffn, d)
            self.norm2 = nn.LayerNorm(d)

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = self.qkv(x).reshape(b, s, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
            y = (att @ v).transpose(1, 2).reshape(b, s, d)
            x = self.norm1(x + self.proj(y))
            return self.norm2(x + self.ff2(nn.functional.gelu(self.ff1(x))))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(*(Layer() for _ in range(layers)))

        def forward(self, x):
            return self.layers(x)

    return Encoder().eval()


def _bn_statistics(module) -> None:
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, nn.BatchNorm2d):
                c = mod.num_features
                mod.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
                mod.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                mod.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                mod.bias.copy_((torch.rand(c, generator=gen) - 0.5) * 0.4)


def torch_module(name: str):
    """``(module, example inputs at batch 1)`` for a torch model of the benchmark."""
    import torch

    if name in TEST_MODELS:
        from graphopt.testing import torch_models

        module, example = torch_models()[name]
        return module, tuple(t[:1] for t in example)
    if name == "resnet18":
        return resnet18(), (torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2)),)
    if name == "encoder":
        return encoder(), (torch.randn(1, 128, 256, generator=torch.Generator().manual_seed(2)),)
    raise KeyError(name)


def torch_feed(name: str, batch: int) -> dict:
    """Seeded inputs at ``batch`` for a torch model, keyed by the captured graph's input names (``x``)."""
    _, example = torch_module(name)
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal((batch, *t.shape[1:])).astype(np.float32) for t in example]
    return dict(zip(("x",), arrays)) if len(arrays) == 1 else {f"input{i}": a for i, a in enumerate(arrays)}


def torch_runner(name: str, feed: dict, threads: int):
    """Worker side (see ``graphopt.bench.measure``): torch eager on ``feed``, ``threads`` intra-op threads."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    module, _ = torch_module(name)
    args = [torch.from_numpy(np.asarray(v, order="C")) for v in feed.values()]

    def call():
        with torch.inference_mode():
            out = module(*args)
        outs = [out] if isinstance(out, torch.Tensor) else list(out)
        return [o.numpy() for o in outs]

    return call, {"torch": torch.__version__, "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- graphs and feeds


def build(model: BenchModel, cache_dir=None):
    """``(graph, input_shapes, input_values)`` to lower for ``model``."""
    import graphopt
    from graphopt.graph import Graph

    if model.kind == "torch":
        module, example = torch_module(model.name)
        return graphopt.capture(module, example, dynamic_batch=model.dynamic), {}, {}
    if model.kind == "onnx":
        # At batch 1, fixed as the corpus models' shapes are (the file's batch dim is symbolic).
        return Graph.load(REPO / "examples" / "digits_mlp.onnx"), {"image": [1, 64]}, {}
    from graphopt.testing import fetch_real_model

    return Graph.load(fetch_real_model(model.name, cache_dir)), model.input_shapes, model.input_values


def feed(model: BenchModel, batch: int) -> dict:
    """Seeded inputs of the model's own kind at ``batch``."""
    if model.kind == "torch":
        return torch_feed(model.name, batch)
    if model.kind == "onnx":
        with np.load(REPO / "examples" / "digits_inputs.npz") as z:
            return {"image": z["image"][:batch]}
    from graphopt.testing import REAL_MODELS

    return REAL_MODELS[model.name].make_feeds(seed=0)[0]
