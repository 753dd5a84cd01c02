"""The gateway's Prometheus metrics (GET /metrics), in a registry of the app's own so that
two gateways in one process (tests) keep separate counts.

With several worker processes (gateway/workers.py) every worker writes its values into files
of one folder (prometheus_client's multiprocess mode, chosen by PROMETHEUS_MULTIPROC_DIR in
the workers' environment) and /metrics, whichever worker answers it, adds up every worker's:
one view of the pod."""

from __future__ import annotations

import os
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# Routes are labelled by their path template; anything else is "other" (bounded labels).
ROUTES = ("/predict", "/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
          "/ready", "/metrics", "/openapi.json", "/docs")


@dataclass(frozen=True)
class RouteMetrics:
    """A route's labelled histograms, looked up once per generation rather than per response."""

    time_to_first_token: object
    inter_token_latency: object


class Metrics:
    def __init__(self):
        self.multiprocess_dir = os.environ.get(MULTIPROC_DIR_ENV)
        self.registry = CollectorRegistry()
        self.requests = Counter("mixtral_gateway_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.time_to_first_token = Histogram(
            "mixtral_gateway_time_to_first_token_seconds",
            "From a generation's start to the engine's first response", ["route"],
            buckets=_TTFT_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram(
            "mixtral_gateway_inter_token_latency_seconds",
            "Between successive streamed responses of a generation, per token: one observation "
            "per response, its gap over the tokens it brought", ["route"],
            buckets=_ITL_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("mixtral_gateway_generations_in_flight",
                               "Generations running now (bounded by --max-concurrency)",
                               registry=self.registry, multiprocess_mode="livesum")
        self.waiting = Gauge("mixtral_gateway_generations_waiting",
                             "Requests beyond --max-concurrency waiting (up to --queue-wait) for a slot",
                             registry=self.registry, multiprocess_mode="livesum")
        self.disconnects = Counter("mixtral_gateway_client_disconnects",
                                   "Generations cancelled because the client went away", ["route"],
                                   registry=self.registry)

        self._routes: dict[str, RouteMetrics] = {}

    def of_route(self, route: str) -> RouteMetrics:
        if route not in self._routes:
            self._routes[route] = RouteMetrics(self.time_to_first_token.labels(route),
                                               self.inter_token_latency.labels(route))
        return self._routes[route]

    def exposition(self) -> tuple[bytes, str]:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        pod = CollectorRegistry()
        MultiProcessCollector(pod, self.multiprocess_dir)
        return generate_latest(pod), CONTENT_TYPE_LATEST


def route_label(scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if path in ROUTES else "other"


# The status label of a request whose client went away before it was answered (nginx's
# "client closed request"): no response was sent, and none failed.
CLIENT_CLOSED = 499


class MetricsMiddleware:
    """Counts every HTTP request by route and final status (pure ASGI, so streaming and
    disconnects pass through untouched). A request the app ended without answering (its
    client went away first, so the app stopped, or was cancelled) counts as 499, not as a
    failure; one the app failed before answering counts as 500, what the server answers."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [CLIENT_CLOSED]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            if status[0] == CLIENT_CLOSED:
                status[0] = 500  # it failed before answering: the server answers 500
            raise
        finally:
            self.metrics.requests.labels(route_label(scope), str(status[0])).inc()
