"""A secured NATS: every authentication method and TLS against a real nats-server
started with an authorization config, certificates from a throwaway CA, and the
failures a desk meets (a wrong password, an untrusted certificate) reported in one
line that names the cause, without the secret."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nkeys
import pytest
import trustme

from store_svc.core import HealthStatus
from store_svc.devtools.natsserver import NatsServer
from store_svc.runtime.service import StoreService
from store_svc.settings import load_settings

pytestmark = pytest.mark.slow

STORE_SVC = str(Path(sys.executable).parent / "store-svc")
PASSWORD = "pw-Zq81-very-secret"
TOKEN = "tok-Hh27-very-secret"


def _server(tmp_path: Path, conf: str) -> NatsServer:
    path = tmp_path / "server.conf"
    path.write_text(conf)
    return NatsServer(extra_args=("-c", str(path)))


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("store-svc@desk")
    files = {
        "ca": tmp_path / "ca.pem",
        "server_cert": tmp_path / "server.pem",
        "server_key": tmp_path / "server.key",
        "client_cert": tmp_path / "client.pem",
        "client_key": tmp_path / "client.key",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.cert_chain_pems[0].write_to_path(str(files["server_cert"]))
    server.private_key_pem.write_to_path(str(files["server_key"]))
    client.cert_chain_pems[0].write_to_path(str(files["client_cert"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    return files


def _nkey_seed(tmp_path: Path) -> tuple[Path, str]:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(seed).public_key.decode()
    path = tmp_path / "store.nk"
    path.write_bytes(seed)
    return path, public


async def _works(tmp_path: Path, **settings: Any) -> None:
    """The service connects, stores a request-reply write and answers health."""
    s = load_settings(database_url=f"sqlite:///{tmp_path}/store.db", **settings)
    async with StoreService(s) as svc:
        nc = svc.control_nc
        body = json.dumps({"symbol": "SEC", "ts": 1_700_000_000, "price": "1.5", "size": 1})
        reply = await nc.request("mdp.store.write.trades", body.encode(), timeout=10)
        assert json.loads(reply.data)["accepted"] == 1
        health = HealthStatus.model_validate_json(
            (await nc.request("mdp.store.health", b"", timeout=10)).data
        )
        assert health.state == "healthy"
        assert svc.stats.committed_total == 1


async def test_user_and_password(tmp_path: Path) -> None:
    conf = f'authorization {{ users = [ {{user: "store", password: "{PASSWORD}"}} ] }}\n'
    with _server(tmp_path, conf) as server:
        await _works(tmp_path, nats_url=server.url, nats_user="store", nats_password=PASSWORD)


async def test_token(tmp_path: Path) -> None:
    with _server(tmp_path, f'authorization {{ token: "{TOKEN}" }}\n') as server:
        await _works(tmp_path, nats_url=server.url, nats_token=TOKEN)


async def test_nkey(tmp_path: Path) -> None:
    seed, public = _nkey_seed(tmp_path)
    with _server(tmp_path, f'authorization {{ users = [ {{nkey: "{public}"}} ] }}\n') as server:
        await _works(tmp_path, nats_url=server.url, nats_nkey=seed)


async def test_tls_with_a_private_ca(tmp_path: Path, tls_files: dict[str, Path]) -> None:
    conf = (
        f'tls {{ cert_file: "{tls_files["server_cert"]}", '
        f'key_file: "{tls_files["server_key"]}" }}\n'
    )
    with _server(tmp_path, conf) as server:
        url = server.url.replace("nats://", "tls://")
        await _works(tmp_path, nats_url=url, nats_tls_ca=tls_files["ca"])


async def test_mutual_tls(tmp_path: Path, tls_files: dict[str, Path]) -> None:
    conf = (
        f'tls {{ cert_file: "{tls_files["server_cert"]}", key_file: "{tls_files["server_key"]}", '
        f'ca_file: "{tls_files["ca"]}", verify: true }}\n'
    )
    with _server(tmp_path, conf) as server:
        url = server.url.replace("nats://", "tls://")
        await _works(
            tmp_path,
            nats_url=url,
            nats_tls_ca=tls_files["ca"],
            nats_tls_cert=tls_files["client_cert"],
            nats_tls_key=tls_files["client_key"],
        )


def _cli(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("STORE_")}
    began = time.monotonic()
    out = subprocess.run(
        [STORE_SVC, *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return out, time.monotonic() - began


@pytest.fixture
def password_server(tmp_path: Path) -> Iterator[NatsServer]:
    conf = f'authorization {{ users = [ {{user: "store", password: "{PASSWORD}"}} ] }}\n'
    with _server(tmp_path, conf) as server:
        yield server


@pytest.mark.parametrize("command", ["run", "health", "ready", "query"])
def test_a_wrong_password_ends_at_once_with_one_line_naming_it(
    command: str, password_server: NatsServer, tmp_path: Path
) -> None:
    args = [command, *(["trades", "SEC"] if command == "query" else [])]
    out, took = _cli(
        *args,
        env={
            "STORE_NATS_URL": password_server.url,
            "STORE_NATS_USER": "store",
            "STORE_NATS_PASSWORD": "not-the-password",
            "STORE_NATS_CONNECT_TIMEOUT_S": "30",
            "STORE_DATABASE_URL": f"sqlite:///{tmp_path}/x.db",
        },
    )
    assert out.returncode == 1, out.stderr
    assert "authorization refused by the server" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert "not-the-password" not in out.stderr + out.stdout
    # Given up at once, not after the 30 s connect timeout (retrying cannot help).
    assert took < 30


def test_a_server_certificate_from_another_ca_is_named(
    tmp_path: Path, tls_files: dict[str, Path]
) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    conf = (
        f'tls {{ cert_file: "{tls_files["server_cert"]}", '
        f'key_file: "{tls_files["server_key"]}" }}\n'
    )
    with _server(tmp_path, conf) as server:
        for command in ("run", "health"):
            out, took = _cli(
                command,
                env={
                    "STORE_NATS_URL": server.url.replace("nats://", "tls://"),
                    "STORE_NATS_TLS_CA": str(other),
                    "STORE_NATS_CONNECT_TIMEOUT_S": "30",
                    "STORE_DATABASE_URL": f"sqlite:///{tmp_path}/x.db",
                },
            )
            assert out.returncode == 1, out.stderr
            assert "TLS" in out.stderr, out.stderr
            assert "Traceback" not in out.stderr
            assert took < 30


@pytest.mark.parametrize(
    ("env", "says"),
    [
        (
            {"STORE_NATS_TOKEN": "t", "STORE_NATS_USER": "u", "STORE_NATS_PASSWORD": "p"},
            "one method",
        ),
        ({"STORE_NATS_URL": "nats://u:p@127.0.0.1:4222", "STORE_NATS_TOKEN": "t"}, "one method"),
        ({"STORE_NATS_USER": "u"}, "go together"),
        ({"STORE_NATS_TLS_CERT": "/etc/hostname"}, "go together"),
        ({"STORE_NATS_CREDS": "/nonexistent/store.creds"}, "not a readable file"),
    ],
)
def test_contradictory_or_missing_auth_settings_exit_2(env: dict[str, str], says: str) -> None:
    out, _ = _cli("run", env=env)
    assert out.returncode == 2, out.stderr
    assert says in out.stderr
    assert "Traceback" not in out.stderr


async def test_no_secret_in_logs_health_or_metrics(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio
    import urllib.request

    conf = f'authorization {{ users = [ {{user: "store", password: "{PASSWORD}"}} ] }}\n'
    with _server(tmp_path, conf) as server:
        url = server.url.replace("nats://", f"nats://store:{PASSWORD}@")
        s = load_settings(
            nats_url=url, database_url=f"sqlite:///{tmp_path}/store.db", metrics_port=0
        )
        with caplog.at_level("DEBUG"):
            async with StoreService(s) as svc:
                nc = svc.control_nc
                health = (await nc.request("mdp.store.health", b"", timeout=10)).data.decode()
                stats = (await nc.request("$SRV.STATS", b"", timeout=10)).data.decode()
                port = svc.metrics.port

                def scrape() -> str:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
                        return str(r.read().decode())

                metrics = await asyncio.to_thread(scrape)
                assert "***@127.0.0.1" in health  # the server is named, the userinfo not
    for where, text in (
        ("log", caplog.text),
        ("health", health),
        ("stats", stats),
        ("metrics", metrics),
    ):
        assert PASSWORD not in text, f"the password is in the {where}"


async def test_nats_py_close_hangs_after_a_failed_tls_handshake(
    tmp_path: Path, tls_files: dict[str, Path]
) -> None:
    """The library failure ``bus.client.close_client`` works around: once this fails,
    nats-py's close() returns by itself and the bound there can go."""
    import asyncio
    import ssl

    import nats

    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    conf = (
        f'tls {{ cert_file: "{tls_files["server_cert"]}", '
        f'key_file: "{tls_files["server_key"]}" }}\n'
    )
    with _server(tmp_path, conf) as server:
        nc = nats.NATS()

        async def quiet(exc: Exception) -> None:
            pass

        with pytest.raises((ssl.SSLError, nats.errors.Error, OSError)):
            await nc.connect(
                server.url.replace("nats://", "tls://"),
                tls=ssl.create_default_context(cafile=str(other)),
                allow_reconnect=False,
                connect_timeout=2,
                error_cb=quiet,
            )
        closing = asyncio.ensure_future(nc.close())
        done, _ = await asyncio.wait({closing}, timeout=3)
        closing.cancel()
        assert not done, "nats-py's close() returns now: drop the bound in close_client"
