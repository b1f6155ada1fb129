"""Caffe nets for the adapter tests, as real prototxt + .caffemodel files with PyTorch ports.

- `lenet`: the demo's LeNet-style classifier (Convolution, ceil-rounded Pooling, ReLU,
  InnerProduct, Softmax), trained for a few seconds with a fixed seed so that colour matters to it.
  Its legacy service swaps RGB to BGR and subtracts per-channel means.
- `bnnet`: a residual block with BatchNorm + Scale, Eltwise and LRN, a global-average-pool head and
  fixed-seed random weights. Its legacy service scales to [0, 255], subtracts a mean image from a
  `.binaryproto` file and scales again, ImageNet-Caffe style.

Ports can carry one classic migration bug each (see `server.demo.caffe_models.MIGRATION_BUGS`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from torch.nn import functional as F

from server.demo.caffe_models import (
    LENET_PROTOTXT,
    MIGRATION_BUGS,
    RGB_TO_BGR,
    lenet_port,
    train_lenet,
    write_caffemodel,
    write_mean_file,
)
from server.demo.mxnet_models import synthetic_images

IMAGE = {"name": "image", "datatype": "FP32", "shape": [-1, 3, 32, 32]}
PROBABILITIES = {"name": "probabilities", "datatype": "FP32", "shape": [-1, 6], "class_scores": True}

# `res` is rewritten in place by a ReLU: as an output it means the value after that ReLU. The
# global-average-pool head (as in ResNet or SqueezeNet) lets a port that pools with floor rounding
# (32 -> 15 instead of Caffe's 32 -> 16) still run, and silently answer differently. LRN keeps
# Caffe's default k = 1: OpenCV ignores k (see test_lrn_k_that_opencv_ignores_is_refused).
BNNET_PROTOTXT = """\
name: "BNResidual"
input: "data"
input_dim: 1
input_dim: 3
input_dim: 32
input_dim: 32
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        param { lr_mult: 1 } param { lr_mult: 2 }
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 weight_filler { type: "msra" } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" batch_norm_param { use_global_stats: true } }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "bn2" type: "BatchNorm" bottom: "conv2" top: "conv2" }
layer { name: "scale2" type: "Scale" bottom: "conv2" top: "conv2" scale_param { bias_term: true } }
layer { name: "res" type: "Eltwise" bottom: "conv1" bottom: "conv2" top: "res" eltwise_param { operation: SUM } }
layer { name: "res_relu" type: "ReLU" bottom: "res" top: "res" }
layer { name: "norm" type: "LRN" bottom: "res" top: "norm" lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 } }
layer { name: "pool" type: "Pooling" bottom: "norm" top: "pool" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "gap" type: "Pooling" bottom: "pool" top: "gap" pooling_param { pool: AVE global_pooling: true } }
layer { name: "ip1" type: "InnerProduct" bottom: "gap" top: "ip1" inner_product_param { num_output: 6 } }
layer { name: "prob" type: "Softmax" bottom: "ip1" top: "prob" }
"""
BN_MOVING_AVERAGE_FACTOR = 999.98  # Caffe stores BatchNorm statistics unnormalised, with this divisor
BNNET_RAW_SCALE, BNNET_INPUT_SCALE = 255.0, 0.017


def _he(rng: np.random.Generator, *shape: int) -> np.ndarray:
    fan_in = int(np.prod(shape[1:]))
    return rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape).astype(np.float32)


def _batch_norm(rng: np.random.Generator, channels: int) -> list[np.ndarray]:
    factor = np.float32(BN_MOVING_AVERAGE_FACTOR)
    mean = rng.normal(0.0, 0.5, size=channels).astype(np.float32) * factor
    variance = rng.uniform(0.5, 2.0, size=channels).astype(np.float32) * factor
    return [mean, variance, np.array([factor], np.float32)]


def bnnet_weights(seed: int = 2) -> dict[str, list[np.ndarray]]:
    import torch

    rng = np.random.default_rng(seed)
    weights = {
        "conv1": [_he(rng, 8, 3, 3, 3), rng.normal(0.0, 0.1, 8).astype(np.float32)],
        "bn1": _batch_norm(rng, 8),
        "scale1": [rng.uniform(0.5, 1.5, 8).astype(np.float32), rng.normal(0.0, 0.2, 8).astype(np.float32)],
        "conv2": [_he(rng, 8, 8, 3, 3)],
        "bn2": _batch_norm(rng, 8),
        "scale2": [rng.uniform(0.5, 1.5, 8).astype(np.float32), rng.normal(0.0, 0.2, 8).astype(np.float32)],
        "ip1": [np.zeros((6, 8), np.float32), np.zeros(6, np.float32)],
    }
    # A random head picks the same class for every image. Centre and scale it on sample images so
    # that, like a trained net's, its top-1 class varies from image to image.
    images, _ = synthetic_images(256, rng)
    with torch.no_grad():
        _, _, features = bnnet_port(weights, bnnet_mean_image())(torch.from_numpy(images))
        pooled = F.max_pool2d(F.local_response_norm(features, 5, 0.5, 0.75, 1.0), 3, 2, ceil_mode=True)
    pooled = pooled.mean(dim=(2, 3)).numpy()
    head = _he(rng, 6, 8)
    logits = (pooled - pooled.mean(axis=0)) @ head.T
    head = (head * (2.0 / logits.std())).astype(np.float32)
    weights["ip1"] = [head, (-head @ pooled.mean(axis=0)).astype(np.float32)]
    return weights


def bnnet_mean_image(seed: int = 3) -> np.ndarray:
    """A mean image in [0, 255], varying over the image as a real `compute_image_mean` result does."""
    rng = np.random.default_rng(seed)
    base = np.array([104.0, 117.0, 123.0], np.float32).reshape(3, 1, 1)
    return (base + rng.normal(0.0, 8.0, size=(3, 32, 32))).astype(np.float32)


def bnnet_port(weights: dict[str, list[np.ndarray]], mean_image: np.ndarray, bug: str | None = None):
    """The residual net's port: the service's x255 / mean image / x0.017, Caffe BatchNorm (statistics
    divided by the stored factor) + Scale, Eltwise SUM, LRN, ceil pooling, global average pooling."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    def caffe_batch_norm(blobs: list[np.ndarray]) -> nn.BatchNorm2d:
        mean, variance, factor = blobs
        norm = nn.BatchNorm2d(len(mean), eps=1e-5, affine=False)
        with torch.no_grad():
            norm.running_mean.copy_(torch.from_numpy(mean / factor[0]))
            norm.running_var.copy_(torch.from_numpy(variance / factor[0]))
        return norm

    def channel_vector(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).view(1, -1, 1, 1)

    class BNResidualPort(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn1, self.bn2 = caffe_batch_norm(weights["bn1"]), caffe_batch_norm(weights["bn2"])
            self.lrn = nn.LocalResponseNorm(5, alpha=0.5, beta=0.75, k=1.0)
            self.ip1 = nn.Linear(8, 6)
            for name in ("scale1", "scale2"):
                gamma, beta = weights[name]
                self.register_buffer(f"{name}_gamma", channel_vector(gamma))
                self.register_buffer(f"{name}_beta", channel_vector(beta))
            self.register_buffer("mean", torch.from_numpy(mean_image.copy()))

        def forward(self, x: torch.Tensor):
            if bug == "rgb_bgr":
                x = x.flip(1)
            x = x * BNNET_RAW_SCALE
            if bug != "no_mean":
                x = x - self.mean
            x = x * BNNET_INPUT_SCALE
            branch = F.relu(self.bn1(self.conv1(x)) * self.scale1_gamma + self.scale1_beta)
            residual = self.bn2(self.conv2(branch)) * self.scale2_gamma + self.scale2_beta
            features = F.relu(branch + residual)
            pooled = F.max_pool2d(self.lrn(features), 3, 2, ceil_mode=bug != "floor_pooling")
            logits = self.ip1(pooled.mean(dim=(2, 3)))
            return torch.softmax(logits, dim=1), logits, features

    model = BNResidualPort()
    ip_weight = weights["ip1"][0]
    if bug == "transposed_ip":
        ip_weight = ip_weight.reshape(ip_weight.shape[1], ip_weight.shape[0]).T
    with torch.no_grad():
        model.conv1.weight.copy_(torch.from_numpy(weights["conv1"][0]))
        model.conv1.bias.copy_(torch.from_numpy(weights["conv1"][1]))
        model.conv2.weight.copy_(torch.from_numpy(weights["conv2"][0]))
        model.ip1.weight.copy_(torch.from_numpy(np.ascontiguousarray(ip_weight)))
        model.ip1.bias.copy_(torch.from_numpy(weights["ip1"][1]))
    return model.eval()


def save_torchscript(model, path: Path) -> Path:
    import warnings

    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # F.local_response_norm checks numel()
        torch.jit.save(torch.jit.trace(model, torch.zeros((1, 3, 32, 32))), str(path))
    return path


@dataclasses.dataclass(frozen=True)
class CaffeNetFiles:
    """One Caffe model on disk, the legacy backend spec that serves it, and its PyTorch port."""

    name: str
    directory: Path
    prototxt: Path
    caffemodel: Path
    weights: dict[str, list[np.ndarray]]
    legacy: dict[str, Any]
    outputs: list[dict[str, Any]]
    mean: np.ndarray  # what the legacy service subtracts: per-channel (3, 1, 1) or an image (3, 32, 32)

    def port(self, bug: str | None = None):
        if bug not in (None, *MIGRATION_BUGS):
            raise ValueError(f"unknown migration bug {bug!r}")
        if self.name == "lenet":
            return lenet_port(self.weights, self.mean.ravel().tolist(), bug)
        return bnnet_port(self.weights, self.mean, bug)

    def candidate(self, bug: str | None = None) -> Path:
        """The port saved as TorchScript (once per bug), as a team would deploy it."""
        path = self.directory / f"{self.name}_port_{bug or 'faithful'}.pt"
        if not path.exists():
            save_torchscript(self.port(bug), path)
        return path

    def pair(self, bug: str | None = None, name: str | None = None, **extra: Any) -> dict[str, Any]:
        """Config of one pair: this net on the legacy side, its port (with `bug`) as the candidate."""
        return {
            "name": name or self.name, "inputs": [IMAGE], "outputs": self.outputs,
            "legacy": {**self.legacy, **extra.pop("legacy", {})},
            "candidate": {"runtime": "torch", "path": str(self.candidate(bug))},
            "shadow_percent": 100, **extra,
        }

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """The legacy service's preprocessing written out by hand, to feed a direct OpenCV call."""
        if self.name == "lenet":
            return np.ascontiguousarray(images[:, ::-1] - self.mean[None], dtype=np.float32)
        scaled = images * np.float32(BNNET_RAW_SCALE) - self.mean[None]
        return np.ascontiguousarray(scaled * np.float32(BNNET_INPUT_SCALE), dtype=np.float32)


def write_lenet(directory: Path) -> CaffeNetFiles:
    directory.mkdir(parents=True, exist_ok=True)
    prototxt = directory / "lenet_deploy.prototxt"
    prototxt.write_text(LENET_PROTOTXT)
    weights, mean_bgr, _ = train_lenet()
    caffemodel = write_caffemodel(prototxt, weights, directory / "lenet.caffemodel")
    legacy = {
        "runtime": "caffe", "prototxt": str(prototxt), "caffemodel": str(caffemodel),
        "channel_swap": RGB_TO_BGR, "mean_values": mean_bgr,
        "tensor_names": {"image": "data", "probabilities": "prob"},
    }
    mean = np.asarray(mean_bgr, np.float32).reshape(3, 1, 1)
    return CaffeNetFiles("lenet", directory, prototxt, caffemodel, weights, legacy, [PROBABILITIES], mean)


def write_bnnet(directory: Path) -> CaffeNetFiles:
    directory.mkdir(parents=True, exist_ok=True)
    prototxt = directory / "bnnet_deploy.prototxt"
    prototxt.write_text(BNNET_PROTOTXT)
    weights = bnnet_weights()
    caffemodel = write_caffemodel(prototxt, weights, directory / "bnnet.caffemodel")
    mean = bnnet_mean_image()
    # Mean files from Caffe's own tools carry the legacy num/channels/height/width dimensions.
    mean_file = write_mean_file(mean, directory / "bnnet_mean.binaryproto", legacy_dims=True)
    legacy = {
        "runtime": "caffe", "prototxt": str(prototxt), "caffemodel": str(caffemodel),
        "raw_scale": BNNET_RAW_SCALE, "mean_file": str(mean_file), "input_scale": BNNET_INPUT_SCALE,
        "tensor_names": {"image": "data", "probabilities": "prob", "logits": "ip1", "features": "res"},
    }
    outputs = [
        PROBABILITIES,
        {"name": "logits", "datatype": "FP32", "shape": [-1, 6]},
        {"name": "features", "datatype": "FP32", "shape": [-1, 8, 32, 32]},
    ]
    return CaffeNetFiles("bnnet", directory, prototxt, caffemodel, weights, legacy, outputs, mean)
