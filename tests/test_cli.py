"""The ``store-svc`` command as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import store_svc
from store_svc.devtools.natsserver import NatsServer

STORE_SVC = str(Path(sys.executable).parent / "store-svc")


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("STORE_")}
    return subprocess.run(
        [STORE_SVC, *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_help_lists_the_commands() -> None:
    out = run("--help")
    assert out.returncode == 0
    for command in ("run", "demo", "health", "ready", "control"):
        assert command in out.stdout


def test_version() -> None:
    out = run("--version")
    assert out.stdout.strip() == f"store-svc {store_svc.__version__}"


def test_invalid_settings_exit_2_with_a_clear_message() -> None:
    secret = "do-not-print-this-token-ever"
    out = run(
        "run",
        env={
            "STORE_BATCH_SIZE": "10",
            "STORE_QUEUE_CAPACITY": "5",
            "STORE_ADMIN_TOKEN": secret,
            "STORE_DATABASE_URL": "postgresql://u:hunter2pass@db/x",
        },
    )
    assert out.returncode == 2
    assert "invalid settings" in out.stderr
    assert "batch_size" in out.stderr
    assert secret not in out.stderr
    assert "hunter2pass" not in out.stderr


def test_unreachable_nats_fails_fast(tmp_path: Path) -> None:
    out = run(
        "run",
        env={
            "STORE_NATS_URL": "nats://127.0.0.1:1",
            "STORE_NATS_CONNECT_TIMEOUT_S": "2",
            "STORE_DATABASE_URL": f"sqlite:///{tmp_path}/x.db",
        },
    )
    assert out.returncode == 1
    assert "cannot reach NATS at nats://127.0.0.1:1 within 2s" in out.stderr


def test_jetstream_mode_without_jetstream_on_the_server_exits_1(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    out = run(
        "run",
        env={
            "STORE_INGEST_MODE": "jetstream",
            "STORE_NATS_URL": nats_server.url,
            "STORE_DATABASE_URL": f"sqlite:///{tmp_path}/x.db",
        },
    )
    assert out.returncode == 1
    assert "JetStream enabled (nats-server -js)" in out.stderr
    assert "asking again" not in out.stderr  # no JetStream at all: not asked again
    assert "gave up after" not in out.stderr


def test_a_jetstream_set_up_the_server_refuses_exits_1_naming_why(tmp_path: Path) -> None:
    """An answered refusal is said as such, at once: three replicas on a server that
    is not a cluster (not "is JetStream enabled?", and not asked again)."""
    with NatsServer(store_dir=tmp_path / "js") as server:
        out = run(
            "run",
            env={
                "STORE_INGEST_MODE": "jetstream",
                "STORE_JS_REPLICAS": "3",
                "STORE_NATS_URL": server.url,
                "STORE_DATABASE_URL": f"sqlite:///{tmp_path}/x.db",
            },
        )
    assert out.returncode == 1
    assert "JetStream refused the set-up of stream STORE_WRITES or consumer store" in out.stderr
    assert "non-clustered" in out.stderr, out.stderr  # the server's own reason
    assert "JetStream enabled" not in out.stderr
    assert "asking again" not in out.stderr


@pytest.mark.slow
def test_demo_stores_ticks(tmp_path: Path) -> None:
    out = run(
        "demo",
        "--seconds",
        "2",
        "--rate",
        "5000",
        "--database-url",
        f"sqlite:///{tmp_path}/d.db",
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    published = int(re.search(r"published ([\d,]+) records", out.stdout).group(1).replace(",", ""))  # type: ignore[union-attr]
    bad = int(re.search(r"\((\d+) deliberately bad", out.stdout).group(1))  # type: ignore[union-attr]
    stored = re.search(r"stored per table: (.*)", out.stdout).group(1)  # type: ignore[union-attr]
    per_table = {k: int(v.replace(",", "")) for k, v in re.findall(r"(\w+)=([\d,]+)", stored)}
    assert published >= 5000
    # Every good record is stored, plus the ten of the closing request-reply write.
    assert sum(per_table.values()) == published - bad + 10
    assert "request-reply write answered after commit" in out.stdout
    assert "feedback on mdp.telemetry.feedback" in out.stdout
    assert "health on mdp.store.health: healthy" in out.stdout
