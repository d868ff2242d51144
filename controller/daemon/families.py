"""Metric families for the daemon's /metrics, built from the counter tables it keeps
(metrics.py, engine_metrics.py): one place for "a table of counts becomes one family".

A table is keyed by one label value or by a tuple of them, in the order of `labels`;
its rows are exported sorted, so a scrape's text is stable.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


def counters(name: str, documentation: str, labels: Sequence[str], table: Mapping[Any, float]) -> CounterMetricFamily:
    return _fill(CounterMetricFamily(name, documentation, labels=list(labels)), table)


def gauges(name: str, documentation: str, labels: Sequence[str], table: Mapping[Any, float]) -> GaugeMetricFamily:
    return _fill(GaugeMetricFamily(name, documentation, labels=list(labels)), table)


def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    """One unlabelled counter."""
    family = CounterMetricFamily(name, documentation)
    family.add_metric([], value)
    return family


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    """One unlabelled gauge."""
    family = GaugeMetricFamily(name, documentation)
    family.add_metric([], value)
    return family


def _fill(family: Any, table: Mapping[Any, float]) -> Any:
    for key, value in sorted(table.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], value)
    return family
