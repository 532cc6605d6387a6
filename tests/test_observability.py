"""The Prometheus alerts, the Grafana dashboard and the compose profile that runs them.

The rules pass ``promtool check rules`` and their own unit tests
(``promtool test rules``); every metric the rules and the dashboard name is
exposed by a live service; the compose profile mounts what exists.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from nats.aio.client import Client as NATS
from prometheus_client.parser import text_string_to_metric_families

from store_svc.devtools.natsserver import NatsServer
from store_svc.runtime.service import StoreService
from store_svc.settings import Settings, load_settings

from .conftest import connected, until
from .redis_server import RedisServer
from .test_admin import TOKEN, bearer, control
from .test_bad_input import trade

ROOT = Path(__file__).parents[1]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "market-data-store.json"
METRIC = re.compile(r"\bstore_[a-z_]+\b")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; .ci/run does)")
    return found


def rule_expressions() -> dict[str, str]:
    doc = yaml.safe_load(ALERTS.read_text())
    return {r["alert"]: r["expr"] for g in doc["groups"] for r in g["rules"]}


def dashboard_expressions() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]


def named_metrics() -> set[str]:
    exprs = [*rule_expressions().values(), *dashboard_expressions()]
    return {name for e in exprs for name in METRIC.findall(e)}


@pytest.mark.logic
def test_the_alerts_cover_what_operators_need() -> None:
    alerts = rule_expressions()
    assert set(alerts) >= {
        "StoreDown",
        "StoreNoneUp",
        "StoreNotReady",
        "StoreFeedbackHard",
        "StoreCommitsFailing",
        "StoreSlowConsumerDrops",
        "StoreDlqRate",
        "StoreJetStreamRedeliveriesRising",
        "StoreNatsReconnects",
    }
    tested = {
        case["alertname"]
        for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert tested == set(alerts), "each alert has a unit test in which it fires"


def test_promtool_checks_the_rules() -> None:
    out = subprocess.run(
        [promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rule_expressions())} rules found" in out.stdout


def test_promtool_runs_the_alert_unit_tests() -> None:
    out = subprocess.run(
        [promtool(), "test", "rules", ALERT_TESTS.name],
        capture_output=True,
        text=True,
        check=False,
        cwd=ALERT_TESTS.parent,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_checks_the_compose_prometheus_config(tmp_path: Path) -> None:
    # The config names the rule file where compose mounts it; check it against the real one.
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    config["rule_files"] = [str(ALERTS)]
    copy = tmp_path / "prometheus.yml"
    copy.write_text(yaml.safe_dump(config))
    out = subprocess.run(
        [promtool(), "check", "config", str(copy)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.logic
def test_the_dashboard_shows_each_part_of_the_service() -> None:
    doc = json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in doc["panels"]}
    for wanted in (
        "Records received per kind",
        "Queue depth",
        "Feedback level (Core BackpressureLevel)",
        "Commit latency",
        "Batch size",
        "Rejects by reason (to the DLQ)",
        "Drops and refusals",
        "Sink errors",
        "Queries by endpoint and outcome",
        "Query latency",
        "JetStream messages by outcome",
        "Health per component (Core HealthComponent.state)",
    ):
        assert wanted in titles
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in doc["templating"]["list"]} == {"datasource", "instance"}
    for expr in dashboard_expressions():
        assert METRIC.search(expr), expr
        assert 'instance=~"$instance"' in expr, expr


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def exposed(text: str) -> set[str]:
    """Every series name a scrape can hold, by each family's type (also empty ones)."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "gauge": ("",),
        "summary": ("_count", "_sum", ""),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(s.name for s in family.samples)
    return names


@pytest.fixture
def js_server(tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer(store_dir=tmp_path / "jetstream") as server:
        yield server


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


async def test_every_metric_the_rules_and_dashboard_name_is_exposed(
    js_server: NatsServer, redis_server: RedisServer, db_path: Path
) -> None:
    """A JetStream-mode service with Redis feedback exposes every family they name."""
    settings = load_settings(
        nats_url=js_server.url,
        database_url=f"sqlite:///{db_path}",
        ingest_mode="jetstream",
        metrics_port=0,
        feedback_redis_url=redis_server.url,
        feedback_heartbeat_s=0.2,
    )
    async with StoreService(settings) as svc, connected(js_server.url) as nc:
        js = nc.jetstream()
        await js.publish("mdp.store.write.trades", json.dumps(trade()).encode())
        await until(lambda: svc.stats.js_acked == 1)
        reply = await nc.request("mdp.store.latest.trades", b'{"symbols": ["AAPL"]}', timeout=5)
        assert json.loads(reply.data)
        assert svc.redis_feedback is not None
        redis_feedback = svc.redis_feedback
        await until(lambda: redis_feedback.published >= 2)
        port = svc.metrics.port
        assert port
        text = await asyncio.to_thread(_scrape, port)
    names = exposed(text)
    missing = sorted(named_metrics() - names)
    assert not missing, f"named in deploy/ but not exposed: {missing}"
    values = samples(text)
    assert values[("store_ready", ())] == 1
    assert values[("store_health_state", (("component", "service"),))] == 0
    assert values[("store_health_state", (("component", "feedback-redis"),))] == 0
    assert values[("store_jetstream_messages_total", (("outcome", "acked"),))] == 1
    assert values[("store_feedback_redis_up", ())] == 1
    assert values[("store_feedback_events_total", (("outlet", "redis"),))] >= 2
    assert values[("store_feedback_events_total", (("outlet", "nats"),))] >= 2
    assert values[("store_nats_reconnects_total", (("connection", "ingest"),))] == 0


async def test_store_ready_and_health_follow_a_pause(
    make_settings: Callable[..., Settings], client: NATS
) -> None:
    async with StoreService(make_settings(metrics_port=0, admin_token=TOKEN)) as svc:
        port = svc.metrics.port
        assert port
        before = samples(await asyncio.to_thread(_scrape, port))
        await control(client, "pause", bearer())
        svc.snapshot.refresh()
        paused = samples(await asyncio.to_thread(_scrape, port))
    assert before[("store_ready", ())] == 1
    assert before[("store_health_state", (("component", "intake"),))] == 0
    assert paused[("store_ready", ())] == 0
    assert paused[("store_health_state", (("component", "intake"),))] == 1
    assert paused[("store_health_state", (("component", "service"),))] == 1


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


@pytest.mark.logic
def test_the_observability_profile_mounts_what_exists() -> None:
    services = compose()["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["profiles"] == grafana["profiles"] == ["observability"]
    assert "profiles" not in services["store"], "the store runs without the profile"
    for service in (prometheus, grafana):
        for volume in service["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"]}
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"
    assert mounts[config["rule_files"][0]] == "./deploy/prometheus/alerts.yml"
    # Prometheus scrapes the port the store serves its metrics on.
    port = int(services["store"]["environment"]["STORE_METRICS_PORT"])
    [job] = config["scrape_configs"]
    assert job["job_name"] == "market-data-store"  # the job StoreDown watches
    assert job["dns_sd_configs"][0]["port"] == port
    assert job["dns_sd_configs"][0]["names"] == ["store"]
    # Grafana's provider reads the folder the dashboard is mounted into.
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/market-data-store.yml").read_text()
    )
    folder = provider["providers"][0]["options"]["path"]
    gmounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert gmounts[f"{folder}/market-data-store.json"] == "./deploy/grafana/market-data-store.json"
    datasource = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert 'up{job="market-data-store"}' in rule_expressions()["StoreDown"]
