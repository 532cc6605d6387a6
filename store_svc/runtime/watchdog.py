"""The last guard of a shutdown: a process that has not ended in time says where it is
stuck and exits.

Every step of a shutdown is bounded by the grace period, but a step that awaits a
library can still wait for ever (one that swallows the cancellation meant to end it,
a socket write to a peer that reads nothing). An orchestrator would then kill the
process without a word. :class:`StopWatchdog` runs in a thread of its own, so it
fires even when the event loop is blocked: it logs the stack of every thread and
every asyncio task, then ends the process with :data:`EXIT_HUNG`. Should even that
report not get through (a log write blocked on a full stderr), SIGALRM ends the
process :data:`BACKSTOP_S` later.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TextIO

from store_svc.constants import EXIT_HUNG
from store_svc.tasks import where

__all__ = ["StopWatchdog", "task_dump"]

log = logging.getLogger(__name__)

#: Seconds after the watchdog's own deadline at which the kernel ends the process
#: (SIGALRM, its default action) should the watchdog's report not get there: it
#: writes to the log like everyone else, and a stderr nobody reads blocks it.
BACKSTOP_S = 10.0


def task_dump(loop: asyncio.AbstractEventLoop) -> list[str]:
    """One line per unfinished task of ``loop``: its name and where it waits.

    Safe enough from another thread for a process about to exit: the set of tasks is
    read again if the loop changes it meanwhile.
    """
    for _ in range(5):
        try:
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            break
        except RuntimeError:  # the set changed size while it was read
            continue
    else:
        return ["(the tasks could not be read)"]
    return sorted(f"{t.get_name()}: {where(t)}" for t in tasks)


class StopWatchdog:
    """Ends the process if it is still running ``seconds`` after :meth:`arm`.

    Args:
        loop: the event loop whose tasks are listed when it fires.
        seconds: how long the shutdown may take in all.
        exit_process: called with the exit code (``os._exit`` by default: a hung
            process cannot be trusted to unwind).
        stream: where the thread stacks go (stderr, like the log).
        backstop_s: seconds after ``seconds`` at which SIGALRM ends the process if the
            report has not (``None``: no backstop). Arm from the main thread: it sets
            the process's SIGALRM to its default action.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        seconds: float,
        exit_process: Callable[[int], object] = os._exit,
        stream: TextIO | None = None,
        backstop_s: float | None = BACKSTOP_S,
    ) -> None:
        self._loop = loop
        self._seconds = seconds
        self._exit = exit_process
        self._stream = stream
        self._backstop = backstop_s
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def arm(self) -> None:
        """Start counting (idempotent: the first call counts)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="stop-watchdog", daemon=True)
            self._thread.start()
            if self._backstop is not None:
                # No I/O, no lock, not even the interpreter: the kernel's default
                # action for SIGALRM ends the process whatever holds it up.
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
                signal.setitimer(signal.ITIMER_REAL, self._seconds + self._backstop)

    def disarm(self) -> None:
        """The shutdown ended: the watchdog never fires."""
        self._done.set()
        if self._backstop is not None and self._thread is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _watch(self) -> None:
        if self._done.wait(self._seconds):
            return
        stream = self._stream or sys.stderr
        lines = task_dump(self._loop)
        log.error(
            "store-svc has not stopped %.0f s after it was asked to; exiting with code %d. "
            "Its %d unfinished asyncio tasks:\n  %s",
            self._seconds,
            EXIT_HUNG,
            len(lines),
            "\n  ".join(lines),
        )
        with contextlib.suppress(OSError, ValueError, AttributeError):  # no usable stream
            print("store-svc: the stack of every thread follows", file=stream, flush=True)
            faulthandler.dump_traceback(file=stream, all_threads=True)
            stream.flush()
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(OSError, ValueError):
                handler.flush()
        self._exit(EXIT_HUNG)
