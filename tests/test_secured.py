"""A secured NATS: every authentication method and TLS against a real nats-server
started with an authorization config, certificates from a throwaway CA, and the
failures a desk meets (a wrong password, an untrusted certificate) reported in one
line that names the cause, without the secret."""

from __future__ import annotations

import base64
import hashlib
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

from .conftest import until

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


def _tls_conf(files: dict[str, Path], verify_clients: bool = False) -> str:
    """A server TLS block with the test CA's server certificate (and, to verify
    clients, the CA they must chain to)."""
    verify = f', ca_file: "{files["ca"]}", verify: true' if verify_clients else ""
    return (
        f'tls {{ cert_file: "{files["server_cert"]}", '
        f'key_file: "{files["server_key"]}"{verify} }}\n'
    )


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


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(claims: dict[str, Any], signer: Any) -> str:
    """A NATS JWT (header, claims, Ed25519 signature of the issuer's NKey)."""
    claims = {"iat": int(time.time()), **claims}
    digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    return f"{head}.{body}.{_b64(signer.sign(f'{head}.{body}'.encode()))}"


def _operator_setup(tmp_path: Path, user_expires: int | None = None) -> tuple[str, Path]:
    """An operator, an account and a user, made with the ``nkeys`` package: the
    server configuration (memory resolver) and the user's ``.creds`` file."""

    def keys(prefix: int) -> tuple[bytes, Any]:
        seed = nkeys.encode_seed(os.urandom(32), prefix)
        return seed, nkeys.from_seed(seed)

    _, operator = keys(nkeys.PREFIX_BYTE_OPERATOR)
    _, account = keys(nkeys.PREFIX_BYTE_ACCOUNT)
    user_seed, user = keys(nkeys.PREFIX_BYTE_USER)
    op_id, acc_id, user_id = (k.public_key.decode() for k in (operator, account, user))
    op_jwt = _jwt(
        {"iss": op_id, "sub": op_id, "name": "desk-op", "nats": {"type": "operator", "version": 2}},
        operator,
    )
    limits = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
              "wildcards": True, "conn": -1, "leaf": -1}  # fmt: skip
    acc_jwt = _jwt(
        {"iss": op_id, "sub": acc_id, "name": "desk",
         "nats": {"type": "account", "version": 2, "limits": limits}},
        operator,
    )  # fmt: skip
    user_claims: dict[str, Any] = {
        "iss": acc_id, "sub": user_id, "name": "store",
        "nats": {"type": "user", "version": 2, "pub": {}, "sub": {},
                 "subs": -1, "data": -1, "payload": -1},
    }  # fmt: skip
    if user_expires is not None:
        user_claims["exp"] = user_expires
    user_jwt = _jwt(user_claims, account)
    (tmp_path / "operator.jwt").write_text(op_jwt)
    conf = (
        f'operator: "{tmp_path / "operator.jwt"}"\nresolver: MEMORY\n'
        f'resolver_preload: {{ {acc_id}: "{acc_jwt}" }}\n'
    )
    creds = tmp_path / "store.creds"
    creds.write_text(
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user_seed.decode()}\n------END USER NKEY SEED------\n"
    )
    return conf, creds


async def test_creds_of_an_operator_and_account(tmp_path: Path) -> None:
    conf, creds = _operator_setup(tmp_path)
    with _server(tmp_path, conf) as server:
        await _works(tmp_path, nats_url=server.url, nats_creds=creds)


def test_an_expired_user_ends_at_once_naming_authorization(tmp_path: Path) -> None:
    conf, creds = _operator_setup(tmp_path, user_expires=int(time.time()) - 60)
    with _server(tmp_path, conf) as server:
        env = {"STORE_NATS_URL": server.url, "STORE_NATS_CREDS": str(creds)}
        for command in ("run", "health"):
            _refused_at_once(command, env, tmp_path, "authorization refused by the server")


async def test_tls_with_a_private_ca(tmp_path: Path, tls_files: dict[str, Path]) -> None:
    conf = _tls_conf(tls_files)
    with _server(tmp_path, conf) as server:
        url = server.url.replace("nats://", "tls://")
        await _works(tmp_path, nats_url=url, nats_tls_ca=tls_files["ca"])


