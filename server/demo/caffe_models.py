"""The Caffe demo: a small LeNet-style classifier as real .prototxt + .caffemodel files, and PyTorch ports.

It is trained in PyTorch on the demo task for a few seconds, then its weights are written with the
project's caffe.proto exactly as Caffe lays out a `.caffemodel`, so the Caffe side and the
faithful port run the same numbers. Like many Caffe services, the legacy side preprocesses in the
service, not in the net: it swaps RGB to BGR and subtracts a per-channel mean. The faithful port
does the same inside the model; the buggy one forgets the channel swap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from server.demo.mxnet_models import NUM_CLASSES, save_torchscript, synthetic_images

LENET_PROTOTXT = """\
name: "ShapesLeNet"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 8 kernel_size: 5 } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "pool1" top: "pool1" }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2" convolution_param { num_output: 16 kernel_size: 3 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1" inner_product_param { num_output: 64 } }
layer { name: "relu3" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" inner_product_param { num_output: 6 } }
layer { name: "prob" type: "Softmax" bottom: "ip2" top: "prob" }
"""
# Caffe rounds pooled sizes up: 28 -> 14 and 12 -> 6 here, where floor rounding gives 13 and 5.
RGB_TO_BGR = [2, 1, 0]


# -- writing Caffe files with the project's caffe.proto ----------------------------------------


def blob_proto(array: np.ndarray, legacy_dims: bool = False):
    """A BlobProto holding `array`; `legacy_dims` writes the pre-2015 num/channels/height/width form."""
    from protos import caffe_pb2

    array = np.asarray(array, dtype=np.float32)
    blob = caffe_pb2.BlobProto()
    if legacy_dims:
        if array.ndim > 4:
            raise ValueError(f"legacy blob dimensions hold at most 4 axes, not {array.shape}")
        blob.num, blob.channels, blob.height, blob.width = (1,) * (4 - array.ndim) + array.shape
    else:
        blob.shape.dim.extend(array.shape)
    blob.data.extend(array.ravel().tolist())
    return blob


def write_caffemodel(prototxt: Path, weights: Mapping[str, Sequence[np.ndarray]], path: Path) -> Path:
    """Caffe's own layout: the net definition, each layer carrying its learned blobs in order."""
    from google.protobuf import text_format

    from protos import caffe_pb2

    net = text_format.Parse(Path(prototxt).read_text(), caffe_pb2.NetParameter(), allow_unknown_field=True)
    unknown = set(weights) - {layer.name for layer in net.layer}
    if unknown:
        raise ValueError(f"weights for layers {sorted(unknown)} that {prototxt} does not define")
    for layer in net.layer:
        for array in weights.get(layer.name, ()):
            layer.blobs.append(blob_proto(array))
    Path(path).write_bytes(net.SerializeToString())
    return Path(path)


def write_mean_file(mean: np.ndarray, path: Path, legacy_dims: bool = False) -> Path:
    """A `.binaryproto` mean image (C x H x W, stored as 1 x C x H x W) as Caffe's compute_image_mean writes."""
    Path(path).write_bytes(blob_proto(np.asarray(mean)[None], legacy_dims).SerializeToString())
    return Path(path)


# -- the demo classifier -----------------------------------------------------------------------


MIGRATION_BUGS = ("rgb_bgr", "no_mean", "transposed_ip", "floor_pooling")


def lenet_port(weights: Mapping[str, Sequence[np.ndarray]] | None, mean_bgr: Sequence[float], bug: str | None = None):
    """The PyTorch port of the Caffe LeNet, with the legacy service's preprocessing built in.

    With `weights` (Caffe's layout) the layers are loaded; without, they start untrained. `bug` makes
    it one of the classic migration mistakes: `rgb_bgr` feeds RGB to a net trained on BGR, `no_mean`
    forgets the mean subtraction, `transposed_ip` reads an InnerProduct weight as (in, out) instead
    of Caffe's (out, in), `floor_pooling` keeps PyTorch's floor rounding where Caffe rounds up (here
    the shapes then no longer fit ip1, so that port fails outright).
    """
    import torch
    from torch import nn
    from torch.nn import functional as F

    if bug not in (None, *MIGRATION_BUGS):
        raise ValueError(f"unknown migration bug {bug!r}; known: {MIGRATION_BUGS}")

    class CaffeLeNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 5)
            self.conv2 = nn.Conv2d(8, 16, 3)
            self.ip1 = nn.Linear(16 * 6 * 6, 64)
            self.ip2 = nn.Linear(64, NUM_CLASSES)
            self.register_buffer("mean", torch.tensor(list(mean_bgr), dtype=torch.float32).view(1, 3, 1, 1))

        def logits(self, x: torch.Tensor) -> torch.Tensor:
            if bug != "rgb_bgr":
                x = x.flip(1)
            if bug != "no_mean":
                x = x - self.mean
            ceil = bug != "floor_pooling"
            x = F.relu(F.max_pool2d(self.conv1(x), 3, 2, ceil_mode=ceil))
            x = F.max_pool2d(F.relu(self.conv2(x)), 3, 2, ceil_mode=ceil)
            x = F.relu(self.ip1(x.flatten(1)))
            return self.ip2(x)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.logits(x), dim=1)

    model = CaffeLeNet()
    if weights is not None:
        state = {"mean": model.mean}
        for layer in ("conv1", "conv2", "ip1", "ip2"):
            weight, bias = (np.asarray(array, dtype=np.float32) for array in weights[layer])
            if layer == "ip1" and bug == "transposed_ip":
                weight = np.ascontiguousarray(weight.reshape(weight.shape[1], weight.shape[0]).T)
            state[f"{layer}.weight"], state[f"{layer}.bias"] = torch.from_numpy(weight), torch.from_numpy(bias)
        model.load_state_dict(state)
    return model.eval()


