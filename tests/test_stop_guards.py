"""What keeps a stop from hanging: tasks that swallow a cancellation are cancelled again,
and a shutdown that still hangs is ended by the watchdog, which says where it was."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Coroutine
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg

from store_svc.bus.client import CLOSE_TIMEOUT_S
from store_svc.bus.connection import NatsConnection
from store_svc.constants import EXIT_HUNG
from store_svc.control.feedback import FeedbackLoop
from store_svc.control.redis_feedback import RedisFeedbackPublisher
from store_svc.devtools.natsserver import NatsServer
from store_svc.devtools.processes import freeze, thaw
from store_svc.settings import Settings, load_settings
from store_svc.tasks import TaskSet, cancel_and_wait, where


async def ends_within(coro: Coroutine[Any, Any, None], seconds: float) -> None:
    """Fail unless ``coro`` ends within ``seconds`` (not ``wait_for``: in Python 3.11
    it waits for a cancelled inner task, so it could not bound a regression)."""
    run = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait({run}, timeout=seconds)
    if not done:
        run.cancel()
        pytest.fail(f"did not end within {seconds} s")
    run.result()


async def test_nats_py_swallows_the_cancellation_of_a_client_drain(
    nats_server: NatsServer,
) -> None:
    """The library fault the guard is for, against a real server: a task cancelled
    inside nats-py's ``Client.drain`` is not ended; the drain returns as if it had
    finished (it catches ``CancelledError``), and the task goes on. A task that drains
    and then waits would never end for one cancel."""
    nc = await nats.connect(nats_server.url)
    release = asyncio.Event()

    async def slow(msg: Msg) -> None:
        await release.wait()  # the drain waits for this message to be handled

    await nc.subscribe("guard.drain", cb=slow)
    await nc.publish("guard.drain", b"x")
    await nc.flush()
    went_on = asyncio.Event()

    async def drain_then_wait() -> None:
        await nc.drain()
        went_on.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(drain_then_wait(), name="drain-then-wait")
    try:
        await asyncio.sleep(0.2)  # inside the drain, waiting for the message
        assert not went_on.is_set()
        started = time.monotonic()
        await ends_within(cancel_and_wait(task, patience=2.0), 10)
        assert went_on.is_set(), "the first cancellation was swallowed: the task went on"
        assert task.cancelled()
        assert time.monotonic() - started < 5
    finally:
        release.set()
        task.cancel()
        await nc.close()


@pytest.mark.logic
async def test_cancel_and_wait_cancels_again_a_task_that_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed == 3:
                    raise

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="store_svc.tasks"):
        await ends_within(cancel_and_wait(task, patience=0.05), 5)
    assert task.cancelled()
    assert swallowed == 3
    lines = [
        r.getMessage() for r in caplog.records if "went on after it was cancelled" in r.getMessage()
    ]
    assert len(lines) == 2, lines
    assert "stubborn (test_stop_guards.py:" in lines[0], "where it waits is named"
    assert "-> sleep (tasks.py:" in lines[0], "down to what it awaits"


@pytest.mark.logic
async def test_cancel_and_wait_leaves_a_prompt_cleanup_alone() -> None:
    """A task that takes a moment to clean up is not cut short by a second cancel (as
    with the plain gather before: this pins that the re-cancel waits its patience)."""
    cleaned = asyncio.Event()

    async def tidy() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.1)
            cleaned.set()

    task = asyncio.create_task(tidy())
    await asyncio.sleep(0)
    await cancel_and_wait(task, patience=1.0)
    assert cleaned.is_set()


@pytest.mark.logic
async def test_a_task_set_closes_even_a_task_that_swallows_its_cancellation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("store_svc.tasks.CANCEL_PATIENCE_S", 0.05)
    tasks = TaskSet("owner")

    async def once_deaf() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)
        await asyncio.sleep(3600)

    tasks.start("deaf", once_deaf())
    tasks.start("gone", once_deaf())
    await asyncio.sleep(0)
    tasks.cancel("gone")  # from a callback: cancelled once, awaited by close()
    await ends_within(tasks.close(), 5)
    assert len(tasks) == 0


@pytest.mark.logic
async def test_a_cancelled_caller_still_waits_for_the_task_it_was_ending() -> None:
    """As ``gather`` did (this pins it, it was lost once in review): a task whose
    cleanup ends a child with ``cancel_and_wait``, itself cancelled again meanwhile,
    returns only once the child has ended."""
    child_cleaning = asyncio.Event()

    async def child() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            child_cleaning.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.5)  # a cleanup that a second cancel cuts short...
            await asyncio.sleep(0.2)  # ...but not all of it

    kid = asyncio.create_task(child())

    async def parent() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await cancel_and_wait(kid, patience=5.0)

    mom = asyncio.create_task(parent())
    await asyncio.sleep(0)
    await ends_within(cancel_and_wait(mom, patience=0.05), 5)  # re-cancels mom
    assert child_cleaning.is_set()
    assert kid.done(), "the child was still running when its parent had ended"
    assert mom.cancelled()


@pytest.mark.logic
async def test_where_names_every_coroutine_a_task_waits_through() -> None:
    async def inner() -> None:
        await asyncio.Event().wait()

    async def middle() -> None:
        await inner()

    async def outer() -> None:
        await middle()

    task = asyncio.create_task(outer())
    await asyncio.sleep(0)
    try:
        chain = where(task).split(" -> ")
        names = [part.split(" ")[0] for part in chain]
        assert names[:4] == ["outer", "middle", "inner", "wait"], chain
        assert names[-1] == "Future", chain
    finally:
        await cancel_and_wait(task)


WATCHED = textwrap.dedent(
    """
    import asyncio, logging, sys, time
    import uvloop
    from store_svc.runtime.watchdog import StopWatchdog

    logging.basicConfig(level="INFO", stream=sys.stderr)

    async def stuck_on_shutdown():
        await asyncio.Event().wait()

    async def main(block):
        asyncio.create_task(stuck_on_shutdown(), name="stuck-task")
        await asyncio.sleep(0)
        StopWatchdog(asyncio.get_running_loop(), 1.0).arm()
        if block:
            time.sleep(60)  # the event loop itself is blocked
        await asyncio.sleep(60)

    uvloop.run(main(sys.argv[1] == "block"))
    """
)


@pytest.mark.parametrize("how", ["block", "await"])
def test_the_watchdog_ends_a_hung_stop_and_says_where(how: str) -> None:
    """In a real process: a shutdown that does not end, with the loop blocked or
    waiting for ever, is ended with the hung exit code, every task and thread named."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", WATCHED, how], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == EXIT_HUNG, proc.stderr
    assert time.monotonic() - started < 15
    err = proc.stderr
    assert "has not stopped 1 s after it was asked to; exiting with code 70" in err
    assert "stuck-task: stuck_on_shutdown (<string>:" in err, err
    assert "-> wait (locks.py:" in err, "the task's whole chain, down to the Event"
    assert "the stack of every thread follows" in err
    if how == "block":
        assert re.search(r'File "<string>", line \d+ in main', err), err  # the blocking call


