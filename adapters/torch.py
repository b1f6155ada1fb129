"""PyTorch programs run in-process: TorchScript (`torch.jit.save`) or `torch.export` (.pt2)."""

from __future__ import annotations

import warnings

import numpy as np

from adapters.base import InProcessBackend
from server.config import TorchConfig
from server.errors import BackendError, ConfigError


class TorchBackend(InProcessBackend):
    runtime = "torch"
    config: TorchConfig

    def load_blocking(self) -> None:
        import torch

        path, device = str(self.config.path), torch.device(self.config.device)
        try:
            self._module = torch.jit.load(path, map_location=device)
            self._format = "torchscript"
        except Exception as script_error:
            try:
                self._module = torch.export.load(path).module()
                self._format = "torch.export"
            except Exception as export_error:
                raise ConfigError(
                    f"torch model {path} is neither TorchScript ({script_error}) "
                    f"nor a torch.export program ({export_error})"
                ) from export_error
        if hasattr(self._module, "eval") and self._format == "torchscript":
            self._module.eval()
        self._torch, self._device = torch, device

    def run_blocking(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        with warnings.catch_warnings():
            # Request buffers are read-only; the model reads them and never writes.
            warnings.simplefilter("ignore", UserWarning)
            args = [torch.from_numpy(inputs[name]).to(self._device) for name in self.signature.input_names]
        with torch.inference_mode():
            result = self._module(*args)
        names = self.signature.output_names
        if isinstance(result, dict):
            missing = set(names) - set(result)
            if missing:
                raise BackendError(f"torch model returned {sorted(result)}, missing {sorted(missing)}")
            tensors = [result[name] for name in names]
        else:
            tensors = list(result) if isinstance(result, (list, tuple)) else [result]
            if len(tensors) != len(names):
                raise BackendError(f"torch model returned {len(tensors)} outputs, expected {len(names)}")
        return {name: tensor.detach().cpu().numpy() for name, tensor in zip(names, tensors)}

    def describe(self) -> dict[str, str]:
        return {"runtime": self.runtime, "format": getattr(self, "_format", ""), "device": self.config.device}