async def test_mutual_tls(tmp_path: Path, tls_files: dict[str, Path]) -> None:
    conf = _tls_conf(tls_files, verify_clients=True)
    with _server(tmp_path, conf) as server:
        url = server.url.replace("nats://", "tls://")
        await _works(
            tmp_path,
            nats_url=url,
            nats_tls_ca=tls_files["ca"],
            nats_tls_cert=tls_files["client_cert"],
            nats_tls_key=tls_files["client_key"],
        )


async def test_the_deploy_tls_configuration(
    tmp_path: Path, tls_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``deploy/nats-server-tls.conf`` as shipped: the locked-down users over mutual
    TLS; the store connects with its CA, certificate and password, and stores a
    publisher's write."""
    import ssl

    import nats

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    env = {
        "NATS_TLS_CERT": tls_files["server_cert"],
        "NATS_TLS_KEY": tls_files["server_key"],
        "NATS_TLS_CA": tls_files["ca"],
        "STORE_PASS": PASSWORD,
        "PUBLISHER_PASS": "publisher-pw",
        "PIPELINE_PASS": "pipeline-pw",
        "OPERATOR_PASS": "operator-pw",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))  # read by the configuration
    tls = ssl.create_default_context(cafile=str(tls_files["ca"]))
    tls.load_cert_chain(str(tls_files["client_cert"]), str(tls_files["client_key"]))
    with NatsServer(extra_args=("-c", str(deploy / "nats-server-tls.conf"))) as server:
        url = server.url.replace("nats://", "tls://")
        with pytest.raises((ssl.SSLError, nats.errors.Error, OSError)):  # no client cert
            await nats.connect(
                url, user="publisher", password="publisher-pw", allow_reconnect=False,
                tls=ssl.create_default_context(cafile=str(tls_files["ca"])),
                connect_timeout=2, max_reconnect_attempts=0,
            )  # fmt: skip
        settings = load_settings(
            nats_url=url,
            nats_user="store",
            nats_password=PASSWORD,
            nats_inbox_prefix="_INBOX_store",
            nats_tls_ca=tls_files["ca"],
            nats_tls_cert=tls_files["client_cert"],
            nats_tls_key=tls_files["client_key"],
            database_url=f"sqlite:///{tmp_path}/store.db",
        )
        async with StoreService(settings) as svc:
            publisher = await nats.connect(url, user="publisher", password="publisher-pw", tls=tls)
            body = json.dumps({"symbol": "TLS", "ts": 1_700_000_000, "price": "1.5", "size": 1})
            reply = await publisher.request("mdp.store.write.trades", body.encode(), timeout=10)
            await publisher.close()
            assert json.loads(reply.data)["accepted"] == 1
            assert svc.stats.committed_total == 1
            assert svc.ingest_nats.permission_denials == svc.control_nats.permission_denials == 0


