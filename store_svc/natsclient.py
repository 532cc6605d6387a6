"""The NATS client the service uses: nats-py's, with ``flush()`` kept in order.

nats-py 2.16 writes the PING of ``flush()`` straight to the socket, ahead of the
commands still waiting in its outgoing buffer (``_send_ping`` bypasses
``_pending``). A flush can then return before the server has seen a SUB, PUB or
UNSUB issued just before it, which breaks what flush promises:

* a subscription made at start-up is not yet known to the server when ``start()``
  returns (measured: about 1 in 60 first requests answered "no responders");
* ``Subscription.drain()`` sends UNSUB then flushes: the PONG can come back before
  the server has processed the UNSUB, the client then forgets the subscription,
  and messages the server was still sending to it are dropped unseen (measured:
  up to 95 of 100 messages lost with plain nats-py and nats-server 2.15).

This subclass queues the PING behind the pending commands, so the PONG means the
server has processed everything sent before the flush. It overrides one private
method; ``tests/test_natsclient.py`` fails if a nats-py upgrade changes it.

nats-py also checks only the payload against the server's maximum payload, while
the server counts the headers too. A message that fits without its headers but not
with them gets ``-ERR maximum payload violation``, and nats-py then *closes* the
connection for good: one malformed write of nearly 1 MiB, sent on to the DLQ with
its reason headers, left the service deaf (measured). :meth:`_send_publish`
here refuses such a message with ``MaxPayloadError`` before it is sent, and
:func:`payload_room` tells callers how much payload fits beside given headers.
"""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.client import PING_PROTO
from nats.aio.client import Client as _Client
from nats.errors import MaxPayloadError

__all__ = ["OrderedFlushClient", "header_bytes", "payload_room"]


def header_bytes(headers: dict[str, str] | None) -> int:
    """An upper bound of the size of ``headers`` on the wire (``NATS/1.0`` line, one
    ``key: value`` line each, the blank line)."""
    if not headers:
        return 0
    return 12 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


def payload_room(nc: _Client, headers: dict[str, str] | None) -> int:
    """Payload bytes a message with ``headers`` may carry on ``nc``'s connection."""
    return int(nc.max_payload) - header_bytes(headers)


class OrderedFlushClient(_Client):
    """A nats-py client whose PINGs travel behind the commands sent before them."""

    async def _send_ping(self, future: asyncio.Future[bool] | None = None) -> None:
        if future is None:
            future = asyncio.get_running_loop().create_future()
        self._pongs.append(future)
        await self._send_command(PING_PROTO)
        await self._flush_pending()

    async def _send_publish(
        self,
        subject: str,
        reply: str,
        payload: bytes,
        payload_size: int,
        headers: dict[str, Any] | None,
    ) -> None:
        if headers and payload_size + header_bytes(headers) > self._max_payload:
            raise MaxPayloadError
        await super()._send_publish(subject, reply, payload, payload_size, headers)
