"""The API key file kept current without a restart.

`ReloadingKeys.keys` is the file's keys as last read well. `watch` reads the file again on
SIGHUP and whenever its modification time, size or inode changes (checked every `poll_s`,
so an editor's atomic rename is seen too). A file that no longer parses, or cannot be read,
keeps the keys loaded before and logs an error. Calls in flight keep the principal they
were authenticated as: a reload changes who may start a call, and ends none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from common.auth import ApiKeys, KeyFileError

log = logging.getLogger("fastswitch.auth")

Stamp = tuple[int, int, int] | None


def _stamp(path: Path) -> Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class ReloadingKeys:
    """The keys of `path`; raises KeyFileError at construction if the file is bad."""

    def __init__(self, path: str | os.PathLike[str], poll_s: float = 2.0) -> None:
        if poll_s <= 0:
            raise ValueError(f"poll_s must be positive, got {poll_s}")
        self.path = Path(path)
        self.poll_s = poll_s
        self._seen = _stamp(self.path)
        self.keys = ApiKeys.load(self.path)
        self.reloads = 0  # good reloads since start
        self.failures = 0  # bad files seen (the old keys were kept)

    def reload(self) -> bool:
        """Reads the file again; False (old keys kept, error logged) if it is bad."""
        try:
            keys = ApiKeys.load(self.path)
        except KeyFileError as e:
            self.failures += 1
            log.error("API keys not reloaded, keeping the %d loaded before: %s",
                      len(self.keys), e)
            return False
        self.keys = keys
        self.reloads += 1
        log.info("API keys reloaded: %d keys of %d tenants from %s", len(keys),
                 len(keys.tenants), self.path)
        return True

    async def watch(self) -> None:
        """Reloads on SIGHUP and on a change to the file, until cancelled."""
        loop = asyncio.get_running_loop()
        hangup = asyncio.Event()
        loop.add_signal_handler(signal.SIGHUP, hangup.set)
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(hangup.wait(), self.poll_s)
                stamp = _stamp(self.path)
                if hangup.is_set() or stamp != self._seen:
                    hangup.clear()
                    self._seen = stamp
                    self.reload()
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