def test_the_backstop_ends_a_process_whose_watchdog_cannot_report() -> None:
    """The report waits on the log like everything else: with the log blocked (its
    handler's lock held by a hung thread), SIGALRM still ends the process."""
    script = textwrap.dedent(
        """
        import asyncio, logging, sys, time, uvloop
        from store_svc.runtime.watchdog import StopWatchdog

        logging.basicConfig(level="INFO", stream=sys.stderr)

        async def main():
            StopWatchdog(asyncio.get_running_loop(), 0.3, backstop_s=0.5).arm()
            logging.getLogger().handlers[0].acquire()  # a log write that never returns
            time.sleep(60)

        uvloop.run(main())
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == -signal.SIGALRM, (proc.returncode, proc.stderr)


def test_the_watchdog_does_not_fire_once_disarmed() -> None:
    script = textwrap.dedent(
        """
        import asyncio, time, uvloop
        from store_svc.runtime.watchdog import StopWatchdog

        async def main():
            dog = StopWatchdog(asyncio.get_running_loop(), 0.3, backstop_s=0.2)
            dog.arm()
            dog.disarm()
            time.sleep(1)  # past the deadline and the backstop

        uvloop.run(main())
        print("ended")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ended"


@pytest.mark.skipif(
    sys.version_info >= (3, 12), reason="Python 3.12's wait_for no longer swallows a cancel"
)
async def test_nats_py_flush_swallows_a_cancel_that_meets_its_pong(
    nats_server: NatsServer,
) -> None:
    """Python 3.11's ``wait_for``, under nats-py's ``flush``: a task cancelled in the
    turn its PONG comes in gets the flush's result instead of the cancellation."""
    nc = await nats.connect(nats_server.url)
    went_on = asyncio.Event()

    async def flush_then_wait() -> None:
        await nc.flush(timeout=5)
        went_on.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(flush_then_wait())
    try:
        await at_the_pong(nc, task)
        await asyncio.wait_for(went_on.wait(), 5)
        assert not task.done()
        assert task.cancelling() == 1, "the cancellation is still pending on the task"
    finally:
        task.cancel()
        await asyncio.wait({task})
        await nc.close()


async def at_the_pong(nc: nats.NATS, task: asyncio.Task[None]) -> None:
    """Cancel ``task`` in the turn the PONG of its flush arrives."""
    async with asyncio.timeout(5):
        while not nc._pongs:
            await asyncio.sleep(0)
    nc._pongs[-1].add_done_callback(lambda _: task.cancel())


async def test_the_rtt_probe_ends_when_its_cancel_meets_a_pong(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """The connection's round-trip probe flushes in a loop: cancelled as a PONG comes
    in, it ends at once, not only when cancelled again (the stop of the service once
    waited for it for ever)."""
    conn = NatsConnection("ingest", make_settings(feedback_heartbeat_s=0.05))
    async with conn:
        probe = next(t for t in conn._tasks if t.get_name() == "nats-ingest-rtt")
        await at_the_pong(conn.nc, probe)
        await asyncio.wait({probe}, timeout=5)
        assert probe.cancelled()
        with caplog.at_level(logging.WARNING, logger="store_svc.tasks"):
            await conn.close()
    assert "went on after it was cancelled" not in caplog.text


async def test_a_drain_against_a_frozen_server_ends_at_its_timeout(
    make_settings: Callable[..., Settings], nats_server: NatsServer
) -> None:
    """The connection's drain is bounded by its timeout and the close after it: nats-py's
    own drain, cut short by a timeout, would go on to a 10 s flush first."""
    conn = NatsConnection("ingest", make_settings())
    await conn.connect()

    async def handle(msg: Msg) -> None:
        pass

    await conn.nc.subscribe("guard.frozen", cb=handle)
    assert nats_server.proc is not None
    freeze(nats_server.proc.pid)
    try:
        started = time.monotonic()
        done, _ = await asyncio.wait({asyncio.ensure_future(conn.drain(0.5))}, timeout=30)
        took = time.monotonic() - started
    finally:
        thaw(nats_server.proc.pid)
    assert done, "the drain never ended"
    assert took < 0.5 + CLOSE_TIMEOUT_S + 3, f"the drain took {took:.1f} s"
    assert conn.nc.is_closed


class DeafOnce:
    """A publisher whose publish swallows the cancellation it is waiting in, as
    nats-py's ``_flush_pending`` does (and Python 3.11's ``wait_for`` under redis-py)."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.swallowed = 0

    async def publish(self, event: Any) -> None:
        await self.wait()

    async def xadd(self, *args: Any, **kwargs: Any) -> None:
        await self.wait()

    async def wait(self) -> None:
        self.entered.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.swallowed += 1


async def ends_on_one_cancel(task: asyncio.Task[None], deaf: DeafOnce) -> None:
    await asyncio.wait_for(deaf.entered.wait(), 5)
    task.cancel()  # once, while the publish swallows it
    done, _ = await asyncio.wait({task}, timeout=2)
    assert deaf.swallowed == 1
    assert done, "the loop went on after its cancellation was swallowed"
    assert task.cancelled()


@pytest.mark.logic
async def test_the_feedback_loop_ends_when_a_publish_swallows_its_cancel() -> None:
    deaf = DeafOnce()
    loop = FeedbackLoop(load_settings(feedback_min_dwell_ms=0, feedback_heartbeat_s=600), 100)
    loop.publisher = deaf  # type: ignore[assignment]
    task = asyncio.create_task(loop.run())
    loop.on_depth(90)  # hard: published at once
    try:
        await ends_on_one_cancel(task, deaf)
    finally:
        await cancel_and_wait(task)
        loop.close()


@pytest.mark.logic
async def test_the_redis_writer_ends_when_a_write_swallows_its_cancel() -> None:
    deaf = DeafOnce()
    writer = RedisFeedbackPublisher("redis://127.0.0.1:1/0", "mdp", 1000)
    writer._redis = deaf  # no server: the write is the fake's
    source = FeedbackLoop(load_settings(), 100)
    task = asyncio.create_task(writer.run())
    writer.offer(source.event())
    try:
        await ends_on_one_cancel(task, deaf)
    finally:
        await cancel_and_wait(task)
        source.close()
