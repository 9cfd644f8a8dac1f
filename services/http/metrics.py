"""The HTTP front door's Prometheus metrics, named `fastswitch_http_*`."""

from __future__ import annotations

from collections.abc import Collection

from prometheus_client import CollectorRegistry, Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.metrics import NAMESPACE

SUBSYSTEM = "http"
CLIENT_CLOSED = "499"  # the client went away before an answer started (nginx's number)


class HttpMetrics:
    """Counts HTTP requests by route and status; `middleware` does the counting."""

    def __init__(self, routes: Collection[str]) -> None:
        self.registry = CollectorRegistry()
        self.routes = frozenset(routes)
        self.requests = Counter(
            "requests", "HTTP requests by route and status (499: the client closed first)",
            ("route", "status"), namespace=NAMESPACE, subsystem=SUBSYSTEM,
            registry=self.registry,
        )

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """`app`, counting each HTTP request once, by the status it answered with; a path
        that is no route counts as route "other"."""

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

            route = scope["path"] if scope["path"] in self.routes else "other"
            try:
                await app(scope, receive, watched)
            finally:
                self.requests.labels(route, status).inc()

        return counted
