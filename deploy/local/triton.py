"""A real Triton server on this machine, without a GPU or NVIDIA's container: nvidia-pytriton's bundled
tritonserver serving a model repository laid out as for Triton (MODEL/config.pbtxt, MODEL/1/model.pt).

    python deploy/local/triton.py MODEL_REPOSITORY --grpc-port 8101

Each model's names, datatypes, dims and max_batch_size come from its config.pbtxt, so the gateway
sees the same model it will see in the cluster. What runs it differs: here pytriton's Python backend
calls the TorchScript file with torch on the CPU; in the cluster Triton's pytorch_libtorch backend
runs it on the GPU. Stops on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import sysconfig
import threading
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

DTYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32}


def read_repository(repository: Path) -> list[tuple[mc.ModelConfig, Path]]:
    models = []
    for config_path in sorted(repository.glob("*/config.pbtxt")):
        config = text_format.Parse(config_path.read_text(), mc.ModelConfig())
        versions = sorted((p for p in config_path.parent.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        if not versions or not (versions[-1] / "model.pt").is_file():
            raise SystemExit(f"{config_path.parent}: no <version>/model.pt")
        models.append((config, versions[-1] / "model.pt"))
    if not models:
        raise SystemExit(f"{repository}: no model with a config.pbtxt")
    return models


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repository", type=Path)
    parser.add_argument("--grpc-port", type=int, default=8101)
    args = parser.parse_args()

    # tritonserver's Python-backend stub must load this interpreter's libpython, not the system's.
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    os.environ["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p)

    import torch
    from pytriton.decorators import batch
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    torch.set_num_threads(1)

    def infer_with(module, output: str):
        @batch
        def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
            with torch.inference_mode():
                result = module(*(torch.from_numpy(np.ascontiguousarray(array)) for array in inputs.values()))
            return {output: result.numpy()}

        return infer

    def tensors(items) -> list[Tensor]:
        return [Tensor(name=t.name, dtype=DTYPES[mc.DataType.Name(t.data_type)], shape=tuple(t.dims)) for t in items]

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    config = TritonConfig(grpc_address="127.0.0.1", grpc_port=args.grpc_port, allow_http=False, allow_metrics=False,
                          exit_on_error=True)
    with Triton(config=config) as triton:
        for model, path in read_repository(args.repository):
            (output,) = model.output
            triton.bind(model_name=model.name, infer_func=infer_with(torch.jit.load(str(path)).eval(), output.name),
                        inputs=tensors(model.input), outputs=tensors(model.output),
                        config=ModelConfig(max_batch_size=model.max_batch_size), strict=True)
            print(f"serving {model.name} from {path}", flush=True)
        triton.run()
        print(f"Triton gRPC on 127.0.0.1:{args.grpc_port}", flush=True)
        while not stop.wait(0.5):
            if not triton.is_alive():
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
