"""A real Triton Inference Server (nvidia-pytriton's bundled tritonserver) serving TorchScript models.

The server runs in a child process started by `start_triton`: pytriton's `Triton` object, the
tritonserver binary it launches and the inference callable (torch, through pytriton's proxy
backend) all live there, reached from the tests over real gRPC on a free loopback port. A child
process keeps pytriton's threads, ZMQ sockets, shared memory and atexit hooks out of the pytest
process and its event loops, and can always be killed, with everything it started, by process group.

The child is `python -m tests.support.triton SPEC.json`; it writes `ready.json` once the model
answers and stops cleanly on SIGTERM (or when its parent dies).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

from tests.support.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
_PORT_CLASH_MARKERS = ("already in use",)


def triton_env() -> dict[str, str]:
    """The environment tritonserver needs: LD_LIBRARY_PATH led by this interpreter's libpython.

    The Python-backend stub links `libpython3.X.so`; without this it may load the system one,
    which does not match a pyenv (or other non-system) interpreter, and model load fails.
    """
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = ":".join(part for part in (libdir, env.get("LD_LIBRARY_PATH", "")) if part)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@dataclasses.dataclass
class TritonServer:
    """A running Triton; `url` is HOST:PORT of its gRPC endpoint, `models` the names it serves."""

    url: str
    models: tuple[str, ...]
    input_name: str
    output_name: str
    process: subprocess.Popen
    workdir: Path
    _tmp: tempfile.TemporaryDirectory | None = dataclasses.field(default=None, repr=False)

    @property
    def log(self) -> str:
        return _read(self.workdir / "triton.log")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> int | None:
        """SIGTERM and wait; then kill whatever of its process group is left, and its shared memory.

        A clean stop leaves nothing behind. The sweep matters when Triton was killed or exited
        before unloading its models: Python-backend stubs would live on, orphaned.
        """
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    pass
            _kill_group(self.process)
            return self.process.returncode
        finally:
            for segment in Path("/dev/shm").glob(f"pytrtion{self.process.pid}-*"):  # pytriton's prefix
                segment.unlink(missing_ok=True)
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    def __enter__(self) -> "TritonServer":
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def start_triton(
    models: Mapping[str, str | Path],
    *,
    input_name: str = "INPUT__0",
    output_name: str = "OUTPUT__0",
    input_shape: Sequence[int] = (3, 32, 32),
    output_shape: Sequence[int] = (6,),
    max_batch_size: int = 16,
    grpc_port: int | None = None,
    attempts: int = 3,
) -> TritonServer:
    """Start Triton serving each TorchScript file of `models` (name -> path); returns once all answer.

    Every model has one input and one output, named and shaped alike. Shapes exclude the batch
    dimension, which Triton adds (clients see [-1, *shape]). With no `grpc_port`, a free one is
    picked, and picked again if another process took it meanwhile.
    """
    paths = {name: Path(path).resolve() for name, path in models.items()}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if not paths or missing:
        raise FileNotFoundError(f"no TorchScript file to serve: {missing or 'no models given'}")
    failure = ""
    for _ in range(attempts if grpc_port is None else 1):
        tmp = tempfile.TemporaryDirectory(prefix="shadowserve-triton-")
        workdir = Path(tmp.name)
        port = grpc_port or free_port()
        spec = {
            "models": {name: str(path) for name, path in paths.items()},
            "input_name": input_name,
            "output_name": output_name,
            "input_shape": list(input_shape),
            "output_shape": list(output_shape),
            "max_batch_size": max_batch_size,
            "grpc_port": port,
            "workdir": str(workdir),
            "parent_pid": os.getpid(),
        }
        (workdir / "spec.json").write_text(json.dumps(spec))
        with open(workdir / "triton.log", "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.support.triton", str(workdir / "spec.json")],
                cwd=REPO_ROOT,
                env=triton_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # one process group: the child, tritonserver and its stubs
            )
        server = TritonServer(f"127.0.0.1:{port}", tuple(paths), input_name, output_name, process, workdir, tmp)
        if _wait_ready(server):
            return server
        failure = server.log[-4000:]
        server.stop()
        if not any(marker in failure.lower() for marker in _PORT_CLASH_MARKERS):
            break
    raise RuntimeError(f"Triton did not start serving {sorted(paths)}; its log ends with:\n{failure}")


def _wait_ready(server: TritonServer) -> bool:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    ready_file = server.workdir / "ready.json"
    while time.monotonic() < deadline:
        if ready_file.exists():
            return True
        if server.process.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the child's process group (its own session: only what it started), then reap the child."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# -- the child process ---------------------------------------------------------------------


def _serve(spec: dict) -> int:
    import logging
    import threading

    import numpy as np
    import torch
    from pytriton.decorators import batch
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(1)
    output_name = spec["output_name"]

    def infer_with(module: torch.jit.ScriptModule):
        @batch
        def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
            (array,) = inputs.values()
            with torch.inference_mode():
                result = module(torch.from_numpy(np.array(array, dtype=np.float32)))
            return {output_name: result.numpy()}

        return infer

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=spec["grpc_port"],
        allow_http=False,
        allow_metrics=False,
        exit_on_error=True,
    )
    triton = Triton(config=config, workspace=Path(spec["workdir"]) / "pytriton")
    try:
        for name, path in spec["models"].items():
            triton.bind(
                model_name=name,
                infer_func=infer_with(torch.jit.load(path, map_location="cpu").eval()),
                inputs=[Tensor(name=spec["input_name"], dtype=np.float32, shape=tuple(spec["input_shape"]))],
                outputs=[Tensor(name=output_name, dtype=np.float32, shape=tuple(spec["output_shape"]))],
                config=ModelConfig(max_batch_size=spec["max_batch_size"]),
                strict=True,
            )
        triton.run()
        ready = Path(spec["workdir"]) / "ready.json"
        ready.with_suffix(".tmp").write_text(json.dumps({"grpc_port": spec["grpc_port"], "pid": os.getpid()}))
        ready.with_suffix(".tmp").rename(ready)
        # Serve until told to stop, the parent (pytest) is gone, or tritonserver died.
        while not stop.wait(0.5):
            if os.getppid() != spec["parent_pid"] or not triton.is_alive():
                break
        if stop.is_set() or triton.is_alive():
            return 0  # stopped, or orphaned: either way a clean stop
        _print_server_log(triton, "tritonserver died")
        return 1
    except BaseException:
        _print_server_log(triton, "Triton failed")
        raise
    finally:
        triton.stop()


def _print_server_log(triton, why: str) -> None:
    server = getattr(triton, "_triton_server", None)  # pytriton keeps tritonserver's output there
    logs = server.logs() if server is not None else "(tritonserver never started)"
    print(f"{why}; tritonserver log:\n{logs}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(_serve(json.loads(Path(sys.argv[1]).read_text())))
