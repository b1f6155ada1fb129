"""`shadowserve demo`: real models, a real gateway on loopback, real clients, a summary table."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from server.config import Config, parse_config
from server.metrics import SHADOWED_SKIP_REASONS, VERDICTS

PAIRS = (("classifier", "faithful PyTorch port"), ("classifier_bgr", "PyTorch port with RGB/BGR swapped"))


def demo_config(legacy: dict[str, Any], faithful: Path, buggy: Path, window: int) -> Config:
    """Two pairs on the same legacy model: one candidate faithful, one with a migration bug."""
    tensors = {
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 32, 32]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 6], "class_scores": True}],
    }
    models = [
        {"name": name, **tensors, "legacy": legacy, "candidate": {"runtime": "torch", "path": str(path)},
         "shadow_percent": 100, "window": window}
        for (name, _), path in zip(PAIRS, (faithful, buggy))
    ]
    server = {"grpc_listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "admin_listen": _admin_listen()}
    return parse_config({"server": server, "models": models}, "demo defaults")


def _build(legacy: str, workdir: Path) -> tuple[dict[str, Any], Path, Path]:
    if legacy == "caffe":
        from server.demo.caffe_models import build_caffe_demo_models

        return build_caffe_demo_models(workdir)
    from server.demo.mxnet_models import build_demo_models

    models = build_demo_models(workdir)
    spec = {"runtime": "mxnet", "symbol": str(models.symbol), "params": str(models.params),
            "tensor_names": {"image": "data"}, "input_names": ["data"]}
    return spec, models.faithful_torch, models.buggy_torch


def _admin_listen() -> str:
    """Where `ctl` looks first ($SHADOWSERVE_ADMIN, else its default) when that port is free, else any free port."""
    wanted = os.environ.get("SHADOWSERVE_ADMIN", "127.0.0.1:8003")
    host, _, port = wanted.rpartition(":")
    if host in ("127.0.0.1", "localhost") and port.isdigit():
        with socket.socket() as probe:
            try:
                probe.bind((host, int(port)))
                return wanted
            except OSError:
                pass
    return "127.0.0.1:0"


class Progress:
    """Progress on stderr: a bar redrawn in place on a terminal; elsewhere (a log) one line per quarter."""

    def __init__(self, total: int, label: str, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.total, self.label, self.done = total, label, 0
        self._step = 1 if self.tty else 25
        self._shown = -1 if self.tty else 0

    def advance(self) -> None:
        self.done += 1
        percent = self.done * 100 // self.total
        shown = percent - percent % self._step
        if shown == self._shown:
            return
        self._shown = shown
        if self.tty:
            bar = "#" * (percent // 4)
            self.stream.write(f"\r{self.label:<16} [{bar:<25}] {self.done}/{self.total}")
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(f"{self.label}: {self.done}/{self.total} requests\n")
        self.stream.flush()


async def drive(url: str, model: str, requests: int, concurrency: int = 8, seed: int = 1) -> int:
    """Send `requests` inferences through tritonclient.grpc.aio; returns how many succeeded."""
    import tritonclient.grpc.aio as triton_aio
    from tritonclient.grpc import InferInput

    from server.demo.mxnet_models import synthetic_images

    images, _ = synthetic_images(requests, np.random.default_rng(seed))
    progress = Progress(requests, model)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(requests):
        queue.put_nowait(index)
    ok = 0
    async with triton_aio.InferenceServerClient(url) as client:
        async def worker() -> None:
            nonlocal ok
            while not queue.empty():
                index = queue.get_nowait()
                tensor = InferInput("image", [1, 3, 32, 32], "FP32")
                tensor.set_data_from_numpy(images[index : index + 1])
                await client.infer(model, [tensor], request_id=str(index))
                ok += 1
                progress.advance()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok


def _ms(value: float | None) -> str:
    return f"{value * 1000:.2f}" if value is not None else "-"


def _rate(value: float | None) -> str:
    return f"{value * 100:.1f}%" if value is not None else "-"


def _skipped(registry, model: str) -> float:
    """Shadowed requests not compared: skipped when saturated, timed out, failed or paused."""
    return sum(registry.get_sample_value("shadowserve_shadow_skipped_total", {"model": model, "reason": reason}) or 0
               for reason in SHADOWED_SKIP_REASONS)


def summary_table(pairs, registry) -> str:
    """One row per pair, from the admin service's `PairStatus` messages and the gateway's metrics."""
    header = ("model", "candidate", "compared", "skipped", "match", "top-1 agree", "max|d| p50", "max|d| p99",
              "legacy p50/p99 ms", "candidate p50/p99 ms")
    rows = [header]
    descriptions = dict(PAIRS)

    def value(window, field: str) -> float | None:
        return getattr(window, field) if window.HasField(field) else None

    for pair in pairs:
        w = pair.window
        rows.append((
            pair.model, descriptions.get(pair.model, ""), str(w.compared), str(int(_skipped(registry, pair.model))),
            _rate(value(w, "match_rate")), _rate(value(w, "top1_agreement")),
            f"{w.max_abs_p50:.1e}" if w.HasField("max_abs_p50") else "-",
            f"{w.max_abs_p99:.1e}" if w.HasField("max_abs_p99") else "-",
            f"{_ms(value(w, 'legacy_p50_seconds'))} / {_ms(value(w, 'legacy_p99_seconds'))}",
            f"{_ms(value(w, 'candidate_p50_seconds'))} / {_ms(value(w, 'candidate_p99_seconds'))}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _accounted(registry, model: str) -> float:
    """Shadowed requests of `model` the engine is done with: compared, or skipped for a reason."""
    compared = sum(registry.get_sample_value("shadowserve_comparisons_total", {"model": model, "verdict": verdict}) or 0
                   for verdict in VERDICTS)
    return compared + _skipped(registry, model)


async def _settle(gateway, requests: int, timeout_s: float = 60.0) -> None:
    """Wait until the shadow work of the driven requests is done (it runs after the replies, in the engine)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_accounted(gateway.registry, name) < requests for name, _ in PAIRS):
        await asyncio.sleep(0.05)


