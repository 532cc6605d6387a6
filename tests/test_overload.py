"""Beyond capacity on a busy machine: the real ``store-svc run`` flooded flat out while
another process burns a core; health must answer within a probe's timeout throughout,
a write must be stored afterwards, and every record must be accounted for."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.overload import FloodConfig, FloodResult, make_trades, run_flood
from store_svc.devtools.natsserver import NatsServer

from .conftest import FAULT_REPORT

pytestmark = pytest.mark.slow

FLOOD = 300_000


@pytest.fixture
def js_server(tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer(store_dir=tmp_path / "jetstream") as server:
        yield server


def flood(tmp_path: Path, server: NatsServer, mode: str, stall_s: float = 0.0) -> FloodResult:
    assert server.proc is not None
    cfg = FloodConfig(mode=mode, messages=FLOOD, burn_s=90.0, probe_timeout_s=1.0, stall_s=stall_s)
    res = run_flood(tmp_path, server.url, server.proc.pid, cfg, make_trades(FLOOD + 1, 1))
    out = res.as_dict()
    FAULT_REPORT.append(
        f"flood ({mode}, a core busy): published {res.published_records}, committed "
        f"{res.committed}, dropped {res.dropped_msgs}, refused {res.refused_msgs}, "
        f"unaccounted {res.unaccounted}; health p50/p99/max {out['health_ms']['p50']:.1f}/"
        f"{out['health_ms']['p99']:.1f}/{out['health_ms']['max']:.1f} ms over "
        f"{out['probes']} probes, {res.probe_missed + res.probe_missed_outside} missed"
    )
    return res


def assert_answered_throughout(res: FloodResult) -> None:
    # Every health request, during the flood and around it, answered within 1 s.
    assert res.probe_missed == 0, res.as_dict()
    assert res.probe_missed_outside == 0, res.as_dict()
    assert len(res.probe_ms) >= 10, "the flood was too short to probe"
    assert max(res.probe_ms) < 1000
    assert res.service_exit["exit_code"] == 0, res.service_exit
    nats = res.stats["nats"]
    for role in ("ingest", "control"):
        assert nats[role]["faults"] == 0, nats


def test_a_core_flood_leaves_health_answering_and_every_record_counted(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    # One publisher no longer outruns the store (its intake takes single records as
    # fast as one or two publishers send them): the database stalls for 3 s at the
    # start, so the queue and the client's buffer fill and overflow behind it.
    res = flood(tmp_path, nats_server, "core", stall_s=3.0)
    assert_answered_throughout(res)
    assert res.published_records == FLOOD
    # Beyond capacity: the backlog showed in health (feedback soft or hard).
    assert res.probe_states.get("degraded", 0) > 0, res.probe_states
    # Published = stored + counted drops (slow consumer, refused at hard, rejected).
    assert res.settled, res.as_dict()
    assert res.unaccounted == 0, res.as_dict()
    assert res.stats["nats"]["ingest"]["server_closed"] == 0
    # A request-reply write after the flood is stored; the database agrees.
    assert res.after_write["code"] is None, res.after_write
    assert res.after_write["body"]["accepted"] == 1
    assert res.rows == res.committed + 1


def test_a_jetstream_flood_leaves_health_answering_and_loses_nothing(
    tmp_path: Path, js_server: NatsServer
) -> None:
    res = flood(tmp_path, js_server, "jetstream")
    assert_answered_throughout(res)
    assert res.settled, res.as_dict()
    # Every message the stream took is committed, and the stream has nothing left.
    assert res.stream_seq == FLOOD
    assert res.stream_left == 0
    assert res.committed == FLOOD
    assert res.dropped_msgs == 0
    # A write after the flood is taken by the stream (its PubAck) and then stored.
    assert res.after_write["body"]["seq"] == FLOOD + 1, res.after_write
    assert res.rows == FLOOD + 1
