"""QEMU's monitor (QMP), spoken through QEMU's own ``qemu.qmp`` library.

``qemu.qmp.QMPClient`` is asyncio-based; ``Qmp`` drives it from a private event loop so that
`vm`, `suspend` and `resume` stay plain synchronous code, with a deadline on every step (the
library's own synchronous wrapper has none on connect). Commands that QEMU refuses raise
``VmError`` with QEMU's message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError

from pager.errors import VmError
from pager.vm.procs import socket_live

log = logging.getLogger(__name__)

QMP_TIMEOUT = 30.0
MIGRATION_TIMEOUT = 300.0
MIGRATION_POLL = 0.002
CONNECT_RETRY = 0.01

T = TypeVar("T")


class Qmp:
    """One QMP session with the QEMU listening on the Unix socket ``path``.

    The socket may not exist yet (QEMU creates it while starting): connecting retries until
    ``timeout``. Each command must be answered within ``timeout`` too."""

    def __init__(self, path: Path, timeout: float = QMP_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(f"qmp:{path.parent.name}")
        try:
            self._connect()
        except BaseException:
            self._loop.close()
            raise

    def _run(self, aw: Awaitable[T], timeout: float) -> T:
        return self._loop.run_until_complete(asyncio.wait_for(aw, timeout))

    def _connect(self) -> None:
        deadline = time.monotonic() + self.timeout
        why: object = "the socket does not exist"
        while True:
            # connect only once QEMU listens: the library logs every refused attempt as an error
            if socket_live(str(self.path)):
                try:
                    self._run(self._client.connect(str(self.path)),
                              max(deadline - time.monotonic(), 0.001))
                    return
                except (ConnectError, OSError, TimeoutError) as exc:
                    why = getattr(exc, "exc", None) or str(exc) or "no greeting"
            if time.monotonic() + CONNECT_RETRY > deadline:
                raise VmError(f"cannot reach QEMU's QMP socket {self.path} within "
                              f"{self.timeout:.0f} s ({why}); is the VM running?")
            time.sleep(CONNECT_RETRY)

    def execute(self, command: str, **arguments: object) -> object:
        """Run ``command``; its return value (VmError if QEMU refuses or does not answer)."""
        try:
            return self._run(self._client.execute(command, arguments or None), self.timeout)
        except ExecuteError as exc:
            raise VmError(f"QMP {command} failed: {exc}") from exc
        except TimeoutError as exc:
            raise VmError(f"QEMU did not answer QMP {command} within {self.timeout:.0f} s") \
                from exc
        except QMPError as exc:
            raise VmError(f"QMP {command}: the connection to QEMU failed ({exc})") from exc

    def quit(self) -> None:
        """``quit``: QEMU answers and closes the socket; a close that overtakes the answer is
        the same outcome."""
        try:
            self.execute("quit")
        except VmError as exc:
            if not isinstance(exc.__cause__, ExecInterruptedError):
                raise

    def wait_migration(self, timeout: float = MIGRATION_TIMEOUT) -> dict:
        """Poll ``query-migrate`` until the migration completed; VmError if it failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.execute("query-migrate")
            st = info.get("status") if isinstance(info, dict) else None
            if st == "completed":
                return info  # type: ignore[return-value]
            if st in ("failed", "cancelled"):
                raise VmError(f"migration {st}: {info.get('error-desc', '')}")  # type: ignore
            time.sleep(MIGRATION_POLL)
        raise VmError(f"migration did not complete within {timeout:.0f} s")

    def close(self) -> None:
        """Disconnect (after `quit` the library reports QEMU's close as EOFError: expected)."""
        try:
            self._run(self._client.disconnect(), self.timeout)
        except (QMPError, OSError, EOFError, TimeoutError) as exc:
            log.debug("QMP disconnect: %s", exc)
        finally:
            self._loop.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
