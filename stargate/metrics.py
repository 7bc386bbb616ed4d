"""Prometheus metrics, through ``prometheus_client``.

Install the extra (``pip install 'stargate[metrics]'``), then serve them from
the application::

    config.include("stargate")
    config.include("stargate.metrics")   # GET /metrics

or register the collector with a registry of your own::

    from prometheus_client import REGISTRY
    from stargate.metrics import StargateCollector

    REGISTRY.register(StargateCollector(config.registry))

The collector reads stargate's own counters when it is scraped (the hub's
:class:`~stargate.hub.HubStats`, the backend's ``stats``, the open
WebSockets), so nothing is counted twice and a process without a scraper
pays nothing. Every figure is for the worker process that answers the
scrape: with several workers, scrape each (or sum what each pushes).
:doc:`/reference/metrics` lists the names and labels.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["StargateCollector", "includeme", "DEFAULT_PATH"]

#: Where ``config.include("stargate.metrics")`` serves the metrics.
DEFAULT_PATH = "/metrics"

#: HubStats fields that only grow: (field, metric name without _total, help).
_HUB_COUNTERS = (
    ("messages", "stargate_messages_published", "Messages published via this hub."),
    (
        "received",
        "stargate_messages_received",
        "Messages the backend handed to this process (from any process).",
    ),
    (
        "delivered",
        "stargate_deliveries",
        "Messages written or queued to a listener, one per listener.",
    ),
    (
        "pruned_dead",
        "stargate_listeners_pruned",
        "Listeners removed because their connection was dead.",
    ),
    (
        "closed_slow",
        "stargate_listeners_closed_slow",
        "Listeners closed (1013) because their send buffer overflowed.",
    ),
    (
        "dropped",
        "stargate_messages_dropped",
        "Messages a slow listener did not get (slow_listener = drop).",
    ),
    (
        "skipped",
        "stargate_deliveries_skipped",
        "Deliveries not attempted: the message cannot go on that listener's "
        "wire (binary to a hixie client).",
    ),
)

#: Backend ``stats`` keys exported when the backend has them.
_BACKEND_COUNTERS = (
    ("published", "stargate_backend_messages_published", "Messages published."),
    ("received", "stargate_backend_messages_received", "Messages received."),
    (
        "reconnects",
        "stargate_backend_reconnects",
        "Connections to the broker re-established after a loss.",
    ),
    ("gaps", "stargate_backend_gaps", "Times messages may have been missed."),
    (
        "gap_seconds",
        "stargate_backend_disconnected_seconds",
        "Seconds spent disconnected from the broker.",
    ),
    (
        "missed",
        "stargate_backend_messages_missed",
        "Messages known to be missed while disconnected.",
    ),
    (
        "undecodable",
        "stargate_backend_messages_undecodable",
        "Messages received that could not be decoded.",
    ),
    (
        "delivery_errors",
        "stargate_backend_delivery_errors",
        "Messages whose hand-over to the hub raised.",
    ),
)


class StargateCollector:
    """A ``prometheus_client`` collector of one application's stargate
    figures. ``registry`` is the Pyramid registry (its hub is looked up at
    each scrape, so a hub replaced after a fork is followed); ``None`` means
    the process's default hub."""

    def __init__(self, registry: Any = None) -> None:
        self.registry = registry

    def _hub(self) -> Any:
        from stargate.hub import default_hub

        hub = getattr(self.registry, "stargate_hub", None)
        return hub if hub is not None else default_hub()

    def collect(self) -> Iterator[Metric]:
        from stargate.factory import closed_websockets, opened_websockets
        from stargate.frames import DRAFTS

        hub = self._hub()
        stats = hub.stats
        yield GaugeMetricFamily(
            "stargate_listeners",
            "Listeners attached now, per channel they listen on.",
            value=stats.listeners,
        )
        yield GaugeMetricFamily(
            "stargate_channels",
            "Channels with at least one local listener now.",
            value=stats.channels,
        )
        for field, name, documentation in _HUB_COUNTERS:
            yield CounterMetricFamily(name, documentation, value=getattr(stats, field))
        backend_stats = getattr(hub.backend, "stats", None)
        if isinstance(backend_stats, dict):
            for key, name, documentation in _BACKEND_COUNTERS:
                if key in backend_stats:
                    yield CounterMetricFamily(
                        name, documentation, value=backend_stats[key]
                    )
        yield from _connection_metrics(DRAFTS, opened_websockets, closed_websockets)


def _connection_metrics(
    drafts: tuple[str, ...],
    opened: collections.Counter[str],
    closed: collections.Counter[tuple[str, int]],
) -> Iterator[Metric]:
    from stargate.connection import open_websockets

    websockets = open_websockets()
    by_draft = collections.Counter(ws.draft for ws in websockets)
    open_now = GaugeMetricFamily(
        "stargate_websocket_connections",
        "WebSocket connections open now.",
        labels=["draft"],
    )
    opened_total = CounterMetricFamily(
        "stargate_websocket_connections_opened",
        "WebSocket connections opened.",
        labels=["draft"],
    )
    for draft in drafts:
        open_now.add_metric([draft], by_draft[draft])
        opened_total.add_metric([draft], opened[draft])
    closed_total = CounterMetricFamily(
        "stargate_websocket_connections_closed",
        "WebSocket connections closed, by close code (1006: no close frame).",
        labels=["draft", "code"],
    )
    for (draft, code), count in sorted(closed.items()):
        closed_total.add_metric([draft, str(code)], count)
    yield open_now
    yield opened_total
    yield closed_total
    yield GaugeMetricFamily(
        "stargate_websocket_send_buffer_bytes",
        "Bytes waiting in the send buffers of open WebSockets.",
        value=sum(ws.buffered_amount for ws in websockets),
    )


def includeme(config: Any) -> None:
    """``config.include("stargate.metrics")``: serve this application's
    metrics as Prometheus text at :data:`DEFAULT_PATH`, from a registry of
    their own (so two applications in one process do not collide)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StargateCollector(config.registry))
    config.registry.stargate_metrics = registry

    def metrics_view(request: Any) -> Any:
        response = request.response
        response.body = generate_latest(registry)
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    config.add_route("stargate.metrics", DEFAULT_PATH)
    config.add_view(metrics_view, route_name="stargate.metrics", request_method="GET")
