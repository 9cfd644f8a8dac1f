"""TLS for every FastSwitch listener and client, off unless configured.

A listener gets a certificate and key (`--tls-cert`, `--tls-key`; env FASTSWITCH_TLS_CERT,
FASTSWITCH_TLS_KEY) and, for mutual TLS, the CA that client certificates must chain to
(`--tls-client-ca`, FASTSWITCH_TLS_CLIENT_CA), with which a client without one cannot even
connect. A client gets the CA bundle that the server's certificate must chain to
(`--tls-ca`, FASTSWITCH_TLS_CA), optionally its own certificate and key for mutual TLS
(`--tls-client-cert`, `--tls-client-key`; FASTSWITCH_TLS_CLIENT_CERT, _KEY), and the name
to expect in the server's certificate when the address does not carry it
(FASTSWITCH_TLS_SERVER_NAME). Without a CA a client speaks plaintext.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

ENV = {
    "cert": "FASTSWITCH_TLS_CERT", "key": "FASTSWITCH_TLS_KEY",
    "client_ca": "FASTSWITCH_TLS_CLIENT_CA", "ca": "FASTSWITCH_TLS_CA",
    "client_cert": "FASTSWITCH_TLS_CLIENT_CERT", "client_key": "FASTSWITCH_TLS_CLIENT_KEY",
    "server_name": "FASTSWITCH_TLS_SERVER_NAME",
}


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SystemExit(f"cannot read the TLS {what} {path}: {e.strerror}") from e


@dataclass(frozen=True, slots=True)
class ServerTls:
    cert: str = ""
    key: str = ""
    client_ca: str = ""  # set: mutual TLS, client certificates required

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise SystemExit("TLS needs both --tls-cert and --tls-key")
        if self.client_ca and not self.cert:
            raise SystemExit("--tls-client-ca needs --tls-cert and --tls-key")

    @property
    def enabled(self) -> bool:
        return bool(self.cert)

    @property
    def mutual(self) -> bool:
        return bool(self.client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        pair = (_read(self.key, "key"), _read(self.cert, "certificate"))
        if self.client_ca:
            return grpc.ssl_server_credentials(
                [pair], root_certificates=_read(self.client_ca, "client CA"),
                require_client_auth=True)
        return grpc.ssl_server_credentials([pair])


ADDRESS_UNAVAILABLE = errno.EADDRINUSE  # the exit status of a service that cannot listen


class AddressUnavailable(SystemExit):
    """Exits with `ADDRESS_UNAVAILABLE`, after writing `message` to stderr (an integer exit
    status prints nothing), so a launcher can tell a port taken from other failures."""

    def __init__(self, message: str) -> None:
        super().__init__(ADDRESS_UNAVAILABLE)
        self.message = message
        print(message, file=sys.stderr, flush=True)

    def __str__(self) -> str:
        return self.message


def listen(server: grpc.aio.Server, address: str, tls: ServerTls | None) -> int:
    """Adds `address` to `server`, over TLS when `tls` is enabled; returns the port. Exits
    with the address, status `ADDRESS_UNAVAILABLE`, where it cannot be bound (held by
    another process, or not this host's)."""
    try:
        if tls is not None and tls.enabled:
            return server.add_secure_port(address, tls.credentials())
        return server.add_insecure_port(address)
    except RuntimeError as error:
        raise cannot_listen(address, error) from None


def cannot_listen(address: str, error: BaseException) -> AddressUnavailable:
    """What a service that cannot bind `address` exits with (`ADDRESS_UNAVAILABLE`)."""
    return AddressUnavailable(f"cannot listen on {address}: it is in use or not an address of "
                              f"this host ({error})")


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on `host` (a name, an IPv4 or an IPv6 address, bracketed or
    not) and `port`, or an exit with `ADDRESS_UNAVAILABLE` where it cannot be bound: for the
    HTTP servers, whose own binding fails with a status a launcher cannot tell from others.
    Unlike grpc's, it sets no SO_REUSEPORT: a held port is refused, never shared."""
    bare = host.strip("[]")
    try:
        return socket.create_server((bare, port),
                                    family=socket.AF_INET6 if ":" in bare else socket.AF_INET)
    except OSError as error:
        raise cannot_listen(f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}",
                            error) from None


@dataclass(frozen=True, slots=True)
class ClientTls:
    ca: str = ""
    client_cert: str = ""
    client_key: str = ""
    server_name: str = ""  # expected in the server's certificate, when not the address's

    def __post_init__(self) -> None:
        if bool(self.client_cert) != bool(self.client_key):
            raise SystemExit("mutual TLS needs both --tls-client-cert and --tls-client-key")
        if self.client_cert and not self.ca:
            raise SystemExit("--tls-client-cert needs --tls-ca")

    @property
    def enabled(self) -> bool:
        return bool(self.ca)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "CA bundle"),
            private_key=_read(self.client_key, "client key") if self.client_key else None,
            certificate_chain=_read(self.client_cert, "client certificate")
            if self.client_cert else None)

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def aio_channel(address: str, tls: ClientTls | None = None, *,
                options: Sequence[tuple[str, Any]] = (),
                interceptors: Sequence[Any] = ()) -> grpc.aio.Channel:
    options = [*options, *(tls.options() if tls else [])]
    if tls is not None and tls.enabled:
        return grpc.aio.secure_channel(address, tls.credentials(), options=options,
                                       interceptors=list(interceptors) or None)
    return grpc.aio.insecure_channel(address, options=options,
                                     interceptors=list(interceptors) or None)


def sync_channel(address: str, tls: ClientTls | None = None, *,
                 options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    options = [*options, *(tls.options() if tls else [])]
    if tls is not None and tls.enabled:
        return grpc.secure_channel(address, tls.credentials(), options=options)
    return grpc.insecure_channel(address, options=options)


def add_server_flags(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    for flag, name, help in (
            ("--tls-cert", "cert", "certificate (PEM) this service presents; with --tls-key, "
                                   "it serves TLS only"),
            ("--tls-key", "key", "its private key (PEM)"),
            ("--tls-client-ca", "client_ca", "CA bundle (PEM) that client certificates must "
                                             "chain to: mutual TLS")):
        parser.add_argument(flag, default=env.get(ENV[name], ""),
                            help=f"{help} [env {ENV[name]}]")


def add_client_flags(parser: argparse.ArgumentParser, env: Mapping[str, str], whom: str
                     ) -> None:
    for flag, name, help in (
            ("--tls-ca", "ca", f"CA bundle (PEM) that {whom}'s certificates must chain to; "
                               "set: connect over TLS"),
            ("--tls-client-cert", "client_cert", f"certificate (PEM) presented to {whom}, for "
                                                 "mutual TLS"),
            ("--tls-client-key", "client_key", "its private key (PEM)"),
            ("--tls-server-name", "server_name", "name expected in their certificates, when "
                                                 "not the one in the address")):
        parser.add_argument(flag, default=env.get(ENV[name], ""),
                            help=f"{help} [env {ENV[name]}]")


def server_tls(args: argparse.Namespace) -> ServerTls:
    return ServerTls(args.tls_cert, args.tls_key, args.tls_client_ca)


def client_tls(args: argparse.Namespace) -> ClientTls:
    return ClientTls(args.tls_ca, args.tls_client_cert, args.tls_client_key,
                     args.tls_server_name)


def client_tls_from_env(env: Mapping[str, str] = os.environ) -> ClientTls:
    return ClientTls(env.get(ENV["ca"], ""), env.get(ENV["client_cert"], ""),
                     env.get(ENV["client_key"], ""), env.get(ENV["server_name"], ""))
