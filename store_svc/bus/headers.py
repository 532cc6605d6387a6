"""Header helpers shared by every edge that reads or answers NATS messages.

Header names are matched without regard to case, as HTTP-style headers should be;
every value the service sends is one printable line of bounded length (a hostile
payload's text cannot break a header block or grow a reply); refused requests carry
the ADR-32 ``Nats-Service-Error`` / ``Nats-Service-Error-Code`` pair.
"""

from __future__ import annotations

from typing import Literal

from store_svc.constants import (
    JSON_CONTENT_TYPES,
    MAX_HEADER_VALUE_CHARS,
    MSGPACK_CONTENT_TYPES,
    SERVICE_ERROR_CODE_HEADER,
    SERVICE_ERROR_HEADER,
)
from store_svc.errors import RejectedInput

__all__ = ["content_format", "error_headers", "header", "header_value"]


def header(headers: dict[str, str], name: str) -> str | None:
    """Look a header up by name, ignoring case as HTTP-style headers should.

    Args:
        headers: the message headers.
        name: the canonical header name.

    Returns:
        The value, or None when absent.
    """
    value = headers.get(name)
    if value is None:
        lower = name.lower()
        for key, val in headers.items():
            if key.lower() == lower:
                return val
    return value


def content_format(ctype: str | None) -> Literal["json", "msgpack"]:
    """The body encoding a ``Content-Type`` header value names (none means JSON).

    Raises:
        RejectedInput: ``unsupported_content_type``.
    """
    if ctype is None:
        return "json"
    base = ctype.split(";", 1)[0].strip().lower()
    if base in MSGPACK_CONTENT_TYPES:
        return "msgpack"
    if base in JSON_CONTENT_TYPES or not base:
        return "json"
    raise RejectedInput(
        "unsupported_content_type",
        f"Content-Type {ctype[:64]!r} is neither application/json nor application/msgpack",
    )


def header_value(text: str) -> str:
    """Make ``text`` safe as a NATS header value: one line, bounded length.

    Args:
        text: any text, possibly from a hostile payload.

    Returns:
        The text with control characters replaced and cut to a bounded length.
    """
    clean = "".join(c if c.isprintable() else " " for c in text)
    return clean[:MAX_HEADER_VALUE_CHARS]


def error_headers(code: int, reason: str, detail: str) -> dict[str, str]:
    """The ADR-32 error headers of a refused request: ``Nats-Service-Error:
    <reason>: <detail>`` (made header-safe) and ``Nats-Service-Error-Code``."""
    return {
        SERVICE_ERROR_HEADER: header_value(f"{reason}: {detail}"),
        SERVICE_ERROR_CODE_HEADER: str(code),
    }
