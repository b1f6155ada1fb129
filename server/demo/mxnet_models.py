"""The demo's models: a small real MXNet image classifier and PyTorch ports of it, one with a bug."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

NUM_CLASSES = 6
IMAGE_SHAPE = (3, 32, 32)
_COLOURS = np.array([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0]], dtype=np.float32)


def synthetic_images(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Images of a coloured square on noise; the class is its colour and which half it sits in.

    Colour matters, so a port that swaps RGB and BGR visibly disagrees with the legacy model.
    """
    labels = rng.integers(0, NUM_CLASSES, size=count)
    images = rng.normal(0.0, 0.15, size=(count, *IMAGE_SHAPE)).astype(np.float32)
    for image, label in zip(images, labels):
        colour, lower_half = _COLOURS[label % 3], label >= 3
        top = rng.integers(16, 22) if lower_half else rng.integers(0, 6)
        left = rng.integers(0, 22)
        image[:, top : top + 10, left : left + 10] += colour[:, None, None]
    return images, labels


@dataclasses.dataclass(frozen=True)
class DemoModels:
    symbol: Path
    params: Path
    faithful_torch: Path
    buggy_torch: Path
    train_accuracy: float


def train_mxnet_classifier(prefix: Path, steps: int = 250, seed: int = 7) -> tuple[Path, Path, float, dict]:
    """Train the legacy model for a few seconds and export it as `HybridBlock.export` does."""
    import mxnet as mx
    from mxnet import autograd, gluon

    mx.random.seed(seed)
    rng = np.random.default_rng(seed)

    class Classifier(gluon.HybridBlock):
        def __init__(self) -> None:
            super().__init__()
            with self.name_scope():
                self.features = gluon.nn.HybridSequential()
                self.features.add(
                    gluon.nn.Conv2D(8, 3, padding=1, activation="relu"),
                    gluon.nn.MaxPool2D(2),
                    gluon.nn.Conv2D(16, 3, padding=1, activation="relu"),
                    gluon.nn.MaxPool2D(2),
                )
                self.classes = gluon.nn.Dense(NUM_CLASSES)

        def logits(self, x):
            return self.classes(self.features(x))

        def hybrid_forward(self, F, x):
            return F.softmax(self.classes(self.features(x)), axis=-1)

    net = Classifier()
    net.initialize(mx.init.Xavier())
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 0.01})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for _ in range(steps):
        images, labels = synthetic_images(64, rng)
        with autograd.record():
            loss = loss_fn(net.logits(mx.nd.array(images)), mx.nd.array(labels))
        loss.backward()
        trainer.step(64)
    test_images, test_labels = synthetic_images(512, rng)
    accuracy = float((net(mx.nd.array(test_images)).asnumpy().argmax(1) == test_labels).mean())
    net.hybridize()
    net(mx.nd.array(test_images[:1]))
    net.export(str(prefix), epoch=0)
    weights = {
        "conv1.weight": net.features[0].weight.data().asnumpy(),
        "conv1.bias": net.features[0].bias.data().asnumpy(),
        "conv2.weight": net.features[2].weight.data().asnumpy(),
        "conv2.bias": net.features[2].bias.data().asnumpy(),
        "classes.weight": net.classes.weight.data().asnumpy(),
        "classes.bias": net.classes.bias.data().asnumpy(),
    }
    return Path(f"{prefix}-symbol.json"), Path(f"{prefix}-0000.params"), accuracy, weights


def torch_port(weights: dict[str, np.ndarray], swap_rgb_bgr: bool = False, softmax: bool = True):
    """The PyTorch port of the classifier, loading the MXNet weights; optionally with classic bugs:
    channels in the other order (RGB/BGR), or logits returned where the legacy returns probabilities."""
    import torch
    from torch import nn

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
            self.classes = nn.Linear(16 * 8 * 8, NUM_CLASSES)
            self.swap_rgb_bgr = swap_rgb_bgr
            self.softmax = softmax

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.swap_rgb_bgr:
                x = x.flip(1)
            x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
            x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
            logits = self.classes(x.flatten(1))
            return torch.softmax(logits, dim=-1) if self.softmax else logits

    model = Classifier()
    model.load_state_dict({name: torch.from_numpy(value) for name, value in weights.items()})
    return model.eval()


def save_torchscript(model, path: Path) -> Path:
    import torch

    example = torch.zeros((1, *IMAGE_SHAPE))
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(model, example), str(path))
    return path


def build_demo_models(workdir: Path) -> DemoModels:
    workdir.mkdir(parents=True, exist_ok=True)
    symbol, params, accuracy, weights = train_mxnet_classifier(workdir / "classifier")
    return DemoModels(
        symbol=symbol,
        params=params,
        faithful_torch=save_torchscript(torch_port(weights), workdir / "classifier_port.pt"),
        buggy_torch=save_torchscript(torch_port(weights, swap_rgb_bgr=True), workdir / "classifier_port_bgr.pt"),
        train_accuracy=accuracy,
    )


def port_weights(torchscript: Path) -> dict[str, np.ndarray]:
    """The classifier's weights, read back from a saved port."""
    import torch

    return {name: value.numpy() for name, value in torch.jit.load(str(torchscript)).state_dict().items()}

