"""How the service (and every ``store-svc`` command) authenticates to NATS, and what
a failed connection attempt is told as.

:func:`connect_options` turns the ``STORE_NATS_*`` settings into nats-py connect
arguments: at most one of creds file, NKey seed file, user/password or token, TLS
(server verification with ``STORE_NATS_TLS_CA``, mutual TLS with a client
certificate) and the inbox prefix. Secrets go to nats-py only; nothing here logs
them. :func:`connect_failure` names the cause of a failed attempt in one line, and
says whether trying again can help (a refused password or certificate cannot), so
start-up gives up at once instead of retrying until its timeout.
"""

from __future__ import annotations

import re
import ssl
from typing import Any

import nats.errors

from store_svc.settings import Settings

__all__ = ["connect_failure", "connect_options", "permission_refusal", "redact_url", "uses_tls"]

#: What the server says when it refuses a client's credentials for good (not its
#: "Authentication Timeout", which a slow handshake meets and a retry can pass).
_AUTH_WORDS = (
    "authorization violation",
    "user authentication expired",
    "user authentication revoked",
    "account authentication expired",
)

#: The subscription id the server appends to a refused subscription.
_SID = re.compile(r'\s*\(sid "[^"]*"\)$')

#: A URL's user information: after the optional scheme, up to the last "@".
_USERINFO = re.compile(r"^([a-z][a-z0-9+.-]*://)?.*@", re.IGNORECASE)


def uses_tls(settings: Settings) -> bool:
    """Whether connections use TLS (a ``tls://`` URL or any TLS file set)."""
    return (
        any(url.startswith("tls://") for url in settings.nats_servers)
        or settings.nats_tls_ca is not None
        or settings.nats_tls_cert is not None
    )


def _tls_context(settings: Settings) -> ssl.SSLContext:
    ca = settings.nats_tls_ca
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca is not None else None
    )
    if settings.nats_tls_cert is not None and settings.nats_tls_key is not None:
        context.load_cert_chain(str(settings.nats_tls_cert), str(settings.nats_tls_key))
    return context


def connect_options(settings: Settings) -> dict[str, Any]:
    """The nats-py ``connect`` arguments for authentication, TLS and inboxes.

    Args:
        settings: the ``nats_*`` settings (validated: one method at most, files exist).

    Returns:
        Keyword arguments for ``Client.connect``.

    Raises:
        ssl.SSLError: a certificate or key file is not usable.
    """
    options: dict[str, Any] = {"inbox_prefix": settings.nats_inbox_prefix}
    if settings.nats_creds is not None:
        options["user_credentials"] = str(settings.nats_creds)
    elif settings.nats_nkey is not None:
        options["nkeys_seed"] = str(settings.nats_nkey)
    elif settings.nats_user is not None and settings.nats_password is not None:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password.get_secret_value()
    elif settings.nats_token is not None:
        options["token"] = settings.nats_token.get_secret_value()
    if uses_tls(settings):
        options["tls"] = _tls_context(settings)
    return options


def connect_failure(exc: BaseException) -> tuple[str, bool]:
    """The cause of a failed connection attempt, in one line.

    Args:
        exc: what nats-py raised or reported to its error callback.

    Returns:
        ``(cause, final)``: ``final`` when trying again cannot help (credentials or a
        certificate the server refuses, TLS where the server has none, or the reverse).
    """
    text = str(exc).strip().removeprefix("nats: ").strip("'\"") or type(exc).__name__
    lower = text.lower()
    if isinstance(exc, nats.errors.AuthorizationError) or any(w in lower for w in _AUTH_WORDS):
        return f"authorization refused by the server ({text})", True
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS: the server's certificate is not trusted ({exc.verify_message}; "
            "a private CA goes in STORE_NATS_TLS_CA)",
            True,
        )
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        # The server hung up mid-handshake (its TLS timeout, a restart): try again.
        return f"TLS handshake cut off ({text})", False
    if isinstance(exc, ssl.SSLError):
        words = [a for a in exc.args if isinstance(a, str)]
        return f"TLS failed ({getattr(exc, 'reason', None) or ' '.join(words) or text})", True
    if isinstance(exc, nats.errors.SecureConnRequiredError):
        return "TLS: the server requires TLS (use tls:// or STORE_NATS_TLS_CA)", True
    if isinstance(exc, nats.errors.SecureConnWantedError):
        return "TLS: the server does not offer TLS", True
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is nats-server running there?)", False
    if isinstance(exc, TimeoutError):
        return "timed out", False
    if isinstance(exc, OSError):
        return f"network error ({exc.strerror or text})", False
    return f"{type(exc).__name__}: {text}"[:300], False


def permission_refusal(text: str) -> str | None:
    """The server's refusal of a publish or subscription, as nats-py reports it (lower
    case, ``nats: '...'``), without the wrapping and the subscription id; ``None`` when
    ``text`` is another error."""
    what = _SID.sub("", text.removeprefix("nats: ").strip("' "))
    return what if "permissions violation" in what.lower() else None


def redact_url(url: str) -> str:
    """``url`` without its user information (``nats://u:p@host`` -> ``nats://***@host``;
    also without a scheme, and with ``/`` or ``@`` in the password)."""
    return _USERINFO.sub(lambda m: f"{m.group(1) or ''}***@", url, count=1)
