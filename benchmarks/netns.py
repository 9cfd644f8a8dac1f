"""Another host on this machine: a network namespace joined to ours by a veth pair.

A process started with `command` runs in the namespace with its own loopback and its own
/dev/shm (a private tmpfs in a private mount namespace), so that it is reachable only at
`address`, over the veth link, and no process outside can map its shared memory: what a
KV store on another host is to the scheduler and the executor. Needs root (`ip netns`,
`mount`); names and the /30 subnet are random per instance, and `remove` (or leaving the
`with` block) deletes the namespace and the link.
"""

from __future__ import annotations

import ipaddress
import random
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

_PRIVATE_SHM = 'mount -t tmpfs tmpfs /dev/shm && exec "$0" "$@"'


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _free_subnet(rng: random.Random) -> ipaddress.IPv4Network:
    """A /30 in 10.200.0.0/13 that no interface here is in."""
    taken = subprocess.run(["ip", "-4", "-o", "addr", "show"], check=True,
                           capture_output=True, text=True).stdout
    while True:
        net = ipaddress.IPv4Network((0x0AC80000 + 4 * rng.randrange(1 << 17), 30))
        if not any(str(host) in taken for host in net):
            return net


@dataclass(frozen=True, slots=True)
class OtherHost:
    namespace: str
    local_link: str  # our end of the veth pair
    local_address: str
    address: str  # the namespace's end: where its services listen

    @classmethod
    def create(cls) -> OtherHost:
        tag = uuid.uuid4().hex[:8]
        ns, ours, theirs = f"fastswitch-{tag}", f"fsv{tag}a", f"fsv{tag}b"
        net = _free_subnet(random.Random(tag))
        local, remote = (str(h) for h in net.hosts())
        host = cls(ns, ours, local, remote)
        _ip("netns", "add", ns)
        try:
            _ip("link", "add", ours, "type", "veth", "peer", "name", theirs)
            _ip("link", "set", theirs, "netns", ns)
            _ip("addr", "add", f"{local}/30", "dev", ours)
            _ip("link", "set", ours, "up")
            _ip("-n", ns, "addr", "add", f"{remote}/30", "dev", theirs)
            _ip("-n", ns, "link", "set", theirs, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            host.remove()
            raise
        return host

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside the namespace, with a private /dev/shm."""
        return ["ip", "netns", "exec", self.namespace, "unshare", "--mount", "sh", "-c",
                _PRIVATE_SHM, *argv]

    def remove(self) -> None:
        """Deletes the namespace (and with it its end of the link) and our end; what is
        already gone is skipped. Processes still running inside keep it alive unnamed."""
        subprocess.run(["ip", "link", "del", self.local_link], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True)

    def __enter__(self) -> OtherHost:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()