def train_lenet(steps: int = 100, seed: int = 11, batch: int = 32) -> tuple[dict[str, list[np.ndarray]], list[float], float]:
    """Train the classifier as the legacy team did (BGR, mean subtracted); returns Caffe-layout weights."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    sample, _ = synthetic_images(1024, rng)
    mean_bgr = [round(float(value), 4) for value in sample[:, ::-1].mean(axis=(0, 2, 3))]
    model = lenet_port(None, mean_bgr).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.005)
    for _ in range(steps):
        images, labels = synthetic_images(batch, rng)
        loss = torch.nn.functional.cross_entropy(model.logits(torch.from_numpy(images)), torch.from_numpy(labels))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    test_images, test_labels = synthetic_images(512, rng)
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(test_images)).argmax(1).numpy() == test_labels).mean())
    # Caffe stores Convolution weights as (out, in, kh, kw) and InnerProduct as (out, in): PyTorch's layout.
    weights = {
        name: [getattr(model, name).weight.detach().numpy().copy(), getattr(model, name).bias.detach().numpy().copy()]
        for name in ("conv1", "conv2", "ip1", "ip2")
    }
    return weights, mean_bgr, accuracy


def build_caffe_demo_models(workdir: Path) -> tuple[dict[str, Any], Path, Path]:
    """The legacy backend spec for the Caffe LeNet, and the faithful and RGB/BGR-swapped ports."""
    workdir.mkdir(parents=True, exist_ok=True)
    weights, mean_bgr, accuracy = train_lenet()
    prototxt = workdir / "lenet_deploy.prototxt"
    prototxt.write_text(LENET_PROTOTXT)
    caffemodel = write_caffemodel(prototxt, weights, workdir / "lenet.caffemodel")
    print(f"trained the Caffe LeNet: {accuracy:.1%} accuracy on held-out images", flush=True)
    spec = {
        "runtime": "caffe",
        "prototxt": str(prototxt),
        "caffemodel": str(caffemodel),
        "channel_swap": RGB_TO_BGR,
        "mean_values": mean_bgr,
        "tensor_names": {"image": "data", "probabilities": "prob"},
    }
    faithful = save_torchscript(lenet_port(weights, mean_bgr), workdir / "lenet_port.pt")
    buggy = save_torchscript(lenet_port(weights, mean_bgr, bug="rgb_bgr"), workdir / "lenet_port_rgb.pt")
    return spec, faithful, buggy