async def test_tls_wanted_but_not_offered_sends_no_credential(
    tmp_path: Path, ca: trustme.CA
) -> None:
    """Something on the port that speaks NATS without offering TLS (a misconfigured
    server, or a man in the middle): nats-py alone would send the password in plain
    text. The service and the commands refuse at once, naming it, and send nothing."""
    import asyncio
    import contextlib

    from store_svc.bus.connection import NatsConnection
    from store_svc.errors import NatsUnavailable

    received = bytearray()
    connections = []

    async def fake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        info = {"server_id": "FAKE", "version": "2.10.0", "proto": 1, "headers": True}
        writer.write(b"INFO " + json.dumps({**info, "max_payload": 1 << 20}).encode() + b"\r\n")
        await writer.drain()
        with contextlib.suppress(OSError):
            while chunk := await reader.read(4096):
                received.extend(chunk)
        writer.close()

    server = await asyncio.start_server(fake, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    env = {
        "STORE_NATS_URL": f"tls://127.0.0.1:{port}",
        "STORE_NATS_USER": "store",
        "STORE_NATS_PASSWORD": PASSWORD,
        "STORE_NATS_TLS_CA": str(tmp_path / "ca.pem"),
        "STORE_NATS_CONNECT_TIMEOUT_S": "20",
        "STORE_DATABASE_URL": f"sqlite:///{tmp_path}/x.db",
    }
    try:
        settings = load_settings(**{k.removeprefix("STORE_").lower(): v for k, v in env.items()})
        conn = NatsConnection("ingest", settings)
        began = time.monotonic()
        with pytest.raises(NatsUnavailable, match="TLS: the server does not offer TLS"):
            await conn.connect()
        assert time.monotonic() - began < 10  # at once, not after the 20 s timeout
        await conn.close()
        base = {k: v for k, v in os.environ.items() if not k.startswith("STORE_")}
        proc = await asyncio.create_subprocess_exec(
            STORE_SVC, "health", env={**base, **env}, stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 1, err
        assert b"TLS: the server does not offer TLS" in err, err
    finally:
        server.close()
    assert len(connections) >= 2, "the service and the command both reached the fake"
    assert PASSWORD.encode() not in received
    assert b"CONNECT" not in received


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


def _refused_at_once(command: str, env: dict[str, str], tmp_path: Path, says: str) -> None:
    """``store-svc <command>`` ends with exit 1 and one line naming the cause, long
    before its 30 s connect timeout (retrying cannot help), with no traceback."""
    out, took = _cli(
        command,
        *([] if command == "run" else ["--timeout", "30"]),
        env={
            **env,
            "STORE_NATS_CONNECT_TIMEOUT_S": "30",
            "STORE_DATABASE_URL": f"sqlite:///{tmp_path}/x.db",
        },
    )
    assert out.returncode == 1, out.stderr
    assert says in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert took < 10  # well inside the 30 s: retrying cannot help


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
    if command != "run":
        args += ["--timeout", "30"]
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
    # Given up at once, not after the 30 s timeout (retrying cannot help).
    assert took < 10


def test_a_server_certificate_from_another_ca_is_named(
    tmp_path: Path, tls_files: dict[str, Path]
) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    conf = _tls_conf(tls_files)
    with _server(tmp_path, conf) as server:
        env = {
            "STORE_NATS_URL": server.url.replace("nats://", "tls://"),
            "STORE_NATS_TLS_CA": str(other),
        }
        for command in ("run", "health"):
            _refused_at_once(command, env, tmp_path, "TLS: the server's certificate is not trusted")


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


@pytest.mark.parametrize("command", ["run", "health"])
def test_malformed_creds_and_seed_files_exit_2_without_showing_them(
    command: str, tmp_path: Path
) -> None:
    """A ``.creds`` file without its JWT block made nats-py's reader loop for ever
    (the process hung, deaf to SIGTERM); a file that is no seed failed with a
    ``TypeError``. Both are refused with the settings, naming the file, not its text."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()
    seed_only = tmp_path / "seed-only.creds"
    seed_only.write_text(
        f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )
    garbage = tmp_path / "garbage.nk"
    garbage.write_text("SUnot-a-seed-but-secret-looking\n")
    cases = [
        ({"STORE_NATS_CREDS": str(seed_only)}, "is not a .creds file"),
        ({"STORE_NATS_NKEY": str(garbage)}, "does not hold a valid NKey seed"),
        ({"STORE_NATS_CREDS": str(garbage)}, "is not a .creds file"),
    ]
    for env, says in cases:
        out, took = _cli(command, env=env)
        assert out.returncode == 2, out.stderr
        assert says in out.stderr, out.stderr
        assert seed not in out.stderr
        assert "secret-looking" not in out.stderr
        assert took < 20


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
                # A reconnect logs where it landed.
                reconnects = svc.control_nats.figures()["reconnects"]
                await svc.control_nats.nc.force_reconnect()
                await until(lambda: svc.control_nats.figures()["reconnects"] > reconnects)
                await until(lambda: svc.control_nats.connected)
        assert "NATS control connection re-established at ***@127.0.0.1" in caplog.text
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
    conf = _tls_conf(tls_files)
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
