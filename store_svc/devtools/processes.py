"""The servers the tests and benchmarks start (nats-server, a NATS cluster,
redis-server, PostgreSQL): used in a ``with`` block, and frozen (SIGSTOP) and thawed
as a stalled peer would behave.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["StartStop", "freeze", "thaw"]


class StartStop:
    """``with server:`` starts it (``start()`` returns it) and ``close()``s it at the
    end: stops it, and removes what it alone used where a server overrides ``close``."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def freeze(pid: int, timeout: float = 5.0) -> None:
    """SIGSTOP ``pid`` and wait until the kernel shows it stopped.

    The signal is asynchronous: without the wait, something sent right after could
    still be answered.

    Raises:
        TimeoutError: the process did not stop within ``timeout`` seconds.
    """
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} did not stop")
        time.sleep(0.001)


def thaw(pid: int) -> None:
    """SIGCONT ``pid`` (after :func:`freeze`; harmless on a running process)."""
    os.kill(pid, signal.SIGCONT)
