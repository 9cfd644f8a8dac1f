"""Who may call what. Three rules, shared by every FastSwitch service and front door:

- **API keys** (the public API). A key file maps each key to a tenant and a role:

      # key                               tenant    role
      3f9c0d5e6b1a4c8e9f20a7d1b3c5e7f9    team-a    user
      8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a    ops       admin

  One entry a line, fields separated by whitespace; the role (`user` or `admin`) defaults
  to `user`; `#` starts a comment. Keys are at least 16 characters with no whitespace,
  tenants 1-64 of `A-Z a-z 0-9 . _ -`. Fields of the form `LIMIT=N` after the role set
  the tenant's `TenantLimits` (`max_queued=8 max_conversations=4 max_priority=5`); the
  lines of one tenant must not set one limit to two values. A caller sends its key as gRPC metadata
  `authorization: Bearer <key>` (an HTTP front door forwards its caller's header as it is).
  `ApiKeys.authenticate` turns the metadata into a `Principal`: missing or unknown keys
  raise `AuthError(UNAUTHENTICATED)`. The tenant is the caller's fairness principal, and
  `Principal.scope` prefixes the ids it names (request and conversation ids) with it, so
  that two tenants' ids never meet. Without a key file every caller is `OPEN`: ids are
  global and every action is allowed, as on a loopback-only development stack.

- **The internal token.** The executor and the KV store serve only the scheduler: with a
  token configured they refuse every call that does not carry it as `authorization:
  Bearer <token>` (`RequireToken`), health and reflection excepted. The scheduler (and
  the store, which asks the executor for its geometry) sends it with `bearer_interceptors`
  or `bearer_metadata`. `internal_token` reads it from a value or from a file that the first
  service to start creates, so that containers share it through a volume.

- **Binding.** `check_bind`: a service that listens beyond loopback without credentials
  (API keys for the scheduler, the internal token for the others) refuses to start unless
  it is told `--insecure`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import stat
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import grpc

from common.grpc_serving import HEALTH_SERVICE, handler_kind

log = logging.getLogger("fastswitch.auth")

ROLES = ("user", "admin")
TENANT = re.compile(r"[A-Za-z0-9._-]{1,64}")
MIN_KEY_CHARS = 16
SCOPE = "/"  # between a tenant and the id it scopes; never in a tenant name
AUTHORIZATION = "authorization"
# What anyone may call: load balancers probe health, grpcurl lists services.
OPEN_SERVICES = (HEALTH_SERVICE, "grpc.reflection.v1alpha.ServerReflection",
                 "grpc.reflection.v1.ServerReflection")
Metadata = Iterable[tuple[str, str | bytes]] | None


class AuthError(Exception):
    """A refused call: its status (UNAUTHENTICATED or PERMISSION_DENIED) and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    async def abort(self, context: grpc.aio.ServicerContext) -> None:
        await context.abort(self.code, self.message)


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. `tenant` is empty only for `OPEN` (no keys configured)."""

    tenant: str
    role: str = "user"

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    @property
    def open(self) -> bool:
        return not self.tenant

    def scope(self, name: str) -> str:
        """The id `name` within this tenant, as the scheduler keeps it internally."""
        return f"{self.tenant}{SCOPE}{name}" if self.tenant else name

    def unscope(self, scoped: str) -> str:
        prefix = f"{self.tenant}{SCOPE}"
        return scoped[len(prefix):] if self.tenant and scoped.startswith(prefix) else scoped

    def fairness_id(self, client_id: str) -> str:
        """The client id requests are accounted to: the tenant, which a request may name
        or leave empty; naming another is refused. Open callers name their own."""
        if self.open or client_id in ("", self.tenant):
            return self.tenant or client_id
        raise AuthError(grpc.StatusCode.PERMISSION_DENIED,
                        f"client_id {client_id!r} is not your tenant ({self.tenant!r}); "
                        "leave it empty or name your own")

    def may_act_for(self, tenant: str) -> bool:
        return self.open or self.admin or tenant == self.tenant


OPEN = Principal("", "admin")


class KeyFileError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """What one tenant may hold at once and ask for. None: unset (the scheduler's flag
    gives it); 0 for the counts: no cap. `max_priority` binds users, not admins."""

    max_queued: int | None = None  # requests admitted and not running
    max_conversations: int | None = None  # Chat conversations kept (see conversations.py)
    max_priority: int | None = None  # of a request, and of a SetPriority

    def over(self, defaults: TenantLimits) -> TenantLimits:
        """These limits, with `defaults`'s where these are unset."""
        mine = {name: getattr(self, name) for name in LIMITS}
        return replace(defaults, **{k: v for k, v in mine.items() if v is not None})


