"""Small asyncio helpers shared by the service's parts."""

from __future__ import annotations

import asyncio
import time

from store_svc.constants import TURN_SLICE_S

__all__ = ["Turns", "cancel_and_wait"]


async def cancel_and_wait(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` and wait until it has ended (a task is never left behind).

    Args:
        task: the task, or None (nothing to do). Its outcome is not re-raised.
    """
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class Turns:
    """Gives the event loop a turn once a task has run for a time slice.

    nats-py hands a subscription's messages to its callback in a loop that does not
    suspend while messages are waiting, and its read loop does not suspend while the
    socket buffer holds data; a callback that finds room in the queue does not
    suspend either. Under a write flood each of them would hold the loop for tens of
    milliseconds, and health, feedback and the other connection would wait that long
    for every step. Each calls :meth:`take` between units of work.

    Args:
        slice_s: seconds of work between two turns (``TURN_SLICE_S`` by default).
    """

    def __init__(self, slice_s: float = TURN_SLICE_S) -> None:
        self._slice = slice_s
        self._since = time.perf_counter()

    async def take(self) -> None:
        """Yield to the loop if this task has had its slice since the last turn."""
        if time.perf_counter() - self._since >= self._slice:
            await asyncio.sleep(0)
            self._since = time.perf_counter()
