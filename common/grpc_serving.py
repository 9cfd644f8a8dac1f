"""What every FastSwitch gRPC server carries: grpc.health.v1, reflection (so `grpcurl`
works), SERVING once ready, and a stop on SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def add_health_and_reflection(
    server: grpc.aio.Server, service_name: str
) -> health_aio.HealthServicer:
    """Registers health (NOT_SERVING until `mark_serving`) and reflection for the service."""
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (service_name, HEALTH_SERVICE, reflection.SERVICE_NAME), server
    )
    return health


async def mark_serving(health: health_aio.HealthServicer, service_name: str) -> None:
    for name in ("", service_name):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)


async def wait_for_stop_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
