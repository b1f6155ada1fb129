"""What /metrics shows: this process's metrics and those other processes of the gateway wrote to files.

The shadow engine (and, with `--workers`, every worker) records into a prometheus multiprocess folder.
A gateway process reads that folder beside its own registry and adds up series both have.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.samples import Sample

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
        self.shared = MultiProcessCollector(None, shared_dir)

    def collect(self):
        yield from merge([*self.own.collect(), *self._shared_families()])

    def _shared_families(self) -> list[Metric]:
        """The folder's series; a file removed mid-read (an engine that died is cleaned up) means reading again."""
        for attempt in range(3):
            try:
                return list(self.shared.collect())
            except (OSError, ValueError) as exc:
                error = exc
        log.warning("metrics of the shadow engine could not be read this time (%s); /metrics shows the rest", error)
        return []
