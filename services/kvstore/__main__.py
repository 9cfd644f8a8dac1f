"""`python -m services.kvstore`: serve until SIGTERM/SIGINT, then unlink the arena.

Prints one line, `kvstore ready port=<port> instance=<id> arena=<segment>`, once serving.
"""

from __future__ import annotations

import logging
import sys

import uvloop

from common.auth import check_bind
from common.grpc_serving import wait_for_stop_signal
from common.metrics import serve_metrics
from services.kvstore.assemble import open_store
from services.kvstore.config import StoreConfig, parse_config
from services.kvstore.service import StoreServer

log = logging.getLogger("fastswitch.kvstore")


async def serve(config: StoreConfig) -> None:
    token = config.token()
    check_bind(config.host, service="kvstore", credentials=bool(token) or config.tls.mutual,
               insecure=config.insecure,
               what="an internal token (FASTSWITCH_INTERNAL_TOKEN or "
                    "FASTSWITCH_INTERNAL_TOKEN_FILE) or mutual TLS")
    store = open_store(config)
    server = StoreServer(store, token=token, tls=config.tls)
    try:
        port = await server.start(f"{config.host}:{config.port}")
    except BaseException:
        store.close()
        raise
    serve_metrics(config.metrics_port, config.host, server.metrics.registry,
                  config.metrics_token)
    print(
        f"kvstore ready port={port} instance={config.instance_id} arena={store.arena.name}",
        flush=True,
    )
    await wait_for_stop_signal()
    log.info("stopping")
    await server.stop()


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    uvloop.run(serve(parse_config()))


if __name__ == "__main__":
    main()
