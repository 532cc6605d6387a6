"""Prometheus metrics scraped over HTTP from a running service."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable

from nats.aio.client import Client as NATS
from prometheus_client.parser import text_string_to_metric_families

from store_svc.runtime.service import StoreService
from store_svc.settings import Settings

from .conftest import until
from .test_bad_input import barrier, trade


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_metrics_endpoint_reports_the_pipeline(
    make_settings: Callable[..., Settings], client: NATS
) -> None:
    async with StoreService(make_settings(metrics_port=0)) as svc:
        port = svc.metrics.port
        assert port
        await client.publish(
            "mdp.store.write.trades",
            json.dumps([trade(symbol="A"), trade(price="NaN"), trade(symbol="B")]).encode(),
        )
        await client.publish("mdp.store.write.candles", b"{}")
        await barrier(client)
        await until(lambda: svc.stats.batches >= 1)
        m = await asyncio.to_thread(scrape, port)
    assert m[("store_records_committed_total", (("kind", "trades"),))] == 3
    assert m[("store_records_received_total", (("kind", "trades"),))] == 4
    assert m[("store_records_rejected_total", (("kind", "trades"),))] == 1
    assert m[("store_records_rejected_total", (("kind", "unknown"),))] == 1
    assert m[("store_records_rejected_by_reason_total", (("reason", "non_finite_number"),))] == 1
    assert m[("store_records_rejected_by_reason_total", (("reason", "unknown_kind"),))] == 1
    assert m[("store_queue_depth", ())] == 0
    assert m[("store_queue_capacity", ())] == 100_000
    assert m[("store_backpressure_level", ())] == 0
    assert m[("store_sink_up", ())] == 1
    assert m[("store_batch_records_count", ())] >= 1
    assert m[("store_batch_records_sum", ())] == 3
    assert m[("store_commit_seconds_count", ())] >= 1
    assert ("store_messages_dropped_total", ()) not in m


async def test_no_port_no_endpoint(service: StoreService) -> None:
    assert service.metrics.port is None
