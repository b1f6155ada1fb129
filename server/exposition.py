"""What /metrics shows: this process's metrics and those other processes of the gateway wrote to files.

The shadow engine (and, with `--workers`, every worker) records into a prometheus multiprocess folder.
A gateway process reads that folder beside its own registry and adds up series both have.
"""

from __future__ import annotations

import glob
import logging
import os
import socketserver
import struct
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.samples import Sample

from server.config import address_family
from server.priority import run_when_idle

log = logging.getLogger("shadowserve")


def merge(families: list[Metric]) -> list[Metric]:
    """One family per name: counters and histograms add up across processes, gauges take the largest."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple, Sample]] = {}
    for family in families:
        merged.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
        samples = values.setdefault(family.name, {})
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            old = samples.get(key)
            if old is None:
                samples[key] = sample
            elif family.type == "gauge":
                samples[key] = sample if sample.value > old.value else old
            else:
                samples[key] = old._replace(value=old.value + sample.value)
    for name, family in merged.items():
        family.samples = list(values[name].values())
    return list(merged.values())


class GatewayRegistry(CollectorRegistry):
    """`own` plus the multiprocess folder `shared_dir`, merged series by series."""

    def __init__(self, own: CollectorRegistry, shared_dir: str) -> None:
        super().__init__(auto_describe=False)
        self.own = own
        self.shared_dir = shared_dir

    def collect(self):
        yield from merge([*self.own.collect(), *self._shared_families()])

    def _shared_families(self) -> list[Metric]:
        """The folder's series, read again when a file changed under the read.

        A restarted engine creates its files empty before it sizes them, and the files of an engine
        that died are removed; neither may fail a scrape.
        """
        for attempt in range(3):
            files = [path for path in glob.glob(os.path.join(self.shared_dir, "*.db")) if _has_header(path)]
            try:
                return list(MultiProcessCollector.merge(files, accumulate=True))
            except (OSError, ValueError, RuntimeError, struct.error) as exc:
                error = exc
        log.warning("metrics of the shadow engine could not be read this time (%s); /metrics shows the rest", error)
        return []


def _has_header(path: str) -> bool:
    try:
        return os.path.getsize(path) >= 8
    except OSError:
        return False


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class _ThreadPerScrape(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


def start_metrics_server(host: str, port: int, registry: CollectorRegistry) -> WSGIServer:
    """/metrics on HOST:PORT, each scrape rendered by a thread of its own at idle CPU priority.

    Rendering takes milliseconds of CPU; on a core shared with a primary, a scrape at normal
    priority holds the core that long while requests wait.
    """
    metrics_app = make_wsgi_app(registry)

    def app(environ, start_response):
        run_when_idle()
        return metrics_app(environ, start_response)

    server_class = type("MetricsServer", (_ThreadPerScrape,), {"address_family": address_family(host)})
    server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
