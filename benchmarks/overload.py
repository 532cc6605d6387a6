"""A flood beyond capacity against the real ``store-svc run``, with health probed
throughout and every record accounted for.

Used by ``bench_overload.py`` (which reports the figures) and by
``tests/test_overload.py`` (which holds the service to its promises under a flood):

* the service runs as its own process on defaults (``STORE_*`` of the caller removed);
* one or more publisher processes send unique trades flat out (``ingest_roles.py``):
  core mode with no flow control but a request at the very end, JetStream mode with
  asynchronous publishes acknowledged by the stream;
* optionally a process burns one core for a bounded time (a busy machine);
* a prober in this process asks ``<prefix>.store.health`` every ``probe_every_s``
  with a timeout of ``probe_timeout_s`` and records every latency and every miss;
* at the end the counts must add up: core mode, records published = committed +
  dropped as a slow consumer + refused at the hard mark + rejected; JetStream mode,
  committed = messages the stream took, and the stream is empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS

from benchmarks.ingest_infra import (
    CpuMeter,
    FlowControl,
    LoopThread,
    ServiceProcess,
    count_stored,
    jetstream_state,
    run_publishers,
    service_settings,
    summarize,
)
from benchmarks.ingest_roles import CORE, JETSTREAM, save_payloads
from store_svc.devtools.demo import synthetic_records

__all__ = ["FloodConfig", "FloodResult", "make_trades", "run_flood"]

#: A process that keeps one core busy until its time is up (then exits by itself).
BURN = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\n" + (
    "while time.monotonic() < end:\n    pass\n"
)

SUBJECT = "mdp.store.write.trades"
SRV_STATS = "$SRV.STATS.market-data-store"


@dataclass(frozen=True)
class FloodConfig:
    """One flood.

    Attributes:
        mode: ``core`` or ``jetstream``.
        messages: messages published in all.
        per_msg: trades per message (1: a bare object).
        publishers: publisher processes sharing the messages.
        burn_s: seconds a second process burns one core (0: none); it starts with
            the flood and ends by itself.
        probe_every_s: how often health is asked.
        probe_timeout_s: how long one health request may take before it counts as
            missed (the usual liveness probe timeout is 1 s).
        settle_s: how long the counts may stay unchanged before the run gives up
            waiting for them to add up.
        stall_s: seconds the database's write lock is held from the flood's start (a
            stalled disk or a long checkpoint): the queue and the client's buffer
            fill behind it, beyond what the store can take at any rate.
    """

    mode: str = CORE
    messages: int = 300_000
    per_msg: int = 1
    publishers: int = 1
    burn_s: float = 0.0
    probe_every_s: float = 0.05
    probe_timeout_s: float = 1.0
    settle_s: float = 20.0
    stall_s: float = 0.0


@dataclass
class FloodResult:
    """What one flood did, with the accounting of its records."""

    config: FloodConfig
    published_records: int = 0
    published_msgs: int = 0
    publish_s: float = 0.0
    committed: int = 0
    rows: int = 0
    dropped_msgs: int = 0
    refused_msgs: int = 0
    rejected: int = 0
    stream_seq: int | None = None
    stream_left: int | None = None
    settled: bool = False
    settle_s: float = 0.0
    settled_at: float = 0.0
    #: Health latencies (ms) of the probes sent during the flood, and those missed.
    probe_ms: list[float] = field(default_factory=list)
    probe_missed: int = 0
    #: The same before and after the flood (the service idle).
    probe_ms_outside: list[float] = field(default_factory=list)
    probe_missed_outside: int = 0
    probe_states: dict[str, int] = field(default_factory=dict)
    #: The service's event-loop lag (ms) as reported in health during the flood.
    loop_lag_ms: list[float] = field(default_factory=list)
    after_write: dict[str, Any] = field(default_factory=dict)
    service_cpu_s: float = 0.0
    nats_cpu_s: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    service_exit: dict[str, Any] = field(default_factory=dict)

    @property
    def unaccounted(self) -> int:
        """Records neither committed nor counted as dropped, refused or rejected
        (core mode), or taken by the stream and not committed (JetStream mode)."""
        if self.config.mode == JETSTREAM:
            return (self.stream_seq or 0) * self.config.per_msg - self.committed
        counted = (self.dropped_msgs + self.refused_msgs) * self.config.per_msg + self.rejected
        return self.published_records - self.committed - counted

    def probe_percentile(self, p: float, idle: bool = False) -> float | None:
        """The ``p``-th percentile (0-100) of the latency in ms of the probes answered
        during the flood (``idle``: before and after it)."""
        values = self.probe_ms_outside if idle else self.probe_ms
        if not values:
            return None
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]

    def as_dict(self) -> dict[str, Any]:
        """Plain values for a JSON report."""
        return {
            "mode": self.config.mode,
            "messages": self.config.messages,
            "per_msg": self.config.per_msg,
            "burn_s": self.config.burn_s,
            "published_records": self.published_records,
            "publish_s": round(self.publish_s, 3),
            "committed": self.committed,
            "rows": self.rows,
            "dropped_msgs": self.dropped_msgs,
            "refused_msgs": self.refused_msgs,
            "rejected": self.rejected,
            "stream_seq": self.stream_seq,
            "stream_left": self.stream_left,
            "unaccounted": self.unaccounted,
            "settled": self.settled,
            "settle_s": round(self.settle_s, 3),
            "probes": len(self.probe_ms) + self.probe_missed,
            "probe_missed": self.probe_missed,
            "probes_idle": len(self.probe_ms_outside) + self.probe_missed_outside,
            "probe_missed_idle": self.probe_missed_outside,
            "probe_states": self.probe_states,
            "health_ms": {
                "p50": self.probe_percentile(50),
                "p99": self.probe_percentile(99),
                "max": max(self.probe_ms) if self.probe_ms else None,
            },
            "loop_lag_ms_max": max(self.loop_lag_ms) if self.loop_lag_ms else None,
            "health_ms_idle": {
                "p50": self.probe_percentile(50, idle=True),
                "p99": self.probe_percentile(99, idle=True),
            },
            "after_write": self.after_write,
            "service_cpu_s": round(self.service_cpu_s, 3),
            "nats_cpu_s": round(self.nats_cpu_s, 3),
            "service_cpu_us_per_record": round(1e6 * self.service_cpu_s / self.committed, 2)
            if self.committed
            else None,
            "nats": self.stats.get("nats"),
            "service_exit": self.service_exit,
        }


def _stall(db: Path, seconds: float) -> threading.Thread:
    """Hold ``db``'s write lock for ``seconds`` from now, in a thread of its own."""
    locked = threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(db, isolation_level=None)
        try:
            conn.execute("BEGIN EXCLUSIVE")
            locked.set()
            time.sleep(seconds)
            conn.execute("ROLLBACK")
        finally:
            conn.close()
            locked.set()

    thread = threading.Thread(target=hold, name="stall", daemon=True)
    thread.start()
    locked.wait(10)
    return thread


