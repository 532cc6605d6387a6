"""The ``rss-full-queue`` scenario of the ingest benchmark: the service's RSS at a full queue.

One service (default settings, core, SQLite) whose commits the harness stalls with a
lock on the SQLite file; 1000-record trade messages are published until feedback
said ``hard`` and the queue has no room for another; the RSS of the service tree is
read, the lock released, and every published record must get stored.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from typing import Any

import nats
from nats.aio.client import Client as NATS

from benchmarks.ingest_context import RunContext
from benchmarks.ingest_infra import (
    FeedbackCounter,
    RssSampler,
    ServiceProcess,
    delete_stream,
    probe_core,
    service_settings,
    shutdown_failure,
    wait_rows,
)
from benchmarks.ingest_roles import CORE
from benchmarks.ingest_scenarios import DEFAULTS, RSS_FULL_QUEUE, SQLITE, make_payloads
from store_svc.settings import Settings


def run_rss_full_queue(ctx: RunContext) -> dict[str, Any]:
    """``rss-full-queue``: the service tree's RSS with a full queue and stalled commits.

    The service (default settings, core, SQLite) starts; the harness takes the
    SQLite file's write lock (``BEGIN EXCLUSIVE``) so every commit waits (and fails
    after the writer's busy timeout, and is retried). 1000-record trade messages are
    published one at a time, each followed by health requests until the service has
    taken it (queue depth + batch in flight), until the feedback subject has said
    ``hard`` and the next message would not fit in the queue. The RSS of the tree is
    read (and sampled throughout); then the lock is released and every published
    record must get stored.
    """
    p = ctx.progress
    per_msg = 1000
    capacity = DEFAULTS.queue_capacity
    workdir = ctx.workroot / RSS_FULL_QUEUE
    workdir.mkdir()
    db_path = (workdir / "service.db").resolve()
    database_url = f"sqlite:///{db_path}"
    settings = service_settings(ctx.url, database_url)
    subject = settings.subject("store", "write", "trades")
    n_max = capacity // per_msg + 20
    p.phase(f"generating {n_max} messages x {per_msg} trades")
    payloads = make_payloads("trades", per_msg, n_max, ctx.ts.take(n_max * per_msg), seed=3)
    delete_stream(ctx.url, settings.js_stream)
    service = ServiceProcess(settings, workdir / "service.log")
    out: dict[str, Any] = {
        "name": RSS_FULL_QUEUE,
        "group": "rss",
        "mode": CORE,
        "sink": SQLITE,
        "records_per_msg": per_msg,
        "kind": "trades",
    }
    failures: list[str] = []
    sampler: RssSampler | None = None
    lock: sqlite3.Connection | None = None
    t_release: float | None = None
    result: dict[str, Any] = {"records_per_msg": per_msg, "capacity": capacity}
    try:
        p.phase("starting the service")
        service.start()
        asyncio.run(probe_core(ctx.url, subject, timeout=30.0))
        sampler = RssSampler([service.pid], ctx.preset.rss_interval).start()
        time.sleep(0.3)
        result["rss_mb_idle"] = sampler.sample() / 1e6
        lock = sqlite3.connect(db_path, isolation_level=None, timeout=30.0)
        lock.execute("BEGIN EXCLUSIVE")
        p.phase("filling the queue (commits blocked)")
        feedback = FeedbackCounter(ctx.lt, ctx.url, settings.subject("telemetry", "feedback"))
        feedback.start()
        try:
            fill = asyncio.run(_fill_queue(ctx.url, settings, subject, payloads, feedback))
        finally:
            fb = feedback.stop()
        service.check_alive()
        t_full = time.monotonic()
        time.sleep(1.0)  # let the allocator settle; the sampler keeps sampling
        result.update(fill)
        result["rss_mb_full"] = sampler.sample() / 1e6
        result["peak_rss_mb_full"] = sampler.peak_mb()
        result["feedback"] = fb
        p.log(
            f"queue {fill['queue_depth_full']:,}/{capacity:,} + {fill['in_flight_full']:,} in "
            f"flight, level {fill['level_full']}: RSS {result['rss_mb_full']:.0f} MB "
            f"(peak {result['peak_rss_mb_full']:.0f} MB)"
        )
        p.phase("releasing the lock, storing")
        lock.execute("ROLLBACK")
        lock.close()
        lock = None
        t_release = time.monotonic()
        published = fill["published_records"]
        stored = wait_rows(database_url, "trades", published, stall_timeout=30.0)
        result["store_after_release_s"] = time.monotonic() - t_release
        service.check_alive()
        result["stored"] = stored
        result["lost"] = published - stored
        result["seconds_full_before_release"] = t_release - t_full
    finally:
        if lock is not None:
            lock.close()
        p.phase("stopping")
        shutdown = service.stop()
        if sampler is not None:
            sampler.stop()
            if t_release is not None:
                result["peak_rss_mb_after_release"] = sampler.peak_mb(since=t_release)
        result["service_shutdown"] = shutdown
        out["rss_full_queue"] = result
    if shutdown["crashed"]:
        failures.append(shutdown_failure(f"{RSS_FULL_QUEUE}: service", shutdown))
    if result.get("lost"):
        failures.append(f"{RSS_FULL_QUEUE}: {result['lost']:,} records lost")
    if not result.get("hard_seen"):
        out["notes"] = ["feedback never reported hard while the queue filled"]
    out["failures"] = failures
    return out


async def _fill_queue(
    url: str,
    settings: Settings,
    subject: str,
    payloads: list[bytes],
    feedback: FeedbackCounter,
) -> dict[str, Any]:
    """Publish until ``hard`` was reported and the queue has no room for another message.

    Returns:
        What was published and the queue's state (from the health endpoint) then.
    """
    nc: NATS = await nats.connect(url.split(","), name="bench-fill")
    health_subject = settings.subject("store", "health")
    per_msg = len(json.loads(payloads[0]))
    published = 0
    at_hard: int | None = None
    queue: dict[str, Any] = {}

    async def queue_state() -> dict[str, Any]:
        reply = await nc.request(health_subject, b"", timeout=5.0)
        comps = {c["name"]: c for c in json.loads(reply.data)["components"]}
        d = comps["queue"]["details"]
        return {
            "depth": int(d["depth"]),
            "capacity": int(d["capacity"]),
            "in_flight": int(d["in_flight"]),
            "level": d["level"],
        }

    try:
        for payload in payloads:
            await nc.publish(subject, payload)
            await nc.flush()
            published += per_msg
            # Wait until the service has taken the message (or stays blocked).
            deadline = time.monotonic() + 2.0
            while True:
                queue = await queue_state()
                if queue["depth"] + queue["in_flight"] >= published:
                    break
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.01)
            if at_hard is None and (feedback.first_hard_at is not None or queue["level"] == "hard"):
                at_hard = published
            if at_hard is not None and queue["depth"] + per_msg > queue["capacity"]:
                break
        await asyncio.sleep(0.3)  # the last feedback events
        queue = await queue_state()
    finally:
        await nc.close()
    return {
        "published_msgs": published // per_msg,
        "published_records": published,
        "published_records_at_hard": at_hard,
        "hard_seen": feedback.first_hard_at is not None,
        "queue_depth_full": queue.get("depth"),
        "in_flight_full": queue.get("in_flight"),
        "level_full": queue.get("level"),
        "taken_by_service": queue.get("depth", 0) + queue.get("in_flight", 0),
    }
