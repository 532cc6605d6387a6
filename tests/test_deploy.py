"""docker-compose.yml and the Dockerfile refer only to settings and commands that exist.

No Docker engine runs here, so the files are parsed and checked, not run.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from store_svc.cli import build_parser
from store_svc.constants import STOP_OVERRUN_S
from store_svc.runtime.watchdog import BACKSTOP_S
from store_svc.settings import Settings, load_settings

pytestmark = pytest.mark.logic

ROOT = Path(__file__).parents[1]
KNOWN_ENV = {f"STORE_{name.upper()}" for name in Settings.model_fields} | {"ADMIN_TOKEN"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def store_args(command: list[str] | str) -> list[str]:
    """The store-svc arguments of a compose command or health check."""
    args = shlex.split(command) if isinstance(command, str) else list(command)
    if args and args[0] in ("CMD", "CMD-SHELL"):
        args = args[1:]
    if args and args[0] == "store-svc":
        args = args[1:]
    return args


def test_services_and_volumes(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"nats", "timescaledb", "store", "prometheus", "grafana"}
    assert compose["services"]["nats"]["image"].startswith("nats:")
    assert "--jetstream" in compose["services"]["nats"]["command"]
    assert compose["services"]["timescaledb"]["image"].startswith("timescale/timescaledb")
    assert set(compose["volumes"]) == {"nats-data", "pg-data", "prometheus-data", "grafana-data"}


def test_store_command_and_health_check_are_real_cli_commands(compose: dict[str, Any]) -> None:
    store = compose["services"]["store"]
    parser = build_parser()
    parser.parse_args(store_args(store["command"]))
    health = store_args(store["healthcheck"]["test"])
    assert health[0] in ("health", "ready")
    parser.parse_args(health)


def test_store_environment_names_are_settings(compose: dict[str, Any]) -> None:
    env = compose["services"]["store"]["environment"]
    unknown = set(env) - KNOWN_ENV
    assert not unknown, f"not settings: {unknown}"
    values = {
        k.removeprefix("STORE_").lower(): v
        for k, v in env.items()
        if not str(v).startswith("${") and k != "ADMIN_TOKEN"
    }
    settings = load_settings(**values)  # the compose values pass validation
    assert settings.database_url.startswith("postgresql://")
    host = re.search(r"@([\w-]+):", settings.database_url)
    assert host is not None
    assert host.group(1) in compose["services"], "the database host is a compose service"
    assert settings.nats_url == "nats://nats:4222"


def test_stop_grace_covers_the_shutdown_grace_and_the_watchdog(
    compose: dict[str, Any], cluster_compose: dict[str, Any]
) -> None:
    """The container is killed only after a hung stop has said where it hung (and
    after the watchdog's own backstop)."""
    shutdown = Settings.model_fields["shutdown_grace_s"].default
    stores = [compose["services"]["store"]]
    stores += [v for k, v in cluster_compose["services"].items() if k.startswith("store")]
    assert len(stores) == 3
    for store in stores:
        grace = int(store["stop_grace_period"].rstrip("s"))
        assert grace > shutdown + STOP_OVERRUN_S + BACKSTOP_S


def test_dockerfile_runs_the_cli() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["store-svc"]' in text
    assert 'CMD ["run"]' in text
    check = re.search(r"HEALTHCHECK[^\n]*\\\n\s*CMD (\[.*\])", text)
    assert check is not None
    args = yaml.safe_load(check.group(1))
    build_parser().parse_args(store_args(args))


@pytest.fixture(scope="module")
def cluster_compose() -> dict[str, Any]:
    path = ROOT / "deploy" / "cluster" / "docker-compose.yml"
    return yaml.safe_load(path.read_text())  # type: ignore[no-any-return]


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_the_cluster_file_routes_three_jetstream_nodes(cluster_compose: dict[str, Any]) -> None:
    services = cluster_compose["services"]
    nodes = sorted(n for n in services if n.startswith("nats-"))
    assert nodes == ["nats-1", "nats-2", "nats-3"]
    names, clusters = set(), set()
    for node in nodes:
        command = services[node]["command"]
        assert "--jetstream" in command
        names.add(_flag(command, "--server_name"))
        clusters.add(_flag(command, "--cluster_name"))
        port = _flag(command, "--cluster").rsplit(":", 1)[1]
        routes = set(_flag(command, "--routes").split(","))
        assert routes == {f"nats://{other}:{port}" for other in nodes if other != node}
    assert names == set(nodes), "server names are unique: the stream's peers are told apart"
    assert len(clusters) == 1


def test_the_cluster_file_runs_two_stores_on_every_node(cluster_compose: dict[str, Any]) -> None:
    services = cluster_compose["services"]
    stores = [n for n in services if n.startswith("store-")]
    assert len(stores) == 2
    parser = build_parser()
    seen = []
    for name in stores:
        store = services[name]
        parser.parse_args(store_args(store["command"]))
        parser.parse_args(store_args(store["healthcheck"]["test"]))
        env = store["environment"]
        assert not set(env) - KNOWN_ENV, f"not settings: {set(env) - KNOWN_ENV}"
        settings = load_settings(
            **{k.removeprefix("STORE_").lower(): v for k, v in env.items() if "${" not in str(v)}
        )
        nodes = {n for n in services if n.startswith("nats-")}
        assert {u.split("//")[1].split(":")[0] for u in settings.nats_servers} == nodes
        assert settings.ingest_mode == "jetstream"
        assert settings.js_replicas == len(nodes)
        assert set(store["depends_on"]) == nodes | {"timescaledb"}
        seen.append((settings.coordinator_id, settings.js_durable, settings.queue_group))
    assert len({s[0] for s in seen}) == 2, "each instance has its own coordinator id"
    assert len({s[1:] for s in seen}) == 1, "both share the durable consumer"
