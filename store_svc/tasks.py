"""Small asyncio helpers shared by the service's parts: owned task sets, cancel-and-wait,
and the time slices that keep the event loop responsive."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from store_svc.constants import CANCEL_PATIENCE_S, TURN_SLICE_S

__all__ = ["TaskSet", "Turns", "cancel_and_wait", "reraise_swallowed_cancel", "where"]

log = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task[None] | None, patience: float | None = None) -> None:
    """Cancel ``task`` and wait until it has ended (a task is never left behind).

    A cancellation can be swallowed: nats-py's ``Client.drain`` catches
    ``CancelledError`` and returns, its ``_flush_pending`` does when a publish waits
    for the flusher, its ``close`` while it waits for a reconnection to end, and
    Python 3.11's ``wait_for`` (nats-py's ``flush`` and ``request``) when what it
    awaits is done in the same turn (the drain and the flush cases are reproduced in
    ``tests/test_stop_guards.py``). A task cancelled once may then go on: one that has not
    ended within ``patience`` seconds is logged with where it is and cancelled again.

    Args:
        task: the task, or None (nothing to do). Its outcome is not re-raised.
        patience: seconds between cancellations (a cleanup under way is given that
            long before it is cut short); ``CANCEL_PATIENCE_S`` by default.
    """
    if task is None:
        return
    if patience is None:
        patience = CANCEL_PATIENCE_S
    task.cancel()
    tries = 1
    caller_cancelled = False
    while True:
        try:
            done, _ = await asyncio.wait({task}, timeout=patience)
        except asyncio.CancelledError:
            # As gather would: the caller's cancellation reaches the task, and the
            # task is still waited for (a cleanup of the caller's must not run while
            # it does); the caller's cancellation is raised once it has ended.
            caller_cancelled = True
            task.cancel()
            continue
        if done:
            break
        _cancel_once_more(task, tries)
        tries += 1
    if not task.cancelled():
        task.exception()  # retrieved: never "exception was never retrieved"
    if caller_cancelled:
        raise asyncio.CancelledError


def reraise_swallowed_cancel() -> None:
    """Raise ``CancelledError`` if the current task was cancelled while in a call that
    swallowed it.

    Python 3.11's ``wait_for`` returns the result instead of raising when the task is
    cancelled in the same turn as what it awaits completes; nats-py's ``flush`` waits
    for its PONG that way (tests/test_stop_guards.py reproduces it). A loop that
    flushes would then go on as if never cancelled. Call this after such a call.

    Raises:
        asyncio.CancelledError: a cancellation is pending on the current task.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def where(task: asyncio.Task[Any]) -> str:
    """Where ``task`` waits: each coroutine it awaits through, outermost first, and
    what the innermost one awaits (for a log line)."""
    parts: list[str] = []
    step: Any = task.get_coro()
    while step is not None and len(parts) < 16:
        frame = getattr(step, "cr_frame", None) or getattr(step, "gi_frame", None)
        if frame is None:
            if not hasattr(step, "cr_await") and not hasattr(step, "gi_yieldfrom"):
                # What the innermost coroutine awaits: the Future the task waits on.
                waited = getattr(task, "_fut_waiter", None)
                if isinstance(waited, asyncio.Task):
                    parts.append(f"task {waited.get_name()}")
                else:
                    parts.append(type(waited if waited is not None else step).__name__)
            break
        code = frame.f_code
        parts.append(f"{code.co_name} ({Path(code.co_filename).name}:{frame.f_lineno})")
        step = getattr(step, "cr_await", None) or getattr(step, "gi_yieldfrom", None)
    return " -> ".join(parts) or "(no frame)"


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


def _cancel_once_more(task: asyncio.Task[Any], tries: int) -> None:
    """Cancel again a task that went on after ``tries`` cancellations, saying where."""
    log.warning(
        "task %s went on after it was cancelled %d time(s) (a cancellation swallowed?); "
        "cancelling it again. It is at: %s",
        task.get_name(),
        tries,
        where(task),
    )
    task.cancel()


def _cancel_again(task: asyncio.Task[None], tries: int) -> None:
    """A task cancelled from a callback that is still running: cancel it again."""
    if task.done():
        return
    _cancel_once_more(task, tries)
    asyncio.get_running_loop().call_later(CANCEL_PATIENCE_S, _cancel_again, task, tries + 1)


async def _wait_until_ended(task: asyncio.Task[None]) -> None:
    """Wait for a task cancelled from a callback (its re-cancels are scheduled)."""
    try:
        await asyncio.wait({task})
    except asyncio.CancelledError:
        await cancel_and_wait(task)  # still waited for, as gather would
        raise
    if not task.cancelled():
        task.exception()


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
                # Cancelled again if it swallowed that (see cancel_and_wait).
                asyncio.get_running_loop().call_later(CANCEL_PATIENCE_S, _cancel_again, task, 1)

    async def stop(self, name: str) -> None:
        """Cancel the task ``name`` and wait until it has ended."""
        await cancel_and_wait(self._tasks.pop(name, None))

    async def close(self) -> None:
        """Cancel every task and wait until all have ended; idempotent."""
        running = list(self._tasks.values())
        self._tasks.clear()
        # Those cancelled already are only awaited: cancelling them again now would
        # cut short the cleanup they are running (if they go on, their re-cancels
        # are scheduled already).
        ending = list(self._ending)
        waits = [cancel_and_wait(t) for t in running]
        waits += [_wait_until_ended(t) for t in ending]
        if waits:
            await asyncio.gather(*waits)
        self._ending.clear()

    def __len__(self) -> int:
        return sum(1 for t in [*self._tasks.values(), *self._ending] if not t.done())

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("%s failed", task.get_name(), exc_info=exc)
