"""The HTTP front door's Prometheus metrics, named `fastswitch_http_*`: requests by route
and status, those in flight, and the latency each one saw (end to end, and to its first
token), much as vLLM's OpenAI server exports them. It serves them on its own port at
`/metrics` (and on `--metrics-port`, when set), to scrapes with the metrics token when
one is configured (`common.metrics.authorized`)."""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.metrics import (
    NAMESPACE,
    SECONDS_BUCKETS,
    UNAUTHORIZED_BODY,
    WWW_AUTHENTICATE,
    authorized,
)

SUBSYSTEM = "http"
CLIENT_CLOSED = "499"  # the client went away before an answer started (nginx's number)
ARRIVAL = "fastswitch.arrival"  # the scope key of a request's arrival (time.monotonic)


class HttpMetrics:
    """Counts HTTP requests by route and status and times those of the API (`/v1/...`);
    `middleware` does the counting and timing, `first_token` records a TTFT."""

    def __init__(self, routes: Collection[str], token: str = "") -> None:
        self.registry = CollectorRegistry()
        self.routes = frozenset(routes)
        self.token = token

        def labelled(kind: type, name: str, doc: str, labels: tuple[str, ...], **kw: object
                     ) -> Any:
            return kind(name, doc, labels, namespace=NAMESPACE, subsystem=SUBSYSTEM,
                        registry=self.registry, **kw)

        self.requests = labelled(
            Counter, "requests", "HTTP requests by route and status (499: the client closed "
            "first)", ("route", "status"))
        self.in_flight = labelled(Gauge, "requests_in_flight",
                                  "API requests being answered", ("route",))
        self.seconds = labelled(Histogram, "request_seconds",
                                "API request arrival to the end of its answer", ("route",),
                                buckets=SECONDS_BUCKETS)
        self.ttft = labelled(Histogram, "ttft_seconds",
                             "API request arrival to its first token from the scheduler",
                             ("route",), buckets=SECONDS_BUCKETS)

    def _route(self, scope: Scope) -> str:
        return scope["path"] if scope["path"] in self.routes else "other"

    def first_token(self, scope: Scope) -> None:
        """Records the TTFT of the request of `scope` (its first token is in)."""
        if ARRIVAL in scope:
            self.ttft.labels(self._route(scope)).observe(time.monotonic() - scope[ARRIVAL])

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """`app`, counting each HTTP request once, by the status it answered with, and
        timing the API's; a path that is no route counts as route "other"."""

        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            status = CLIENT_CLOSED

            async def watched(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = str(message["status"])
                await send(message)

            route = self._route(scope)
            api = route.startswith("/v1/")
            scope[ARRIVAL] = time.monotonic()
            if api:
                self.in_flight.labels(route).inc()
            try:
                await app(scope, receive, watched)
            finally:
                self.requests.labels(route, status).inc()
                if api:
                    self.in_flight.labels(route).dec()
                    self.seconds.labels(route).observe(time.monotonic() - scope[ARRIVAL])

        return counted

    async def endpoint(self, request: Request) -> Response:
        """`GET /metrics`: the exposition, or 401 without the metrics token."""
        if not authorized(request.headers.get("authorization"), self.token):
            return PlainTextResponse(UNAUTHORIZED_BODY, status_code=401,
                                     headers=dict([WWW_AUTHENTICATE]))
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
