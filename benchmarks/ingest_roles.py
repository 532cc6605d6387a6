"""Internal roles of the ingest benchmark, each run as a process of its own.

``bench_ingest.py`` starts this file as ``python ingest_roles.py --ROLE SPEC`` (SPEC is
JSON): a throughput publisher (``--publisher``), the paced latency publisher
(``--paced``), the bare subscriber of ceiling A (``--bare-subscriber``) or the query
client of the mixed-load scenarios (``--query-load``). A child prints ``READY`` once
connected, waits for ``GO`` on stdin where it publishes (the query client then runs
until ``STOP`` or the end of stdin), and prints its result as one JSON line at the
end. It imports nothing of the service or of the other benchmark modules, so it
starts fast.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final

import msgspec
import nats
import uvloop
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

#: Ingest modes of the service (``STORE_INGEST_MODE``).
CORE: Final = "core"
JETSTREAM: Final = "jetstream"

# ------------------------------------------------------------------ role specs (IPC)


class PublisherSpec(msgspec.Struct, frozen=True):
    """What a throughput publisher process sends (``--publisher``)."""

    url: str
    subject: str
    payloads: str
    start: int
    stop: int
    chunk: int
    window: int
    timeout: float
    mode: str = CORE


class PacedSpec(msgspec.Struct, frozen=True):
    """What the paced latency publisher sends (``--paced``): ``payloads[start:stop]``.

    In JetStream mode every message is a JetStream publish (``sample_every`` is
    unused), at most ``window`` PubAcks outstanding, and ``ack_subject`` is where the
    service's acks are watched.
    """

    url: str
    subject: str
    payloads: str
    rate: float
    timeout: float
    start: int = 0
    stop: int = 0
    sample_every: int = 1
    mode: str = CORE
    ack_subject: str = ""
    window: int = 1_000


class SubscriberSpec(msgspec.Struct, frozen=True):
    """Where the bare subscriber listens (``--bare-subscriber``)."""

    url: str
    subject: str
    queue: str


class QueryLoadSpec(msgspec.Struct, frozen=True):
    """What the query client sends (``--query-load``).

    Page workers: one per entry of ``page_chains`` (the symbols of one query), each
    following ``next_cursor`` through ``[start, end)`` with pages of ``limit`` and
    starting again at the first page when the cursor is null. Latest workers:
    ``latest_workers`` of them, each asking for ``latest_symbols``. A worker waits for
    its reply before its next request, and all workers share ``in_flight`` slots: at
    most that many requests are unanswered (a worker waits for a free slot; the wait
    is not part of the latency). A rate > 0 is shared evenly by the endpoint's workers
    (each paced on its own schedule; a worker behind schedule sends at once, nothing is
    skipped, so a slow service shows as an achieved rate below the asked one); a rate
    < 0 (:data:`CLOSED_LOOP`) sends the next request as soon as the reply is in; a
    rate of 0 leaves the endpoint out.
    """

    url: str
    query_subject: str
    latest_subject: str
    page_chains: list[list[str]]
    start: str
    end: str
    latest_symbols: list[str]
    query_rate: float
    latest_rate: float
    limit: int = 1000
    latest_workers: int = 1
    in_flight: int = 4
    timeout: float = 10.0


class PublishResult(msgspec.Struct):
    """What a throughput publisher reports (times are ``time.monotonic``, which is
    system-wide on Linux and so comparable across processes)."""

    messages: int
    requests: int
    replies: int
    accepted: int
    rejected: int
    error_replies: int
    first_publish: float
    last_publish: float
    last_reply: float
    timed_out: bool


class PacedResult(msgspec.Struct):
    """What the paced latency publisher reports (``messages``: the ones a reply or ack
    was waited for; ``sent``: all; ``error_replies``: error replies to those)."""

    sent: int
    messages: int
    replies: int
    error_replies: int
    achieved_rate: float
    latencies_ms: list[float]
    timed_out: bool


class WorkerResult(msgspec.Struct):
    """What one query worker did (``endpoint`` is ``query`` or ``latest``).

    ``errors`` counts failed requests by ``Nats-Service-Error-Code`` (e.g. ``503``),
    or ``timeout`` / ``no_responders`` / ``nats_error``; ``latencies_ms`` are those
    of the successful replies (request sent to reply in); ``passes`` (page workers)
    holds the records of each complete pass from the first page to a null cursor.
    """

    endpoint: str
    symbols: list[str]
    requests: int = 0
    ok: int = 0
    records: int = 0
    errors: dict[str, int] = msgspec.field(default_factory=dict)
    latencies_ms: list[float] = msgspec.field(default_factory=list)
    passes: list[int] = msgspec.field(default_factory=list)


class QueryLoadResult(msgspec.Struct):
    """What the query client reports: its workers, the seconds from ``GO`` until the
    last worker stopped, and the CPU seconds the client used meanwhile."""

    seconds: float
    workers: list[WorkerResult]
    cpu_seconds: float = 0.0


class SubscriberResult(msgspec.Struct):
    """What the bare subscriber reports."""

    messages: int
    slow_consumer_errors: int


#: The paced publisher sends what is due, then sleeps at least this long: at tens of
#: thousands of messages a second, a wake-up per message would burn a core of a
#: 2-core machine on the event loop alone (the rate is kept; messages go in bursts of
#: about a millisecond's worth).
PACE_TICK_S = 0.001

_READY = "READY"
_GO = "GO"
_STOP = "STOP"

#: A query client rate meaning "as fast as replies come" (see :class:`QueryLoadSpec`).
CLOSED_LOOP: Final = -1.0
#: A query worker pauses this long after a failed request (a refusal comes back at
#: once; closed-loop, it would otherwise be asked again in a tight loop).
ERROR_PAUSE_S = 0.01


# ------------------------------------------------------------------------ payloads


def save_payloads(path: Path, payloads: list[bytes]) -> None:
    """Write payloads for the publisher processes (MessagePack list of binaries)."""
    path.write_bytes(msgspec.msgpack.encode(payloads))


def load_payloads(path: str) -> list[bytes]:
    """Read payloads written by :func:`save_payloads`."""
    return msgspec.msgpack.decode(Path(path).read_bytes(), type=list[bytes])


# ---------------------------------------------------------- child roles (processes)


async def _pace(n: int, rate: float, send: Callable[[int], Awaitable[None]]) -> tuple[float, float]:
    """Call ``send(i)`` for ``i`` in ``range(n)`` at ``rate`` a second, in bursts of
    what is due every ``PACE_TICK_S`` at least; return the start and end times."""
    t0 = time.monotonic()
    i = 0
    while i < n:
        due = min(n, int((time.monotonic() - t0) * rate) + 1)
        while i < due:
            await send(i)
            i += 1
        await asyncio.sleep(max(PACE_TICK_S, t0 + i / rate - time.monotonic()))
    return t0, time.monotonic()


async def _wait_for_go() -> None:
    """Tell the orchestrator we are ready, then wait for its go line on stdin."""
    print(_READY, flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if line.strip() != _GO:
        raise SystemExit(f"expected {_GO!r} on stdin, got {line!r}")


def _is_error_reply(msg: Msg) -> bool:
    """True for a service error reply (ADR-32 headers) or a no-responders status."""
    headers = msg.headers or {}
    return "Nats-Service-Error-Code" in headers or "Status" in headers


async def publisher_role(spec: PublisherSpec) -> PublishResult:
    """Publish a slice of the payloads flat out, with windowed request flow control.

    Every ``chunk``-th message and the last one carry a reply subject; at most
    ``window`` of them may be unanswered. The last reply marks the end: NATS keeps
    the order of one publisher's messages and the service commits in FIFO order.
    In JetStream mode, see :func:`_publish_jetstream`.

    Args:
        spec: what and where to publish.

    Returns:
        Counts and times.
    """
    payloads = load_payloads(spec.payloads)[spec.start : spec.stop]
    if spec.mode == JETSTREAM:
        return await _publish_jetstream(spec, payloads)
    n = len(payloads)
    nc: NATS = await nats.connect(spec.url.split(","), name="bench-publisher")
    loop = asyncio.get_running_loop()
    inbox = nc.new_inbox()
    is_request = [(i + 1) % spec.chunk == 0 or i == n - 1 for i in range(n)]
    expected = sum(is_request)
    slots = asyncio.Semaphore(spec.window)
    done: asyncio.Future[None] = loop.create_future()
    result = PublishResult(n, expected, 0, 0, 0, 0, 0.0, 0.0, 0.0, False)

    async def on_reply(msg: Msg) -> None:
        result.last_reply = time.monotonic()
        result.replies += 1
        if _is_error_reply(msg):
            result.error_replies += 1
        elif msg.data:
            body = json.loads(msg.data)
            result.accepted += body["accepted"]
            result.rejected += body["rejected"]
        slots.release()
        if result.replies >= expected and not done.done():
            done.set_result(None)

    await nc.subscribe(inbox + ".*", cb=on_reply)
    await nc.flush()
    await _wait_for_go()
    subject = spec.subject
    publish = nc.publish
    result.first_publish = time.monotonic()
    for i, payload in enumerate(payloads):
        if is_request[i]:
            await slots.acquire()
            await publish(subject, payload, reply=f"{inbox}.{i}")
        else:
            await publish(subject, payload)
    result.last_publish = time.monotonic()
    await nc.flush()
    try:
        await asyncio.wait_for(done, spec.timeout)
    except TimeoutError:
        result.timed_out = True
    await nc.close()
    return result


async def _publish_jetstream(spec: PublisherSpec, payloads: list[bytes]) -> PublishResult:
    """Publish flat out with JetStream publishes, at most ``window`` PubAcks outstanding.

    Every message gets a PubAck from the stream once stored; the PubAcks are the flow
    control and say nothing about the service. The result's ``requests`` and
    ``replies`` count PubAcks owed and received, ``last_reply`` is the last PubAck;
    the orchestrator watches the database for the end of the run.

    Args:
        spec: what and where to publish.
        payloads: this publisher's slice.

    Returns:
        Counts and times.
    """
    n = len(payloads)
    nc: NATS = await nats.connect(spec.url.split(","), name="bench-publisher-js")
    js = nc.jetstream(publish_async_max_pending=spec.window)
    result = PublishResult(n, n, 0, 0, 0, 0, 0.0, 0.0, 0.0, False)

    def on_puback(fut: asyncio.Future[Any]) -> None:
        result.last_reply = time.monotonic()
        result.replies += 1
        if fut.cancelled() or fut.exception() is not None:
            result.error_replies += 1

    await _wait_for_go()
    subject = spec.subject
    publish = js.publish_async
    result.first_publish = time.monotonic()
    for payload in payloads:
        fut = await publish(subject, payload)
        fut.add_done_callback(on_puback)
    result.last_publish = time.monotonic()
    try:
        await asyncio.wait_for(js.publish_async_completed(), spec.timeout)
    except TimeoutError:
        result.timed_out = True
    await nc.close()
    return result


def _ack_stream_seq(subject: str) -> int:
    """The stream sequence in a JetStream ack subject (v1 ``$JS.ACK.<stream>.<consumer>.
    <delivered>.<sseq>...``, 9 tokens, or v2 with domain and account hash first)."""
    tokens = subject.split(".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


async def _paced_jetstream(spec: PacedSpec, payloads: list[bytes]) -> PacedResult:
    """The paced load in JetStream mode: latency is the service's ack of each message.

    Every message is a JetStream publish; its PubAck gives its stream sequence. A
    subscriber on ``spec.ack_subject`` gets a copy of every ack the service sends
    (after the commit), and its sequence ties it to the message. Latency is ack
    arrival minus send time (taken just before the publish), for every message.

    Args:
        spec: what, where and how fast.
        payloads: the messages.

    Returns:
        Per-message latencies in ms (acked messages only) and counts.
    """
    n = len(payloads)
    nc: NATS = await nats.connect(spec.url.split(","), name="bench-paced-js")
    js = nc.jetstream(publish_async_max_pending=spec.window)
    loop = asyncio.get_running_loop()
    sent = [0.0] * n
    seq_of = [0] * n
    acked_at: dict[int, float] = {}
    counts = {"pubacks": 0, "errors": 0}
    wanted: set[int] = set()
    waiting = False
    done: asyncio.Future[None] = loop.create_future()

    async def on_ack(msg: Msg) -> None:
        now = time.monotonic()
        if msg.data:  # +WPI, -NAK, +TERM: not an ack
            return
        seq = _ack_stream_seq(msg.subject)
        acked_at.setdefault(seq, now)
        if waiting:
            wanted.discard(seq)
            if not wanted and not done.done():
                done.set_result(None)

    def on_puback(i: int, fut: asyncio.Future[Any]) -> None:
        counts["pubacks"] += 1
        if fut.cancelled() or fut.exception() is not None:
            counts["errors"] += 1
        else:
            seq_of[i] = fut.result().seq

    await nc.subscribe(spec.ack_subject, cb=on_ack)
    await nc.flush()
    await _wait_for_go()
    subject = spec.subject

    async def send(i: int) -> None:
        sent[i] = time.monotonic()
        fut = await js.publish_async(subject, payloads[i])
        fut.add_done_callback(functools.partial(on_puback, i))

    t0, t_end = await _pace(n, spec.rate, send)
    timed_out = False
    deadline = t_end + spec.timeout
    try:
        await asyncio.wait_for(js.publish_async_completed(), spec.timeout)
        wanted.update(s for s in seq_of if s and s not in acked_at)
        waiting = True
        if wanted:
            await asyncio.wait_for(done, max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        timed_out = True
    await nc.close()
    latencies = [
        (acked_at[q] - s) * 1000 for s, q in zip(sent, seq_of, strict=True) if q in acked_at
    ]
    replies = sum(1 for q in seq_of if q in acked_at)
    achieved = n / (t_end - t0) if t_end > t0 else math.nan
    return PacedResult(n, n, replies, counts["errors"], achieved, latencies, timed_out)


async def paced_role(spec: PacedSpec) -> PacedResult:
    """Send the payloads at a fixed rate; every ``sample_every``-th one as a request.

    The sampled messages carry a reply subject and are answered after commit; the
    others are plain publishes, as a feed's would be, and share batches with the
    sampled ones. Sampling keeps the reply traffic (which costs the service about as
    much as a message) from changing the load being measured. The send time is
    taken just before ``publish``, so reply arrival minus send time is an upper
    bound of publish→commit.

    Args:
        spec: what, where and how fast.

    Returns:
        Per-message latencies in ms (replied messages only) and counts.
    """
    payloads = load_payloads(spec.payloads)[spec.start : spec.stop or None]
    if spec.mode == JETSTREAM:
        return await _paced_jetstream(spec, payloads)
    n = len(payloads)
    every = max(1, spec.sample_every)
    # The last message is always sampled: its reply means every message is committed.
    sampled = [i % every == 0 or i == n - 1 for i in range(n)]
    expected = sum(sampled)
    nc: NATS = await nats.connect(spec.url.split(","), name="bench-paced")
    loop = asyncio.get_running_loop()
    inbox = nc.new_inbox()
    sent = [0.0] * n
    got = [math.nan] * n
    done: asyncio.Future[None] = loop.create_future()
    counts = {"replies": 0, "errors": 0}

    async def on_reply(msg: Msg) -> None:
        now = time.monotonic()
        counts["replies"] += 1
        if _is_error_reply(msg):
            counts["errors"] += 1  # refused (e.g. 503 at the hard mark): no latency
        else:
            got[int(msg.subject.rpartition(".")[2])] = now
        if counts["replies"] >= expected and not done.done():
            done.set_result(None)

    await nc.subscribe(inbox + ".*", cb=on_reply)
    await nc.flush()
    await _wait_for_go()
    subject = spec.subject

    async def send(i: int) -> None:
        if sampled[i]:
            sent[i] = time.monotonic()
            await nc.publish(subject, payloads[i], reply=f"{inbox}.{i}")
        else:
            await nc.publish(subject, payloads[i])

    t0, t_end = await _pace(n, spec.rate, send)
    timed_out = False
    try:
        await asyncio.wait_for(done, spec.timeout)
    except TimeoutError:
        timed_out = True
    await nc.close()
    latencies = [(g - s) * 1000 for s, g in zip(sent, got, strict=True) if not math.isnan(g)]
    achieved = n / (t_end - t0) if t_end > t0 else math.nan
    # ``messages`` counts the sampled requests, the ones a reply is owed for.
    return PacedResult(
        n, expected, counts["replies"], counts["errors"], achieved, latencies, timed_out
    )


async def bare_subscriber_role(spec: SubscriberSpec) -> SubscriberResult:
    """Count messages on the write subject and nothing else (ceiling A).

    Requests (the flow-control messages) are answered on receipt. Stops when the
    orchestrator writes a line on stdin (or closes it).

    Args:
        spec: where to listen.

    Returns:
        Messages counted and slow-consumer errors seen.
    """
    result = SubscriberResult(0, 0)

    async def on_error(exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            result.slow_consumer_errors += 1

    nc: NATS = await nats.connect(
        spec.url.split(","), name="bench-bare-subscriber", error_cb=on_error
    )

    async def count(msg: Msg) -> None:
        result.messages += 1
        if msg.reply:
            await nc.publish(msg.reply, b"")

    await nc.subscribe(spec.subject, queue=spec.queue, cb=count)
    await nc.flush()
    print(_READY, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await nc.drain()
    return result


class _PageReply(msgspec.Struct):
    """A query reply; the records are counted, not decoded."""

    records: list[msgspec.Raw]
    next_cursor: str | None = None


class _LatestReply(msgspec.Struct):
    """A latest reply; the records are counted, not decoded."""

    records: list[msgspec.Raw]


async def query_load_role(spec: QueryLoadSpec) -> QueryLoadResult:
    """Ask the read API at fixed rates (or closed-loop) until told to stop.

    After ``GO``, every worker runs (see :class:`QueryLoadSpec`) until ``STOP`` (or
    the end of stdin); a request under way then gets its reply (or its time-out)
    first. Reply bodies are checked and their records counted with msgspec
    (``msgspec.Raw`` records: counted, not decoded), so the client costs the shared
    cores little.

    Args:
        spec: where, what and how fast.

    Returns:
        What each worker did, and the seconds the load ran.
    """
    nc: NATS = await nats.connect(spec.url.split(","), name="bench-query-load")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    page_decoder = msgspec.json.Decoder(_PageReply)
    latest_decoder = msgspec.json.Decoder(_LatestReply)
    encode = msgspec.json.encode
    slots = asyncio.Semaphore(max(1, spec.in_flight))

    async def ask(w: WorkerResult, subject: str, body: bytes) -> Msg | None:
        """One request; its latency and errors go to ``w``; None when it failed."""
        try:
            async with slots:
                w.requests += 1
                sent = time.monotonic()
                msg = await nc.request(subject, body, timeout=spec.timeout)
        except nats.errors.TimeoutError:
            reason = "timeout"
        except nats.errors.NoRespondersError:
            reason = "no_responders"
        except nats.errors.Error:
            reason = "nats_error"
        else:
            code = (msg.headers or {}).get("Nats-Service-Error-Code")
            if code is None:
                w.latencies_ms.append((time.monotonic() - sent) * 1000)
                w.ok += 1
                return msg
            reason = code
        w.errors[reason] = w.errors.get(reason, 0) + 1
        return None

    def schedule(rate: float, index: int, count: int, t0: float) -> Callable[[], Awaitable[None]]:
        """The wait before each request of worker ``index`` of ``count`` (from ``t0``)."""
        if rate < 0:

            async def closed_loop() -> None:
                await asyncio.sleep(0)

            return closed_loop
        interval = count / rate
        due = [t0 + index / rate]

        async def paced() -> None:
            delay = due[0] - time.monotonic()
            due[0] += interval
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)

        return paced

    async def page_worker(w: WorkerResult, wait: Callable[[], Awaitable[None]]) -> None:
        base: dict[str, Any] = {
            "symbol": w.symbols[0] if len(w.symbols) == 1 else w.symbols,
            "start": spec.start,
            "end": spec.end,
            "limit": spec.limit,
        }
        cursor: str | None = None
        in_pass = 0
        while True:
            await wait()
            if stop.is_set():
                return
            body = base if cursor is None else {**base, "cursor": cursor}
            msg = await ask(w, spec.query_subject, encode(body))
            if msg is None:
                await asyncio.sleep(ERROR_PAUSE_S)
                continue  # the same page again at the next turn
            try:
                page = page_decoder.decode(msg.data)
            except msgspec.DecodeError:
                w.errors["bad_reply"] = w.errors.get("bad_reply", 0) + 1
                cursor, in_pass = None, 0
                continue
            w.records += len(page.records)
            in_pass += len(page.records)
            cursor = page.next_cursor
            if cursor is None:
                w.passes.append(in_pass)
                in_pass = 0

    async def latest_worker(w: WorkerResult, wait: Callable[[], Awaitable[None]]) -> None:
        body = encode({"symbol": spec.latest_symbols})
        while True:
            await wait()
            if stop.is_set():
                return
            msg = await ask(w, spec.latest_subject, body)
            if msg is None:
                await asyncio.sleep(ERROR_PAUSE_S)
                continue
            try:
                w.records += len(latest_decoder.decode(msg.data).records)
            except msgspec.DecodeError:
                w.errors["bad_reply"] = w.errors.get("bad_reply", 0) + 1

    async def watch_stdin() -> None:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line or line.strip() == _STOP:
                stop.set()
                return

    await nc.flush()
    await _wait_for_go()
    t0 = time.monotonic()
    cpu0 = time.process_time()
    tasks: list[asyncio.Task[None]] = []
    workers: list[WorkerResult] = []
    if spec.query_rate:
        for i, symbols in enumerate(spec.page_chains):
            w = WorkerResult("query", list(symbols))
            wait = schedule(spec.query_rate, i, len(spec.page_chains), t0)
            tasks.append(asyncio.create_task(page_worker(w, wait)))
            workers.append(w)
    if spec.latest_rate:
        for i in range(spec.latest_workers):
            w = WorkerResult("latest", list(spec.latest_symbols))
            wait = schedule(spec.latest_rate, i, spec.latest_workers, t0)
            tasks.append(asyncio.create_task(latest_worker(w, wait)))
            workers.append(w)
    watcher = asyncio.create_task(watch_stdin())
    await asyncio.gather(*tasks)
    seconds = time.monotonic() - t0
    cpu = time.process_time() - cpu0
    await watcher
    await nc.close()
    return QueryLoadResult(seconds, workers, cpu)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one role and print its result as a JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    roles = parser.add_mutually_exclusive_group(required=True)
    for role in ("--publisher", "--paced", "--bare-subscriber", "--query-load"):
        roles.add_argument(role, metavar="SPEC")
    args = parser.parse_args(argv)
    result: msgspec.Struct
    if args.publisher:
        result = uvloop.run(publisher_role(msgspec.json.decode(args.publisher, type=PublisherSpec)))
    elif args.paced:
        result = uvloop.run(paced_role(msgspec.json.decode(args.paced, type=PacedSpec)))
    elif args.query_load:
        spec_q = msgspec.json.decode(args.query_load, type=QueryLoadSpec)
        result = uvloop.run(query_load_role(spec_q))
    else:
        spec = msgspec.json.decode(args.bare_subscriber, type=SubscriberSpec)
        result = uvloop.run(bare_subscriber_role(spec))
    print(msgspec.json.encode(result).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
