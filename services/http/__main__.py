"""`python -m services.http`: serves the OpenAI-compatible API over a scheduler's gRPC API.

Every flag has an environment variable; the bind host defaults to 127.0.0.1 (the API has no
TLS of its own: expose it through a proxy, or bind 0.0.0.0 in a container). It reaches a
scheduler that serves TLS with --tls-ca (common/tls.py).
"""

from __future__ import annotations

import argparse
import logging
import os

import uvicorn

from common.metrics import add_metrics_token_flags, metrics_token, serve_metrics
from common.tls import add_client_flags, client_tls, listening_socket
from services.http.app import Frontend, Settings
from services.http.protocol import Defaults

log = logging.getLogger("fastswitch.http")

FLAGS = [  # (flag, env var, default, help)
    ("port", "FASTSWITCH_HTTP_PORT", "8000", "port of the HTTP API"),
    ("host", "FASTSWITCH_HTTP_HOST", "127.0.0.1", "address to bind"),
    ("scheduler", "FASTSWITCH_SCHEDULER_ADDR", "127.0.0.1:50051", "the scheduler's gRPC address"),
    ("served-model-name", "FASTSWITCH_SERVED_MODEL_NAME", "",
     "the model name clients use (empty: the one the scheduler reports)"),
    ("client-id", "FASTSWITCH_HTTP_CLIENT_ID", "http",
     "the fairness principal of a request without `user`; empty where the scheduler has API "
     "keys (the key's tenant is the principal)"),
    ("default-max-tokens", "FASTSWITCH_HTTP_DEFAULT_MAX_TOKENS", "256",
     "max_tokens of a request that sets neither max_tokens nor max_completion_tokens"),
    ("shutdown-grace", "FASTSWITCH_HTTP_SHUTDOWN_GRACE_S", "5",
     "seconds that requests in flight get on SIGTERM before they are cancelled"),
    ("metrics-port", "FASTSWITCH_HTTP_METRICS_PORT", "0",
     "another port serving /metrics, besides the API's own (0: none)"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.http", description=__doc__)
    for name, env, default, text in FLAGS:
        parser.add_argument(f"--{name}", default=os.environ.get(env, default),
                            help=f"{text} [env {env}, default {default!r}]")
    add_metrics_token_flags(parser, os.environ)
    add_client_flags(parser, os.environ, "the scheduler")
    args = parser.parse_args(argv)
    for name in ("port", "metrics_port", "default_max_tokens"):
        value = getattr(args, name)
        if not value.isdigit():
            parser.error(f"--{name.replace('_', '-')} must be a non-negative integer, "
                         f"got {value!r}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=os.environ.get("FASTSWITCH_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    token = metrics_token(args.metrics_token, args.metrics_token_file)
    frontend = Frontend(Settings(
        scheduler=args.scheduler, served_model_name=args.served_model_name,
        defaults=Defaults(client_id=args.client_id,
                          max_tokens=int(args.default_max_tokens)),
        metrics_token=token, tls=client_tls(args),
    ))
    serve_metrics(int(args.metrics_port), args.host, frontend.metrics.registry, token)
    log.info("OpenAI-compatible API on http://%s:%s/v1 over the scheduler at %s",
             args.host, args.port, args.scheduler)
    # Bound here: uvicorn's own bind exits 1 where the port is taken, which a launcher cannot
    # tell from other failures (`listening_socket` exits with ADDRESS_UNAVAILABLE).
    listening = listening_socket(args.host, int(args.port))
    uvicorn.Server(uvicorn.Config(
        frontend.app(), host=args.host, port=int(args.port), log_level="warning",
        timeout_graceful_shutdown=float(args.shutdown_grace),
    )).run(sockets=[listening])


if __name__ == "__main__":
    main()