def make_trades(n_msgs: int, per_msg: int, seed: int = 7) -> list[bytes]:
    """``n_msgs`` JSON messages of ``per_msg`` unique trades (1 µs apart, two days ago)."""
    rng = random.Random(seed)
    encode = msgspec.json.Encoder().encode
    first_ns = (time.time_ns() // 1000 - 2 * 86_400 * 1_000_000) * 1000
    out = []
    for i in range(n_msgs):
        recs = synthetic_records("trades", per_msg, rng, first_ns + i * per_msg * 1000)
        out.append(encode(recs[0] if per_msg == 1 else recs))
    return out


class _Prober:
    """Asks for health on a steady beat from a loop thread of this process."""

    def __init__(self, url: str, every: float, timeout: float) -> None:
        self.url = url
        self.every = every
        self.timeout = timeout
        #: (time.monotonic() when sent, latency in ms) of every answered probe.
        self.answered: list[tuple[float, float]] = []
        #: time.monotonic() of every probe that got no answer in time.
        self.missed: list[float] = []
        self.states: dict[str, int] = {}
        #: (time sent, the service's own event-loop lag in ms) from each health body:
        #: how late the loop ran a timer, as opposed to the machine's scheduling.
        self.lags: list[tuple[float, float]] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        nc: NATS = await nats.connect(self.url, name="flood-prober")
        loop = asyncio.get_running_loop()
        try:
            next_at = loop.time()
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    reply = await nc.request("mdp.store.health", b"", timeout=self.timeout)
                except (nats.errors.Error, TimeoutError):
                    self.missed.append(time.monotonic() - self.timeout)
                else:
                    took = time.perf_counter() - started
                    self.answered.append((time.monotonic() - took, took * 1000))
                    body = json.loads(reply.data)
                    state = str(body.get("state"))
                    for comp in body.get("components", []):
                        if comp.get("name") == "loop":
                            lag = float(comp["details"]["lag_ms"])
                            self.lags.append((time.monotonic() - took, lag))
                    self.states[state] = self.states.get(state, 0) + 1
                next_at += self.every
                delay = next_at - loop.time()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), delay)
                else:
                    next_at = loop.time()
        finally:
            await nc.close()

    def stop(self) -> None:
        self._stop.set()


async def _stats(url: str) -> dict[str, Any]:
    nc: NATS = await nats.connect(url, name="flood-stats")
    try:
        reply = await nc.request(SRV_STATS, b"", timeout=5)
        endpoints = json.loads(reply.data)["endpoints"]
        data: dict[str, Any] = next(e for e in endpoints if e["name"] == "health")["data"]
        return data
    finally:
        await nc.close()


async def _write_after(url: str, payload: bytes, deadline_s: float = 10.0) -> dict[str, Any]:
    """A request-reply write once the flood is over; retried while refused as busy."""
    nc: NATS = await nats.connect(url, name="flood-after")
    try:
        end = time.monotonic() + deadline_s
        while True:
            started = time.perf_counter()
            try:
                reply = await nc.request(SUBJECT, payload, timeout=5)
            except (nats.errors.Error, TimeoutError) as exc:
                out: dict[str, Any] = {"error": type(exc).__name__}
            else:
                code = (reply.headers or {}).get("Nats-Service-Error-Code")
                out = {"code": code, "body": json.loads(reply.data) if reply.data else None}
            out["ms"] = round((time.perf_counter() - started) * 1000, 2)
            if out.get("code") != "503" or time.monotonic() > end:
                return out
            await asyncio.sleep(0.2)
    finally:
        await nc.close()