LIMITS = tuple(f.name for f in fields(TenantLimits))


def _parse_limit(field: str, where: str) -> tuple[str, int]:
    name, _, value = field.partition("=")
    if name not in LIMITS:
        raise KeyFileError(f"{where}: {field!r}: fields after the role are LIMIT=N, with "
                           f"LIMIT one of {', '.join(LIMITS)}")
    try:
        number = int(value)
    except ValueError:
        raise KeyFileError(f"{where}: {name}={value!r} is not an integer") from None
    if name != "max_priority" and number < 0:
        raise KeyFileError(f"{where}: {name} must be >= 0 (0: no cap), got {number}")
    if not -2**31 <= number < 2**31:
        raise KeyFileError(f"{where}: {name}={number} is not a 32-bit integer")
    return name, number


def bearer(metadata: Metadata) -> str | None:
    """The credential of `authorization: Bearer <credential>`, None without one."""
    for key, value in metadata or ():
        if key.lower() != AUTHORIZATION:
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, credential = text.strip().partition(" ")
        if scheme.lower() == "bearer" and credential.strip():
            return credential.strip()
        return None
    return None


def bearer_matches(metadata: Metadata, token: str) -> bool:
    """Whether `metadata` carries `authorization: Bearer <token>`, compared in constant
    time."""
    credential = bearer(metadata)
    return credential is not None and hmac.compare_digest(credential.encode(), token.encode())


def _digest(key: str) -> bytes:
    """Keys are looked up by hash, so that the lookup's timing tells nothing of a key."""
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """The key file's entries; see the module docstring for its format."""

    def __init__(self, entries: Mapping[str, Principal], source: str = "",
                 limits: Mapping[str, TenantLimits] | None = None) -> None:
        self.source = source
        self._by_digest = {_digest(k): p for k, p in entries.items()}
        self._limits = dict(limits or {})

    def limits(self, tenant: str) -> TenantLimits:
        """What the file sets for `tenant` (unset where it sets nothing)."""
        return self._limits.get(tenant, TenantLimits())

    def __len__(self) -> int:
        return len(self._by_digest)

    @property
    def tenants(self) -> set[str]:
        return {p.tenant for p in self._by_digest.values()}

    @classmethod
    def parse(cls, text: str, source: str = "<keys>") -> ApiKeys:
        entries: dict[str, Principal] = {}
        limits: dict[str, dict[str, int]] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            fields = raw.split("#", 1)[0].split()
            if not fields:
                continue
            where = f"{source}:{number}"
            if len(fields) < 2:
                raise KeyFileError(f"{where}: expected 'KEY TENANT [ROLE] [LIMIT=N ...]', got "
                                   f"{len(fields)} fields")
            key, tenant, rest = fields[0], fields[1], fields[2:]
            role = rest.pop(0) if rest and "=" not in rest[0] else "user"
            if len(key) < MIN_KEY_CHARS:
                raise KeyFileError(f"{where}: keys must be at least {MIN_KEY_CHARS} characters")
            if not TENANT.fullmatch(tenant):
                raise KeyFileError(f"{where}: tenant {tenant!r} is not 1-64 of A-Z a-z 0-9 . _ -")
            if role not in ROLES:
                raise KeyFileError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
            if key in entries:
                raise KeyFileError(f"{where}: the same key appears twice")
            entries[key] = Principal(tenant, role)
            mine = limits.setdefault(tenant, {})
            for field in rest:
                name, value = _parse_limit(field, where)
                if mine.setdefault(name, value) != value:
                    raise KeyFileError(f"{where}: {name}={value}, but another line of tenant "
                                       f"{tenant!r} sets {name}={mine[name]}")
        if not entries:
            raise KeyFileError(f"{source}: no keys (an empty key file would lock everyone out)")
        return cls(entries, source, {t: TenantLimits(**v) for t, v in limits.items() if v})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ApiKeys:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise KeyFileError(f"cannot read the API key file {path}: {e.strerror}") from e
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("%s is readable by others than its owner; chmod 600 it", path)
        return cls.parse(text, str(path))

    def authenticate(self, metadata: Metadata) -> Principal:
        key = bearer(metadata)
        if key is None:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED,
                            "an API key is required: send 'authorization: Bearer <key>'")
        principal = self._by_digest.get(_digest(key))
        if principal is None:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
        return principal


async def authenticate(keys: ApiKeys | None, context: grpc.aio.ServicerContext) -> Principal:
    """The caller of a call; aborts it with UNAUTHENTICATED when its key is not good.
    `OPEN` without keys."""
    if keys is None:
        return OPEN
    try:
        return keys.authenticate(context.invocation_metadata())
    except AuthError as e:
        await e.abort(context)
        raise AssertionError("unreachable: abort raises") from e


