"""How a failed connection attempt is told and judged (final or worth a retry), and
how URLs lose their user information: pure functions, the fast tier."""

from __future__ import annotations

import ssl

import nats.errors
import pytest

from store_svc.bus.auth import connect_failure, redact_url

pytestmark = pytest.mark.logic


@pytest.mark.parametrize(
    ("exc", "says", "final"),
    [
        (nats.errors.AuthorizationError(), "authorization refused", True),
        (nats.errors.Error("nats: 'Authorization Violation'"), "(Authorization Violation)", True),
        (nats.errors.Error("nats: 'User Authentication Expired'"), "authorization", True),
        (nats.errors.Error("nats: 'User Authentication Revoked'"), "authorization", True),
        # A slow handshake meets the server's auth timeout: the next try may pass.
        (nats.errors.Error("nats: 'Authentication Timeout'"), "Authentication Timeout", False),
        (nats.errors.SecureConnWantedError(), "the server does not offer TLS", True),
        (nats.errors.SecureConnRequiredError(), "the server requires TLS", True),
        # The server hung up mid-handshake (its TLS timeout, a restart): retry.
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), "cut off", False),
        (ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed"), "cut off", False),
        # Built in Python, an SSLError has no reason attribute: still told.
        (ssl.SSLError("handshake failure"), "TLS failed", True),
        (ConnectionRefusedError(), "connection refused", False),
        (TimeoutError(), "timed out", False),
    ],
)
def test_connect_failures_are_named_and_judged(exc: BaseException, says: str, final: bool) -> None:
    cause, is_final = connect_failure(exc)
    assert says in cause
    assert is_final is final
    assert "nats: " not in cause
    assert "('" not in cause  # the server's quotes are not kept


def test_an_untrusted_certificate_names_where_a_private_ca_goes() -> None:
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_message = "unable to get local issuer certificate"
    cause, final = connect_failure(exc)
    assert final
    assert "not trusted (unable to get local issuer certificate" in cause
    assert "STORE_NATS_TLS_CA" in cause


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://store:pw@nats.internal:4222", "nats://***@nats.internal:4222"),
        ("tls://tok@nats.internal:4222", "tls://***@nats.internal:4222"),
        ("store:pw@127.0.0.1:4222", "***@127.0.0.1:4222"),  # nats-py takes it unschemed
        ("nats://u:p/w@x@host:1", "nats://***@host:1"),  # "/" and "@" in the password
        ("nats://nats.internal:4222", "nats://nats.internal:4222"),
        ("127.0.0.1:4222", "127.0.0.1:4222"),
    ],
)
def test_urls_lose_their_user_information(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_per_message_refusals_are_one_refusal_and_the_log_is_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Acks and replies go to subjects unique per message: 300 refused acks are one
    refusal in the log; past 256 distinct refusals, one line says the rest are only
    counted."""
    from store_svc.bus.connection import NatsConnection
    from store_svc.settings import load_settings

    conn = NatsConnection("ingest", load_settings())
    for n in range(300):
        ack = f"$js.ack.store_writes.store.1.{n}.{n}.17000000000{n:08d}.0"
        conn._permission_denied(f"nats: 'permissions violation for publish to \"{ack}\"'")
        conn._permission_denied(
            f"nats: 'permissions violation for publish to \"_inbox.{'a' * 22}{n}\"'"
        )
    assert conn.permission_denials == 600
    assert conn.refusals == {
        'permissions violation for publish to "$js.ack.store_writes.store.*.*.*.*.*"',
        'permissions violation for publish to "_inbox.*"',
    }
    assert caplog.text.count("the server refused a subject") == 2
    for n in range(300):
        conn._permission_denied(f"nats: 'permissions violation for publish to \"mdp.x{n}\"'")
    assert caplog.text.count("the server refused a subject") == 256
    assert caplog.text.count("further ones are only counted") == 1
    assert conn.permission_denials == 900
