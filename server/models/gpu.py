"""GPU memory and utilisation metrics from NVIDIA's management library (NVML).

``pynvml`` (the ``nvidia-ml-py`` package, in the ``serve-gpu`` extra) is
imported lazily; without it, without a driver or without a GPU the server
simply exports no GPU metrics and says so once in the log. Readings are taken
at scrape time, so nothing polls in the background.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from types import ModuleType

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["GpuCollector", "load_nvml", "register_gpu_metrics"]

log = logging.getLogger(__name__)


def load_nvml() -> ModuleType | None:
    """The initialised ``pynvml`` module, or None (with the reason logged) if unusable."""
    try:
        nvml = importlib.import_module("pynvml")
    except ImportError:
        log.info("GPU metrics off: pynvml is not installed (pip install nvidia-ml-py)")
        return None
    try:
        nvml.nvmlInit()
        count = int(nvml.nvmlDeviceGetCount())
    except Exception as exc:  # NVMLError subclasses: no driver, no library, no permission
        log.info("GPU metrics off: NVML is not usable here (%s)", exc)
        return None
    if count == 0:
        log.info("GPU metrics off: NVML sees no GPU")
        return None
    return nvml


class GpuCollector(Collector):
    """Memory used/total (bytes) and utilisation (0-1) of every visible GPU."""

    def __init__(self, nvml: ModuleType) -> None:
        self._nvml = nvml
        self._count = int(nvml.nvmlDeviceGetCount())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        used = GaugeMetricFamily(
            "tlserve_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=["gpu"]
        )
        total = GaugeMetricFamily(
            "tlserve_gpu_memory_total_bytes", "GPU memory in total (NVML).", labels=["gpu"]
        )
        busy = GaugeMetricFamily(
            "tlserve_gpu_utilization_ratio",
            "Fraction of the last sample period the GPU was busy (NVML), 0 to 1.",
            labels=["gpu"],
        )
        for index in range(self._count):
            try:
                handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                rates = self._nvml.nvmlDeviceGetUtilizationRates(handle)
            except Exception as exc:  # a GPU can fall off the bus; never fail a scrape
                log.warning("NVML read of GPU %d failed: %s", index, exc)
                continue
            used.add_metric([str(index)], float(memory.used))
            total.add_metric([str(index)], float(memory.total))
            busy.add_metric([str(index)], float(rates.gpu) / 100.0)
        yield from (used, total, busy)


def register_gpu_metrics(registry: CollectorRegistry, device: str) -> GpuCollector | None:
    """Add GPU metrics to ``registry`` when a GPU may be in use and NVML works."""
    if device == "cpu":
        return None
    nvml = load_nvml()
    if nvml is None:
        return None
    collector = GpuCollector(nvml)
    registry.register(collector)
    log.info("GPU metrics on: %d GPU(s) through NVML", collector._count)
    return collector
