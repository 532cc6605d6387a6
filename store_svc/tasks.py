"""Small asyncio helpers shared by the service's parts: owned task sets, cancel-and-wait,
and the time slices that keep the event loop responsive."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from store_svc.constants import TURN_SLICE_S

__all__ = ["TaskSet", "Turns", "cancel_and_wait"]

log = logging.getLogger(__name__)


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

    def due(self) -> bool:
        """Whether this task has had its slice since the last turn (no suspension)."""
        return time.perf_counter() - self._since >= self._slice

    async def take(self) -> None:
        """Yield to the loop if this task has had its slice since the last turn."""
        if time.perf_counter() - self._since >= self._slice:
            await asyncio.sleep(0)
            self._since = time.perf_counter()


class TaskSet:
    """The background tasks of one owner, by name: each is cancelled *and awaited*
    before the owner is done (:meth:`close`), none is fire-and-forget.

    A task that ends with an exception is logged when it ends (its failure is never
    lost in "exception was never retrieved").

    Args:
        owner: who owns the tasks (for the log).
    """

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._ending: set[asyncio.Task[None]] = set()

    def start(self, name: str, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Start ``coro`` as the task ``name``.

        Args:
            name: unique among this owner's running tasks.
            coro: the task's body.

        Returns:
            The task.

        Raises:
            RuntimeError: a task of that name is still running.
        """
        old = self._tasks.get(name)
        if old is not None and not old.done():
            coro.close()
            raise RuntimeError(f"{self._owner}: task {name} is already running")
        task = asyncio.create_task(coro, name=f"{self._owner}-{name}")
        self._tasks[name] = task
        task.add_done_callback(self._ended)
        return task

    def get(self, name: str) -> asyncio.Task[None] | None:
        """The task ``name``, if it was started and has not been stopped."""
        return self._tasks.get(name)

    def running(self, name: str) -> bool:
        """Whether the task ``name`` is running."""
        task = self._tasks.get(name)
        return task is not None and not task.done()

    def cancel(self, name: str) -> None:
        """Ask the task ``name`` to stop, from code that cannot wait (a callback);
        :meth:`close` still awaits it."""
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            if not task.done():
                self._ending.add(task)
                task.add_done_callback(self._ending.discard)

    async def stop(self, name: str) -> None:
        """Cancel the task ``name`` and wait until it has ended."""
        await cancel_and_wait(self._tasks.pop(name, None))

    async def close(self) -> None:
        """Cancel every task and wait until all have ended; idempotent."""
        running = list(self._tasks.values())
        self._tasks.clear()
        for task in running:
            task.cancel()
        # Those cancelled already are only awaited: a second cancel would cut short
        # the cleanup they are running.
        tasks = [*running, *self._ending]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._ending.clear()

    def __len__(self) -> int:
        return sum(1 for t in [*self._tasks.values(), *self._ending] if not t.done())

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("%s failed", task.get_name(), exc_info=exc)
