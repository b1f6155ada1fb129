"""/metrics survives the shadow engine's files changing under it: an engine killed and cleaned up
mid-scrape, or a restarted one whose files exist but are still empty."""

from __future__ import annotations

import os
import subprocess
import sys

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from server.exposition import GatewayRegistry

ENGINE_WRITES_TWO = """
from prometheus_client import Counter
Counter("shadowserve_comparisons", "compared", ["verdict"]).labels(verdict="match").inc(2)
"""


def gateway_registry(shared_dir) -> GatewayRegistry:
    own = CollectorRegistry()
    Counter("shadowserve_requests", "answered", registry=own).inc(3)
    return GatewayRegistry(own, str(shared_dir))


def engine_wrote_two(shared_dir) -> None:
    subprocess.run([sys.executable, "-c", ENGINE_WRITES_TWO], check=True,
                   env=dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(shared_dir)))


def test_an_empty_file_of_a_starting_engine_neither_fails_the_scrape_nor_hides_the_other_files(tmp_path):
    engine_wrote_two(tmp_path)
    (tmp_path / "gauge_livesum_4242.db").touch()
    scrape = generate_latest(gateway_registry(tmp_path)).decode()
    assert "shadowserve_requests_total 3.0" in scrape
    assert 'shadowserve_comparisons_total{verdict="match"} 2.0' in scrape


def test_a_file_removed_mid_read_is_read_again_and_never_fails_the_scrape(tmp_path, monkeypatch):
    engine_wrote_two(tmp_path)
    registry = gateway_registry(tmp_path)
    read = MultiProcessCollector.merge
    attempts = []

    def removed_once(files, accumulate=True):
        attempts.append(1)
        if len(attempts) == 1:
            raise FileNotFoundError("gauge_livesum_4242.db")
        return read(files, accumulate)

    monkeypatch.setattr(MultiProcessCollector, "merge", staticmethod(removed_once))
    scrape = generate_latest(registry).decode()
    assert 'shadowserve_comparisons_total{verdict="match"} 2.0' in scrape
    assert len(attempts) == 2

    def always_removed(files, accumulate=True):
        raise FileNotFoundError("always")

    monkeypatch.setattr(MultiProcessCollector, "merge", staticmethod(always_removed))
    assert "shadowserve_requests_total 3.0" in generate_latest(registry).decode()
