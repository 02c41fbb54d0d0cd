"""`WorkerScrapes`: one Prometheus scrape for the N worker processes of `gateway serve --workers N`.

Each worker keeps its own counters (they are process memory) and serves them on a private
loopback port. The supervisor's scrape endpoint reads every worker's page at scrape time and
serves the samples as one page, each labelled `worker="I"`: nothing is counted twice (each
series has one owner) and nothing is lost (`sum by (...)` adds the workers up). A worker that
is restarting is missing from one scrape; its counters restart from 0, which Prometheus
treats as a counter reset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import httpx
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

WORKER_LABEL = "worker"


class WorkerScrapes(Collector):
    """A collector that merges the workers' pages, labelling every sample with its worker."""

    def __init__(self, targets: Callable[[], Mapping[str, str]], *, timeout: float = 2.0) -> None:
        self._targets = targets
        self._timeout = timeout

    def collect(self) -> Iterator[Metric]:
        """Scrape every worker now and merge the families by name."""
        families: dict[str, Metric] = {}
        for worker, address in sorted(self._targets().items()):
            try:
                text = httpx.get(f"http://{address}/metrics", timeout=self._timeout).text
            except httpx.HTTPError:
                continue
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                merged.samples.extend(
                    sample._replace(labels={**sample.labels, WORKER_LABEL: worker}) for sample in family.samples
                )
        yield from families.values()
