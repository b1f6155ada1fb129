"""A real Prometheus server on loopback that scrapes the gateway, for checking metrics end to end."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

from tests.support.ports import free_port


@contextlib.contextmanager
def prometheus_scraping(targets: list[str], workdir: Path, interval_s: float = 0.5,
                        labels: dict[str, str] | None = None) -> Iterator[str]:
    """Run `prometheus` scraping `targets`; yields its base URL.

    `labels` are added to every scraped series, as the Prometheus Operator adds `namespace` and `pod`.
    """
    binary = shutil.which("prometheus")
    assert binary, "the prometheus binary is missing: `make system-deps` installs it"
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: {i}ms\n  evaluation_interval: {i}ms\n"
        "scrape_configs:\n  - job_name: shadowserve\n    static_configs:\n      - targets: {t}\n        labels: {l}\n".format(
            i=int(interval_s * 1000), t=json.dumps(targets), l=json.dumps(labels or {})
        )
    )
    port = free_port()
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(workdir / "prometheus.log").open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=1).read()
                break
            except OSError:
                assert process.poll() is None, f"prometheus exited: {(workdir / 'prometheus.log').read_text()[-2000:]}"
                assert time.monotonic() < deadline, "prometheus did not become ready"
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def query(url: str, promql: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}), timeout=5) as reply:
        body = json.load(reply)
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_for_value(url: str, promql: str, expected: float, timeout_s: float = 20.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        result = query(url, promql)
        if result and float(result[0]["value"][1]) == expected:
            return result
        assert time.monotonic() < deadline, f"{promql} = {result}, expected {expected}"
        time.sleep(0.3)
