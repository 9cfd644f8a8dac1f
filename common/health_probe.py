"""`python -m common.health_probe HOST:PORT [SERVICE]`: exit 0 iff grpc.health.v1 says SERVING;
with `--http`, iff GET http://HOST:PORT/health answers 200 (the HTTP front door).

Container health checks run it, so that the images need no grpc_health_probe binary. Any
other answer, or no answer within the timeout, exits 1 with the reason on stderr. A service
serving TLS is probed with `--tls-ca` (and, for mutual TLS, `--tls-client-cert/-key`).
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.tls import ClientTls, add_client_flags, client_tls, sync_channel

SERVING = health_pb2.HealthCheckResponse.SERVING


def check(address: str, service: str = "", timeout_s: float = 3.0,
          tls: ClientTls | None = None) -> str | None:
    """None when `service` (default: the whole server) is SERVING; otherwise why not."""
    with sync_channel(address, tls) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"
    if reply.status != SERVING:
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return None


def check_http(address: str, timeout_s: float = 3.0) -> str | None:
    """None when GET http://address/health answers 200; otherwise why not."""
    try:
        with urllib.request.urlopen(f"http://{address}/health", timeout=timeout_s) as reply:
            return None if reply.status == 200 else f"HTTP {reply.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except OSError as e:  # refused, timed out, reset
        return str(e)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.health_probe", description=__doc__)
    parser.add_argument("address", help="HOST:PORT of a FastSwitch service")
    parser.add_argument("service", nargs="?", default="", help="service name (default: server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for an answer")
    parser.add_argument("--http", action="store_true", help="probe HTTP /health, not gRPC")
    add_client_flags(parser, os.environ, "the service")
    args = parser.parse_args(argv)
    problem = (check_http(args.address, args.timeout) if args.http
               else check(args.address, args.service, args.timeout, client_tls(args)))
    if problem is not None:
        print(f"{args.address}: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