# ---- the internal token ----------------------------------------------------------------

def internal_token(value: str = "", file: str = "") -> str:
    """The token given, else the one in `file`, which is created (random, mode 0600) when
    it does not exist yet: whichever service starts first writes it, the others read it.
    Empty when neither is given."""
    if value or not file:
        return value.strip()
    path = Path(file)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        try:
            os.link(draft, path)  # fails if another service got there first: theirs wins
            log.info("wrote a new internal token to %s", path)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    token = path.read_text().strip()
    if not token:
        raise SystemExit(f"the internal token file {path} is empty")
    return token


def _refusal(kind: str, code: grpc.StatusCode, message: str) -> Callable[..., Any]:
    if kind in ("unary_unary", "stream_unary"):
        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(code, message)

        return refuse

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield  # an async generator, as grpc.aio wants of a streaming handler

    return refuse_stream


def is_open_method(method: str) -> bool:
    """`/package.Service/Method` of health or reflection."""
    return method.lstrip("/").split("/", 1)[0] in OPEN_SERVICES


class RequireToken(grpc.aio.ServerInterceptor):
    """Refuses with UNAUTHENTICATED every call but health and reflection that does not
    carry `authorization: Bearer <token>`."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("RequireToken needs a token")
        self._token = token

    def allows(self, metadata: Metadata) -> bool:
        return bearer_matches(metadata, self._token)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or is_open_method(method) or self.allows(
                handler_call_details.invocation_metadata):
            return handler
        log.warning("%s: refused a call without the internal token", method)
        kind = handler_kind(handler)
        return handler._replace(**{kind: _refusal(
            kind, grpc.StatusCode.UNAUTHENTICATED,
            "this service serves only the scheduler: the internal token is missing or wrong")})


def token_interceptors(token: str) -> list[grpc.aio.ServerInterceptor]:
    """What a server adds to its interceptors for `token` (none without one)."""
    return [RequireToken(token)] if token else []


def bearer_metadata(credential: str) -> tuple[tuple[str, str], ...]:
    return ((AUTHORIZATION, f"Bearer {credential}"),) if credential else ()


def _with_bearer(details: Any, credential: str) -> Any:
    metadata = [(k, v) for k, v in (details.metadata or ()) if k.lower() != AUTHORIZATION]
    return details._replace(metadata=(*metadata, *bearer_metadata(credential)))


class _AioBearer:
    def __init__(self, credential: str) -> None:
        self._credential = credential

    def _details(self, details: Any) -> Any:
        return _with_bearer(details, self._credential)


# grpc.aio files an interceptor under the first kind it is an instance of: one class each.
class _AioBearerUnaryUnary(_AioBearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioBearerUnaryStream(_AioBearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioBearerStreamUnary(_AioBearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class _AioBearerStreamStream(_AioBearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details,
                                      request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


def bearer_interceptors(credential: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors for `grpc.aio` channels that send `credential` on every call
    (none without one)."""
    if not credential:
        return []
    return [kind(credential) for kind in (_AioBearerUnaryUnary, _AioBearerUnaryStream,
                                          _AioBearerStreamUnary, _AioBearerStreamStream)]


# ---- binding --------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: whatever it resolves to, it is not known to be loopback


def check_bind(host: str, *, service: str, credentials: bool, insecure: bool,
               what: str) -> None:
    """Refuses (SystemExit) to listen beyond loopback without credentials, unless
    `insecure`. `what` names the missing credentials and how to give them."""
    if credentials or is_loopback(host):
        return
    if insecure:
        log.warning("%s listens on %s without %s (--insecure): anyone who reaches it may "
                    "call it", service, host, what)
        return
    raise SystemExit(
        f"{service}: refusing to listen on {host} without {what}: a non-loopback address "
        "would let anyone on the network call it. Configure them, listen on 127.0.0.1, or "
        "pass --insecure (FASTSWITCH_INSECURE=1) to serve openly anyway.")


BOOLEANS = {"1": True, "true": True, "yes": True, "on": True,
            "0": False, "false": False, "no": False, "off": False, "": False}


def env_flag(env: Mapping[str, str], name: str) -> bool:
    """A boolean environment variable (unset or empty: False)."""
    value = env.get(name, "").strip().lower()
    if value not in BOOLEANS:
        raise SystemExit(f"{name}={value!r} is not one of {sorted(k for k in BOOLEANS if k)}")
    return BOOLEANS[value]
