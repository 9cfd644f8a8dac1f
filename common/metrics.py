"""What the services' Prometheus metrics share: the HTTP endpoint, RPC errors by status code,
and values read from a service's own state when Prometheus scrapes.

Each service defines its metrics in its own `metrics` module; every name starts with
`fastswitch_<service>_`. Counters that a service already keeps (a store's hit tokens, the
planner's preemptions) are exported as they are at scrape time rather than mirrored.

With a metrics token (`--metrics-token` or `--metrics-token-file`; env
FASTSWITCH_METRICS_TOKEN, FASTSWITCH_METRICS_TOKEN_FILE), the same for every service, a
scrape must send `Authorization: Bearer <token>` (Prometheus: `authorization:
credentials_file`); one without it gets 401. Without one, /metrics is open, as before.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any, Generic, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, make_wsgi_app
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from common.auth import AUTHORIZATION, bearer_matches
from common.grpc_serving import before_each_call, handler_kind
from common.tls import cannot_listen

log = logging.getLogger("fastswitch.metrics")
T = TypeVar("T")

NAMESPACE = "fastswitch"
# 1 ms to 1 min: a CPU test step is milliseconds, a long TTFT under load is tens of seconds.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)
# 4 KiB to 4 GiB by fours: one block of a tiny model up to a long request of a 32B model.
BYTES_BUCKETS = tuple(float(4096 * 4**i) for i in range(11))


TOKEN_ENV = "FASTSWITCH_METRICS_TOKEN"
TOKEN_FILE_ENV = "FASTSWITCH_METRICS_TOKEN_FILE"
UNAUTHORIZED_BODY = b"/metrics needs 'Authorization: Bearer <metrics token>'\n"
WWW_AUTHENTICATE = ("WWW-Authenticate", 'Bearer realm="metrics"')


def add_metrics_token_flags(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    parser.add_argument("--metrics-token", default=env.get(TOKEN_ENV, ""),
                        help="bearer token that /metrics scrapes must send (empty: open) "
                             f"[env {TOKEN_ENV}]")
    parser.add_argument("--metrics-token-file", default=env.get(TOKEN_FILE_ENV, ""),
                        help=f"file holding the metrics token [env {TOKEN_FILE_ENV}]")


def metrics_token(value: str = "", file: str = "") -> str:
    """The token given, else the one in `file` (which must exist); empty: none."""
    if value or not file:
        return value.strip()
    try:
        token = Path(file).read_text().strip()
    except OSError as e:
        raise SystemExit(f"cannot read the metrics token file {file}: {e.strerror}") from e
    if not token:
        raise SystemExit(f"the metrics token file {file} is empty")
    return token


def authorized(authorization: str | None, token: str) -> bool:
    """Whether a scrape with this `Authorization` header may read the metrics."""
    if not token:
        return True
    return bool(authorization) and bearer_matches([(AUTHORIZATION, authorization)], token)


def metrics_app(registry: CollectorRegistry, token: str = "") -> Callable[..., Any]:
    """The WSGI app of `registry`'s exposition; 401 without `token` when one is set."""
    app = make_wsgi_app(registry)

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if authorized(environ.get("HTTP_AUTHORIZATION"), token):
            return app(environ, start_response)
        start_response("401 Unauthorized", [WWW_AUTHENTICATE, ("Content-Type", "text/plain")])
        return [UNAUTHORIZED_BODY]

    return guarded


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_metrics(port: int, address: str, registry: CollectorRegistry, token: str = ""
                  ) -> int | None:
    """Serves `registry` at http://address:port/metrics on a daemon thread, to scrapes that
    send `token` when it is set; returns the bound port, or None when `port` is 0 (off).
    Exits with `ADDRESS_UNAVAILABLE` where the port cannot be bound."""
    if port == 0:
        return None
    try:
        server = make_server(address.strip("[]"), port, metrics_app(registry, token),
                             _Server6 if ":" in address else _Server, handler_class=_Quiet)
    except OSError as error:
        raise cannot_listen(f"{address}:{port}", error) from None
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    bound = int(server.server_port)
    log.info("metrics on %s:%d/metrics%s", address, bound, " (token required)" if token else "")
    return bound


class RpcErrors(grpc.aio.ServerInterceptor):
    """Counts the calls of a server that end with a status other than OK, by method and code.

    The handler is left as it is; a done-callback on its context reads the final code, so
    aborts, unhandled exceptions and deadline expiries are all seen the same way.
    """

    def __init__(self, service: str, registry: CollectorRegistry) -> None:
        self.counter = Counter(
            "rpc_errors", "Calls that ended with a gRPC status other than OK",
            ("method", "code"), namespace=NAMESPACE, subsystem=service, registry=registry,
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        kind = handler_kind(handler)
        watched = before_each_call(getattr(handler, kind), partial(self._watch, method))
        return handler._replace(**{kind: watched})

    async def _watch(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        context.add_done_callback(partial(self._done, method))

    def _done(self, method: str, context: grpc.aio.ServicerContext) -> None:
        code = context.code()
        if code is not None and code is not grpc.StatusCode.OK:
            self.counter.labels(method, code.name).inc()


class ScrapeTimeCollector(Collector, Generic[T]):
    """Metric families computed from a snapshot of a service's state, taken at each scrape.

    The scrape runs on the HTTP server's thread; `read` runs on the service's event loop,
    where the state lives, so the two never touch it at once.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        read: Callable[[], Coroutine[Any, Any, T]],
        families: Callable[[T], Iterable[Metric]],
        timeout_s: float = 2.0,
    ) -> None:
        self._loop = loop
        self._read = read
        self._families = families
        self._timeout_s = timeout_s

    def describe(self) -> list[Metric]:
        return []  # registering must not read the service (it may not serve yet)

    def collect(self) -> Iterator[Metric]:
        future = asyncio.run_coroutine_threadsafe(self._read(), self._loop)
        try:
            snapshot = future.result(self._timeout_s)
        except Exception as e:  # a stopping loop or a stuck read: scrape what else there is
            future.cancel()
            log.warning("metrics snapshot failed: %r", e)
            return
        yield from self._families(snapshot)
