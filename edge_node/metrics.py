"""What an edge measures: its generations as served (`RequestMetrics`), speculative
decoding from each finished generation's statistics (`SpeculativeMetrics`), its slots,
and, for a flash-loaded SLM, the flash store's reads, hit rate and I/O wait."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from edge_node.flash.store import FlashStore
from serving.metrics import RequestMetrics, SpeculativeMetrics


class EdgeMetrics:
    def __init__(self, model: torch.nn.Module, active: Callable[[], int], slots: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = RequestMetrics(self.registry)
        self.speculative = SpeculativeMetrics(self.registry)
        Gauge(
            "edgecloud_edge_active_generations", "Generations running", registry=self.registry
        ).set_function(active)
        Gauge(
            "edgecloud_edge_generation_slots", "Generations allowed at once", registry=self.registry
        ).set_function(lambda: slots)
        store = flash_store(model)
        if store is not None:
            self.registry.register(_FlashCollector(store))


def flash_store(model: torch.nn.Module) -> FlashStore | None:
    """The store a flash-loaded model's FFNs read from; None for a model in DRAM."""
    for module in model.modules():
        store = getattr(module, "store", None)
        if isinstance(store, FlashStore):
            return store
    return None


class _FlashCollector(Collector):
    """Reads the store's running totals at scrape time."""

    def __init__(self, store: FlashStore) -> None:
        self.store = store

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        totals = self.store.totals.metrics
        counters = {
            "bytes_read": ("Bytes read from flash", totals.bytes_read),
            "reads": ("Reads issued to flash", totals.reads),
            "neurons_needed": ("FFN neuron uses asked for", totals.needed),
            "neuron_hits": ("Neuron uses served from DRAM", totals.hits),
            "io_wait_seconds": ("Time the FFN waited on flash reads", totals.io_wait_s),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"edgecloud_flash_{name}", doc, value=value)
        yield GaugeMetricFamily(
            "edgecloud_flash_hit_rate", "Neuron uses served from DRAM, since start", totals.hit_rate
        )