async def admin_status(gateway) -> list:
    from protos import admin_pb2, admin_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.admin_port}") as channel:
        return list((await admin_pb2_grpc.ShadowAdminStub(channel).Status(admin_pb2.StatusRequest(), timeout=10)).pairs)


async def run_demo(requests: int = 2000, legacy: str = "mxnet", serve: bool = False, workdir: str | None = None) -> int:
    """Build, serve, drive and summarise; with `serve`, keep serving until SIGINT or SIGTERM.

    SIGTERM stops it like Ctrl-C: the gateway drains and the temporary folder is deleted.
    """
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    terminated = False

    def terminate() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, terminate)
    try:
        return await _run_demo(requests, legacy, serve, workdir)
    except asyncio.CancelledError:
        if not terminated:
            raise
        return 0
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def _run_demo(requests: int, legacy: str, serve: bool, workdir: str | None) -> int:
    from server.app import Gateway

    with tempfile.TemporaryDirectory(prefix="shadowserve-demo-") as temporary:
        folder = Path(workdir or temporary)
        print(f"building the demo models ({legacy} legacy, PyTorch candidates) in {folder} ...", flush=True)
        legacy_spec, faithful, buggy = _build(legacy, folder)
        gateway = Gateway(demo_config(legacy_spec, faithful, buggy, window=max(requests, 10)))
        await gateway.start()
        url = f"127.0.0.1:{gateway.grpc_port}"
        print(f"gateway on {url}, metrics on http://127.0.0.1:{gateway.metrics_port}/metrics")
        print(f"admin on 127.0.0.1:{gateway.admin_port}; for `shadowserve ctl` in another shell:\n"
              f"  export SHADOWSERVE_ADMIN=127.0.0.1:{gateway.admin_port}", flush=True)
        try:
            for name, _ in PAIRS:
                await drive(url, name, requests)
            await _settle(gateway, requests)
            print()
            print(summary_table(await admin_status(gateway), gateway.registry))
            if serve:
                print(f"\nserving until Ctrl-C (or SIGTERM): point a Triton client at {url}", flush=True)
                await asyncio.Event().wait()
        finally:
            await gateway.stop(grace_s=1.0)
    return 0
