"""The answer to a scrape: merged samples in the Prometheus text format or OpenMetrics.

Owns `render(samples, accept)`. The formats are written by `prometheus_client` (its
exposition functions over a one-shot collector), the reference implementation of both,
rather than by hand: OpenMetrics' `_total`/`_created`/`# EOF` rules and the escaping are
its job. OpenMetrics is chosen when the `Accept` header asks for
`application/openmetrics-text`, as Prometheus does when it may.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client import exposition as text_format
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.openmetrics import exposition as openmetrics

from edgeplane.observability.families import DURATION_BUCKETS, FAMILIES

Samples = dict[str, dict[tuple[str, ...], Any]]
_LE = [repr(b) for b in DURATION_BUCKETS] + ["+Inf"]
_TEXT = b"text/plain; version=0.0.4; charset=utf-8"


class _OneShot:
    def __init__(self, samples: Samples) -> None:
        self.samples = samples

    def collect(self) -> Iterator[Metric]:
        for name, family in FAMILIES.items():
            values = self.samples.get(name) or {}
            if not values:
                continue
            labels = list(family.labels)
            metric: Any
            if family.type == "counter":
                metric = CounterMetricFamily(name, family.help, labels=labels)
                for key, value in sorted(values.items()):
                    metric.add_metric(list(key), value)
            elif family.type == "histogram":
                metric = HistogramMetricFamily(name, family.help, labels=labels)
                for key, value in sorted(values.items()):
                    running, buckets = 0, []
                    for le, count in zip(_LE, value[:-1], strict=True):
                        running += count
                        buckets.append((le, running))
                    metric.add_metric(list(key), buckets, value[-1])
            else:  # gauge, and info as a gauge of 1 (`edgeplane_build_info`, as is customary)
                metric = GaugeMetricFamily(name, family.help, labels=labels)
                for key, value in sorted(values.items()):
                    metric.add_metric(list(key), value)
            yield metric


def render(samples: Samples, accept: str = "") -> tuple[bytes, bytes]:
    """(body, content type) for a scrape that sent `accept`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_OneShot(samples))
    if "application/openmetrics-text" in accept:
        return openmetrics.generate_latest(registry), openmetrics.CONTENT_TYPE_LATEST.encode()
    # The classic 0.0.4 text format: what every Prometheus (2.x included) reads; our names
    # are all plain [a-z_], so the newer format's escaping changes nothing.
    return text_format.generate_latest(registry), _TEXT
