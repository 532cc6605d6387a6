"""The batcher: takes envelopes off the queue and commits them in batches.

A batch closes when it holds ``batch_size`` records, when the first record in it
has waited ``flush_interval`` (linger), or, with a sink that overlaps writes, as soon
as the queue is empty and the sink idle (group commit), whichever comes first. One transaction per
batch; the sink groups rows per table. While one batch is being written, intake
keeps filling the queue, so under load the next batch is ready when the commit
returns. A failed commit is retried with capped exponential back-off and jitter;
the batch is kept, never dropped. Acks and replies go out only after the commit.

A sink that overlaps writes (PostgreSQL: a second connection) gets the next batch
while the one ahead commits, and stages it; the staged batch commits only after the
one ahead, so the order of corrections to one key is kept.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import defaultdict
from collections.abc import Callable

from store_svc.errors import SchemaError, SinkError
from store_svc.ingest.queue import Envelope, RecordQueue
from store_svc.kinds import Row
from store_svc.state import Stats
from store_svc.store.base import Batch, Prepared, Sink
from store_svc.tasks import Turns, cancel_and_wait, reraise_swallowed_cancel

__all__ = ["Batcher"]

log = logging.getLogger(__name__)


def _group(batch: list[Envelope]) -> dict[str, list[Row]]:
    """The rows of ``batch`` per kind, in arrival order."""
    grouped: defaultdict[str, list[Row]] = defaultdict(list)
    for env in batch:
        grouped[env.kind].extend(env.rows)
    return grouped


class Batcher:
    """Commits queued envelopes to a sink.

    Args:
        queue: where envelopes come from.
        sink: where rows go.
        stats: counters to update.
        batch_size: records per transaction (a soft bound: whole envelopes only).
        flush_interval: seconds the first record of a batch may wait for more.
        retry_initial: first back-off after a failed commit, in seconds.
        retry_max: cap of the back-off, in seconds.
        on_commit: called with (records, seconds) after each commit (metrics).
        on_sink_state: called with True when commits start failing, False when they
            succeed again (feedback).
    """

    def __init__(
        self,
        queue: RecordQueue,
        sink: Sink,
        stats: Stats,
        *,
        batch_size: int,
        flush_interval: float,
        retry_initial: float = 0.1,
        retry_max: float = 5.0,
        on_commit: Callable[[int, float], None] | None = None,
        on_sink_state: Callable[[bool], None] | None = None,
    ) -> None:
        self._queue = queue
        self._sink = sink
        self._stats = stats
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self.in_flight = 0
        self._turns = Turns()
        self.sink_ok = True
        self.on_commit = on_commit
        self.on_sink_state = on_sink_state

    async def run(self) -> None:
        """Commit batches until the queue is closed and empty.

        With a sink that overlaps writes, the next batch is collected and prepared
        while the one ahead commits; its commit starts only when the one ahead has
        finished (committed, or its culprits dropped), so batches commit in order.
        """
        sink = self._sink
        ahead: asyncio.Task[None] | None = None
        try:
            while True:
                if ahead is not None and not sink.overlaps_writes:
                    await ahead
                    ahead = None
                    # Awaiting the commit ahead returns normally if it swallowed the
                    # cancellation meant for both (its ack's publish can).
                    reraise_swallowed_cancel()
                batch = await self._collect(ahead if sink.overlaps_writes else None)
                if batch is None:
                    break
                grouped = _group(batch)
                prepared: Prepared | None = None
                if ahead is not None and not ahead.done():
                    try:
                        prepared = await sink.prepare(grouped)
                    except Exception as exc:  # the commit below writes it the ordinary way
                        log.debug("preparing a batch ahead failed: %s", exc)
                if ahead is not None:
                    try:
                        await ahead
                        reraise_swallowed_cancel()  # as above
                    except BaseException:
                        if prepared is not None:
                            await prepared.abort()
                        raise
                ahead = asyncio.create_task(self._commit(batch, grouped, prepared))
            if ahead is not None:
                await ahead
                ahead = None
                reraise_swallowed_cancel()  # as above
        finally:
            if ahead is not None and not ahead.done():
                await cancel_and_wait(ahead)

    async def _collect(self, ahead: asyncio.Task[None] | None) -> list[Envelope] | None:
        """The next batch off the queue, or ``None`` once it is closed and empty.

        With a sink that overlaps writes (``ahead`` is the commit under way, if any)
        the batch also closes as soon as the queue is empty and the sink is idle: a
        group commit. Waiting would only add latency then, and under load the sink
        is busy, so batches grow up to ``batch_size`` by themselves. Other sinks
        wait for the linger.
        """
        loop = asyncio.get_running_loop()
        queue = self._queue
        first = await queue.get()
        if first is None:
            return None
        batch = [first]
        size = len(first.rows)
        self.in_flight += size
        deadline = first.received + self.flush_interval
        group_commit = self._sink.overlaps_writes
        while size < self.batch_size:
            env = queue.get_nowait()
            if env is None:
                idle = ahead is None or ahead.done()
                remaining = deadline - loop.time()
                if (group_commit and idle) or remaining <= 0 or queue.closed:
                    break
                if ahead is not None and not ahead.done():
                    env = await self._next_or_idle(ahead, remaining)
                    if env is None:
                        continue  # the sink became idle (or time ran out): look again
                else:
                    env = await queue.get(timeout=remaining)
                    if env is None:
                        break
            batch.append(env)
            size += len(env.rows)
            self.in_flight += len(env.rows)
        return batch

    async def _next_or_idle(self, ahead: asyncio.Task[None], timeout: float) -> Envelope | None:
        """The next envelope, or ``None`` when ``ahead`` finishes or ``timeout`` passes."""
        getter = asyncio.ensure_future(self._queue.get(timeout=timeout))
        try:
            await asyncio.wait({getter, ahead}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()  # the queue gives nothing away to a cancelled get
        try:
            return await getter
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the batcher itself is being cancelled
            return None

    async def _isolate(self, batch: list[Envelope], exc: SinkError) -> None:
        """Commit the envelopes of a refused batch one by one; drop only the refused."""
        if len(batch) == 1 and batch[0].split is not None:
            # One envelope of several messages: each message on its own.
            batch = batch[0].split()
        if len(batch) == 1:
            env = batch[0]
            self._stats.rejected["sink_refused"] += len(env.rows)
            self._stats.rejected_by_kind[env.kind] += len(env.rows)
            log.error(
                "the database refused a %s message of %d records; it is dropped: %s",
                env.kind,
                len(env.rows),
                exc,
            )
            if env.fail is not None:
                try:
                    await env.fail(f"the database refused these records: {exc}")
                except Exception as err:
                    log.warning("reporting a refused %s message failed: %s", env.kind, err)
            self.in_flight -= len(env.rows)
            return
        for env in batch:
            await self._commit([env], {env.kind: env.rows}, None)

    async def _commit(
        self, batch: list[Envelope], grouped: Batch, prepared: Prepared | None
    ) -> None:
        size = sum(len(rows) for rows in grouped.values())
        delay = self._retry_initial
        started = asyncio.get_running_loop().time()
        while True:
            if any(env.withdrawn for env in batch):
                # Handed back for another instance to store: leave them out.
                kept = [env for env in batch if not env.withdrawn]
                self.in_flight -= size - sum(len(env.rows) for env in kept)
                if prepared is not None:
                    await prepared.abort()
                    prepared = None
                batch = kept
                grouped = _group(batch)
                size = sum(len(rows) for rows in grouped.values())
                if not batch and self.sink_ok:
                    return
                # With everything handed back and the database still failing, the
                # empty write goes on as a probe, so recovery is noticed and reported.
            try:
                if prepared is not None:
                    # The first attempt commits what was prepared; a retry starts over.
                    ready, prepared = prepared, None
                    try:
                        await ready.commit()
                    except SinkError as exc:
                        if not exc.retryable:
                            raise
                        # Staged work lost (the batch ahead failed, a connection
                        # dropped): write it the ordinary way at once; only a failure
                        # of that counts.
                        log.debug("a batch prepared ahead is written again: %s", exc)
                        await self._sink.write(grouped)
                else:
                    await self._sink.write(grouped)
                break
            except Exception as exc:  # a failure keeps the batch: retried, never dropped
                if (
                    isinstance(exc, SinkError)
                    and not exc.retryable
                    and not isinstance(exc, SchemaError)
                ):
                    # The database refuses the data itself: retrying cannot help, and
                    # waiting would stall every later record. Find the message at fault.
                    await self._isolate(batch, exc)
                    return
                if not isinstance(exc, SinkError):
                    log.exception("unexpected error committing %d records", size)
                self._stats.sink_errors += 1
                self._stats.last_sink_error = str(exc)
                if self.sink_ok:
                    log.error("commit of %d records failed, will retry: %s", size, exc)
                    if self.on_sink_state is not None:
                        self.on_sink_state(True)
                self.sink_ok = False
                if isinstance(exc, SchemaError):
                    log.critical("the database schema cannot be used: %s", exc)
                # Jitter (half to all of the delay) keeps instances from retrying in lockstep.
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, self._retry_max)
        if not self.sink_ok:
            log.warning("commits succeed again; %d records committed", size)
            if self.on_sink_state is not None:
                self.on_sink_state(False)
        self.sink_ok = True
        stats = self._stats
        stats.last_sink_error = None
        if not batch:
            return
        stats.batches += 1
        stats.last_commit_monotonic = asyncio.get_running_loop().time()
        if self.on_commit is not None:
            self.on_commit(size, stats.last_commit_monotonic - started)
        for kind, rows in grouped.items():
            stats.committed[kind] += len(rows)
        self.in_flight -= size
        for env in batch:
            if env.ack is not None:
                try:
                    await env.ack()
                except Exception as exc:  # an ack that fails must not stop the batcher
                    log.warning("acknowledging a committed %s message failed: %s", env.kind, exc)
                # A batch of single-record messages is a thousand acks or replies.
                await self._turns.take()
