"""The bounded queue between intake and the batcher, counted in records.

A message's records travel together in an :class:`Envelope`, so an ack or reply can
be sent once all of them are committed. ``put`` waits while the queue is full, and
nothing is ever dropped here: the wait pushes back into the NATS client (core mode)
or stops pulling (JetStream mode).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from store_svc.errors import QueueClosed
from store_svc.kinds import Row

__all__ = ["Envelope", "QueueClosed", "RecordQueue"]


@dataclass(slots=True)
class Envelope:
    """The valid records of one message (or of several messages of one kind, taken
    off the connection together), and what to do once they are committed.

    Attributes:
        kind: the record kind.
        rows: validated rows.
        received: loop time at which the message arrived.
        ack: awaited after the rows are committed (reply or JetStream ack), if any.
        fail: awaited with a reason when the database refuses the rows for good.
        withdrawn: set when the message was handed back (JetStream ``nak``) before its
            commit: the batcher then leaves its rows out.
        split: for an envelope of several messages, builds one envelope per message
            (the batcher's way to find the message whose records the database refuses).
    """

    kind: str
    rows: list[Row]
    received: float
    ack: Callable[[], Awaitable[None]] | None = None
    fail: Callable[[str], Awaitable[None]] | None = None
    withdrawn: bool = False
    split: Callable[[], list[Envelope]] | None = None


class RecordQueue:
    """A FIFO of envelopes whose capacity counts records, not envelopes.

    An envelope larger than the whole capacity is still taken when the queue is
    empty, so no single message can wedge intake.

    Args:
        capacity: records the queue holds before ``put`` waits.
        on_depth: called with the new depth after every change (watermarks).
    """

    def __init__(self, capacity: int, on_depth: Callable[[int], None] | None = None) -> None:
        self.capacity = capacity
        self._items: deque[Envelope] = deque()
        self._depth = 0
        self._closed = False
        self._getter: asyncio.Future[None] | None = None
        self._putters: deque[asyncio.Future[None]] = deque()
        self._room: list[tuple[int, asyncio.Future[None]]] = []
        self._on_depth = on_depth

    @property
    def depth(self) -> int:
        """Records currently queued."""
        return self._depth

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def __len__(self) -> int:
        return len(self._items)

    def _fits(self, n: int) -> bool:
        return self._depth == 0 or self._depth + n <= self.capacity

    def put_nowait(self, env: Envelope) -> bool:
        """Queue ``env`` if it fits now.

        Args:
            env: the envelope.

        Returns:
            True if queued, False if the queue is full.

        Raises:
            QueueClosed: the queue is closed.
        """
        if self._closed:
            raise QueueClosed("the queue is closed")
        if self._putters or not self._fits(len(env.rows)):
            return False
        self._append(env)
        return True

    async def put(self, env: Envelope) -> None:
        """Queue ``env``, waiting while the queue is full.

        Args:
            env: the envelope.

        Raises:
            QueueClosed: the queue is closed (before or while waiting).
        """
        if self.put_nowait(env):
            return
        fut = asyncio.get_running_loop().create_future()
        self._putters.append(fut)
        try:
            while True:
                await fut
                if self._closed:
                    raise QueueClosed("the queue closed while waiting for room")
                if self._fits(len(env.rows)):
                    break
                fut = asyncio.get_running_loop().create_future()
                self._putters.appendleft(fut)
        except BaseException:
            # Woken but leaving without the room (cancelled): pass the wake-up on.
            if fut.done() and not fut.cancelled():
                self._wake_putter()
            raise
        finally:
            if not fut.done():
                fut.cancel()
            if fut in self._putters:
                self._putters.remove(fut)
        self._append(env)
        self._wake_putter()

    def _append(self, env: Envelope) -> None:
        self._items.append(env)
        self._depth += len(env.rows)
        if self._getter is not None and not self._getter.done():
            self._getter.set_result(None)
        if self._on_depth is not None:
            self._on_depth(self._depth)

    def _wake_putter(self) -> None:
        while self._putters:
            fut = self._putters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    async def wait_room(self, below: int) -> None:
        """Wait until fewer than ``below`` records are queued, or the queue closes.

        For a producer that decides itself how much to fetch (JetStream pulls): it is
        woken by the take that makes the room, instead of looking every few ms.

        Args:
            below: the depth to wait under.
        """
        if self._depth < below or self._closed:
            return
        fut = asyncio.get_running_loop().create_future()
        entry = (below, fut)
        self._room.append(entry)
        try:
            await fut
        finally:
            if entry in self._room:
                self._room.remove(entry)

    def _wake_room(self) -> None:
        depth = self._depth
        for below, fut in self._room:
            if (depth < below or self._closed) and not fut.done():
                fut.set_result(None)

    def get_nowait(self) -> Envelope | None:
        """Take the oldest envelope, or None when empty."""
        if not self._items:
            return None
        env = self._items.popleft()
        self._depth -= len(env.rows)
        self._wake_putter()
        if self._room:
            self._wake_room()
        if self._on_depth is not None:
            self._on_depth(self._depth)
        return env

    async def get(self, timeout: float | None = None) -> Envelope | None:
        """Take the oldest envelope, waiting for one.

        Args:
            timeout: seconds to wait at most; None waits until an envelope comes or
                the queue is closed.

        Returns:
            The envelope, or None on timeout or when the queue is closed and empty.
        """
        while not self._items:
            if self._closed:
                return None
            self._getter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._getter
            except TimeoutError:
                return None
            finally:
                self._getter = None
        return self.get_nowait()

    def close(self) -> None:
        """Stop taking envelopes; queued ones can still be taken. Idempotent."""
        self._closed = True
        if self._getter is not None and not self._getter.done():
            self._getter.set_result(None)
        while self._putters:
            fut = self._putters.popleft()
            if not fut.done():
                fut.set_result(None)
        self._wake_room()
