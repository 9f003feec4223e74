"""Prometheus metrics of a service process, served over HTTP with `--metrics-port` (off by default).

- `smartdiff_calls_total{service, method, code}`: gRPC calls ended, by status code (refused ones included);
- `smartdiff_call_seconds{service, method}`: how long each call took, from its start to its status;
- `smartdiff_calls_in_flight{service}`: calls being handled now: those admitted (at most `--max-queue` + 4)
  and refused ones whose upload is still read before their status goes out;
- `smartdiff_jobs{stage}`: model jobs admitted by a stage's worker, running or waiting (bounded by --max-queue);
- `smartdiff_generation_stage_seconds{stage}`: at the gateway, each stage's share of a finished generation
  (text_encoder, denoiser, vae; `total` for the whole);
- `smartdiff_device_memory_bytes{device, kind}`: the torch allocator's allocated / reserved bytes per GPU;
- and the process collectors of `prometheus_client` (CPU, resident memory, open files, Python GC).

Health and reflection calls are not counted. Every stage of a process (`serve all`) shares its one endpoint;
the metrics carry the service or stage as a label.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

# Seconds, from a health-sized call to a 14B 720p video on one GPU (tens of minutes).
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 2400)

CALLS = Counter("smartdiff_calls", "gRPC calls ended, by status code", ["service", "method", "code"])
CALL_SECONDS = Histogram("smartdiff_call_seconds", "gRPC call duration, start to status", ["service", "method"],
                         buckets=_SECONDS)
IN_FLIGHT = Gauge("smartdiff_calls_in_flight", "gRPC calls running", ["service"])
JOBS = Gauge("smartdiff_jobs", "model jobs admitted by a stage's worker: running or waiting", ["stage"])
STAGE_SECONDS = Histogram("smartdiff_generation_stage_seconds",
                          "a finished generation's time in each stage (total: the whole generation)", ["stage"],
                          buckets=_SECONDS)


class _DeviceMemory:
    """The CUDA allocator's bytes per device, read at each scrape; nothing before the process used CUDA."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("smartdiff_device_memory_bytes", "torch CUDA allocator bytes per device",
                                   labels=["device", "kind"])
        torch = sys.modules.get("torch")  # never imported (nor CUDA initialised) for a scrape
        if torch is not None and torch.cuda.is_initialized():
            for i in range(torch.cuda.device_count()):
                family.add_metric([f"cuda:{i}", "allocated"], torch.cuda.memory_allocated(i))
                family.add_metric([f"cuda:{i}", "reserved"], torch.cuda.memory_reserved(i))
        yield family


REGISTRY.register(_DeviceMemory())


def serve_metrics(port: int | None, host: str = "") -> int | None:
    """Serve /metrics on `port` (0: a free one) in a daemon thread; returns the bound port, None when port is None.
    `host`: the gRPC --host's address ("[::]" and "" listen on every interface)."""
    if port is None:
        return None
    addr = host.strip("[]") or "::"
    if addr == "::":
        addr = "0.0.0.0" if not _has_ipv6() else "::"
    server, _ = start_http_server(port, addr=addr)
    bound = server.server_address[1]
    log.info("metrics on http://%s:%d/metrics", host or addr, bound)
    return bound


def _has_ipv6() -> bool:
    import socket

    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::", 0))
        return True
    except OSError:
        return False