def run_flood(
    workdir: Path, nats_url: str, nats_pid: int, cfg: FloodConfig, payloads: list[bytes]
) -> FloodResult:
    """Flood a fresh ``store-svc run`` (SQLite under ``workdir``) and account for it.

    Args:
        workdir: an empty folder for the database, the payload file and the log.
        nats_url: a running nats-server (with JetStream for ``jetstream`` mode).
        nats_pid: its process id (its CPU time is reported).
        cfg: the flood.
        payloads: ``cfg.messages`` messages (:func:`make_trades`), plus one more that
            is written with a request after the flood.

    Returns:
        The result; the caller judges it.
    """
    res = FloodResult(cfg)
    payload_file = workdir / "payloads.msgpack"
    save_payloads(payload_file, payloads[: cfg.messages])
    db_url = f"sqlite:///{workdir / 'store.db'}"
    settings = service_settings(nats_url, db_url, cfg.mode)
    svc = ServiceProcess(settings, workdir / "service.log")
    svc.start()
    lt = LoopThread()
    burner: subprocess.Popen[bytes] | None = None
    try:
        prober = _Prober(nats_url, cfg.probe_every_s, cfg.probe_timeout_s)
        probing = lt.submit(prober.run())
        meter = CpuMeter({"service": svc.pid, "nats": nats_pid})
        before = meter.read()
        if cfg.burn_s > 0:
            burner = subprocess.Popen([sys.executable, "-c", BURN, str(cfg.burn_s)])
        stall = _stall(workdir / "store.db", cfg.stall_s) if cfg.stall_s > 0 else None
        flow = (
            FlowControl(chunk=cfg.messages + 1, window=1)
            if cfg.mode == CORE
            else FlowControl(chunk=1, window=20_000)
        )
        # Core mode: the closing request may be dropped with the rest of the flood,
        # so its reply is not waited for long.
        results = run_publishers(
            nats_url,
            SUBJECT,
            payload_file,
            cfg.messages,
            cfg.mode,
            flow,
            cfg.publishers,
            timeout=5.0 if cfg.mode == CORE else 300.0,
        )
        if stall is not None:
            stall.join()
        thr = summarize(results, cfg.per_msg)
        res.published_msgs = thr.published_msgs
        res.published_records = thr.published_records
        res.publish_s = thr.publish_s
        _settle(lt, res, nats_url, settings, cfg)
        res.after_write = lt.run(_write_after(nats_url, payloads[cfg.messages]))
        res.stats = lt.run(_stats(nats_url))
        prober.stop()
        probing.result(30)
        # The flood lasts from the first publish until the counts add up.
        window = (thr.start, res.settled_at)
        res.probe_ms = [ms for at, ms in prober.answered if window[0] <= at <= window[1]]
        res.probe_missed = sum(1 for at in prober.missed if window[0] <= at <= window[1])
        res.probe_ms_outside = [
            ms for at, ms in prober.answered if not window[0] <= at <= window[1]
        ]
        res.probe_missed_outside = len(prober.missed) - res.probe_missed
        res.probe_states = prober.states
        res.loop_lag_ms = [lag for at, lag in prober.lags if window[0] <= at <= window[1]]
        used = CpuMeter.used(before, meter.read(), 1.0)["cpu_s"]
        res.service_cpu_s = used["service"]
        res.nats_cpu_s = used["nats"]
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()
        lt.close()
        res.service_exit = svc.stop()
    res.rows = count_stored(db_url, "trades")
    return res


def _settle(lt: LoopThread, res: FloodResult, url: str, settings: Any, cfg: FloodConfig) -> None:
    """Wait until the counts add up (or stay unchanged for ``cfg.settle_s``)."""
    started = time.monotonic()
    last: tuple[Any, ...] | None = None
    changed = started
    while True:
        data = lt.run(_stats(url))
        res.committed = int(data["rows_committed"])
        res.dropped_msgs = int(data["dropped"])
        res.refused_msgs = int(data["refused_overload"])
        res.rejected = int(data["rejected"])
        if cfg.mode == JETSTREAM:
            state = jetstream_state(url, settings)
            res.stream_seq = int(state.get("stream_last_seq", 0))
            res.stream_left = int(state.get("stream_messages_left", 0))
            done = res.stream_left == 0 and res.unaccounted == 0
        else:
            done = res.unaccounted == 0 and int(data["queue_depth"]) == 0
        now = time.monotonic()
        res.settled_at = now
        if done:
            res.settled = True
            res.settle_s = now - started
            return
        seen = (res.committed, res.dropped_msgs, res.refused_msgs, res.rejected, res.stream_left)
        if seen != last:
            last, changed = seen, now
        elif now - changed > cfg.settle_s:
            res.settle_s = now - started
            return
        time.sleep(0.1)
