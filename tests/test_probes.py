"""HTTP liveness and readiness beside the metrics, over real HTTP."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from store_svc.core import HealthStatus
from store_svc.runtime.service import StoreService
from store_svc.settings import Settings

from .conftest import until
from .test_bad_input import trade
from .test_ingest import locked


def get(port: int | None, path: str, method: str = "GET") -> tuple[int, bytes, float]:
    """One HTTP request; returns (status, body, seconds taken)."""
    assert port is not None
    started = time.monotonic()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read(), time.monotonic() - started
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), time.monotonic() - started


async def http_until(port: int | None, path: str, code: int) -> tuple[int, bytes]:
    """GET ``path`` until it answers ``code`` (the snapshot refreshes twice a second)."""
    async with asyncio.timeout(10):
        while True:
            got, body, _ = await asyncio.to_thread(get, port, path)
            if got == code:
                return got, body
            await asyncio.sleep(0.05)


def component_state(status: HealthStatus, name: str) -> str:
    return str(next(c for c in status.components if c.name == name).state)


async def test_healthz_and_readyz_answer_core_health_status(
    make_settings: Callable[..., Settings],
) -> None:
    async with StoreService(make_settings(metrics_port=0)) as svc:
        port = svc.metrics.port
        for path in ("/healthz", "/readyz"):
            code, body, _ = await asyncio.to_thread(get, port, path)
            assert code == 200, body
            status = HealthStatus.model_validate_json(body)
            assert status.service == "market-data-store"
            assert status.state == "healthy"
            assert component_state(status, "loop") == "healthy"
            assert component_state(status, "nats-ingest") == "healthy"
        code, body, _ = await asyncio.to_thread(get, port, "/metrics")
        assert code == 200
        assert b'store_nats_connected{connection="ingest"} 1.0' in body
        assert b'store_nats_faults_total{connection="control"} 0.0' in body
        code, _, _ = await asyncio.to_thread(get, port, "/healthz", "POST")
        assert code == 405


async def test_readyz_is_503_with_the_status_while_the_database_fails(
    make_settings: Callable[..., Settings], client: NATS, db_path: Path
) -> None:
    async with StoreService(make_settings(metrics_port=0, sink_retry_max_s=0.2)) as svc:
        port = svc.metrics.port
        with locked(db_path):
            await client.publish("mdp.store.write.trades", json.dumps(trade()).encode())
            await until(lambda: svc.stats.sink_errors >= 1, timeout=20)
            code, body = await http_until(port, "/readyz", 503)
            status = HealthStatus.model_validate_json(body)
            assert status.state == "unhealthy"
            assert component_state(status, "sink") == "unhealthy"
            # Liveness: a database outage is waited out, not restarted away.
            code, body, _ = await asyncio.to_thread(get, port, "/healthz")
            assert code == 200
            assert HealthStatus.model_validate_json(body).state == "unhealthy"
        await until(lambda: svc.batcher.sink_ok, timeout=20)


async def test_healthz_turns_unhealthy_while_the_loop_is_stuck_and_http_still_answers(
    make_settings: Callable[..., Settings],
) -> None:
    async with StoreService(make_settings(metrics_port=0, loop_stall_s=1.0)) as svc:
        port = svc.metrics.port
        with concurrent.futures.ThreadPoolExecutor(2) as pool:

            def during_the_stall() -> list[tuple[int, bytes, float]]:
                time.sleep(1.8)
                return [get(port, "/healthz"), get(port, "/readyz")]

            answers = pool.submit(during_the_stall)
            # The test hook: block the event loop for longer than STORE_LOOP_STALL_S.
            time.sleep(3.0)  # noqa: ASYNC251
            results = answers.result(timeout=10)
        for code, body, took in results:
            assert code == 503
            assert took < 1.0  # answered from the HTTP thread, not the stuck loop
            status = HealthStatus.model_validate_json(body)
            assert status.state == "unhealthy"
            loop = next(c for c in status.components if c.name == "loop")
            assert loop.state == "unhealthy"
            assert float(loop.details["stalled_for_s"]) > 1.0
        # The loop runs again: the next refresh makes the service live again.
        code, body = await http_until(port, "/healthz", 200)
        status = HealthStatus.model_validate_json(body)
        assert component_state(status, "loop") == "healthy"


async def test_a_failing_health_build_is_logged_not_taken_for_a_stuck_loop(
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with StoreService(make_settings(metrics_port=0, loop_stall_s=1.0)) as svc:
        port = svc.metrics.port

        def broken(svc: StoreService) -> HealthStatus:
            raise RuntimeError("a bug in health")

        monkeypatch.setattr("store_svc.control.health.health_status", broken)
        # Longer than the stall limit, with every refresh failing meanwhile.
        await asyncio.sleep(1.5)
        code, body, _ = await asyncio.to_thread(get, port, "/healthz")
        assert code == 200  # the loop is alive: the last good status, freshly dated
        assert HealthStatus.model_validate_json(body).state == "healthy"
        assert caplog.text.count("building the health snapshot failed") == 1
        # Leaving the block stops the service, which refreshes the snapshot too: the
        # failure must not abort the shutdown.
    assert svc.status.value == "stopped"
