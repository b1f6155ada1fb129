"""/metrics survives the shadow engine's files changing under it (an engine killed and cleaned up mid-scrape)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest

from server.exposition import GatewayRegistry


def test_a_file_removed_mid_read_is_read_again_and_never_fails_the_scrape(tmp_path):
    own = CollectorRegistry()
    Counter("shadowserve_requests", "answered", registry=own).inc(3)
    registry = GatewayRegistry(own, str(tmp_path))
    read = registry.shared.collect
    attempts = []

    def removed_once():
        attempts.append(1)
        if len(attempts) == 1:
            raise FileNotFoundError("gauge_livesum_4242.db")
        return read()

    registry.shared.collect = removed_once
    assert "shadowserve_requests_total 3.0" in generate_latest(registry).decode()
    assert len(attempts) == 2

    registry.shared.collect = lambda: (_ for _ in ()).throw(FileNotFoundError("always"))
    assert "shadowserve_requests_total 3.0" in generate_latest(registry).decode()
