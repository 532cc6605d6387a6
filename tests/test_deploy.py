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
    assert set(compose["services"]) == {"nats", "timescaledb", "store"}
    assert compose["services"]["nats"]["image"].startswith("nats:")
    assert "--jetstream" in compose["services"]["nats"]["command"]
    assert compose["services"]["timescaledb"]["image"].startswith("timescale/timescaledb")
    assert set(compose["volumes"]) == {"nats-data", "pg-data"}


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


def test_stop_grace_covers_the_shutdown_grace(compose: dict[str, Any]) -> None:
    grace = int(compose["services"]["store"]["stop_grace_period"].rstrip("s"))
    assert grace > Settings.model_fields["shutdown_grace_s"].default


def test_dockerfile_runs_the_cli() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["store-svc"]' in text
    assert 'CMD ["run"]' in text
    check = re.search(r"HEALTHCHECK[^\n]*\\\n\s*CMD (\[.*\])", text)
    assert check is not None
    args = yaml.safe_load(check.group(1))
    build_parser().parse_args(store_args(args))
