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
"""

from __future__ import annotations

import asyncio

from nats.aio.client import PING_PROTO
from nats.aio.client import Client as _Client

__all__ = ["OrderedFlushClient"]


class OrderedFlushClient(_Client):
    """A nats-py client whose PINGs travel behind the commands sent before them."""

    async def _send_ping(self, future: asyncio.Future[bool] | None = None) -> None:
        if future is None:
            future = asyncio.get_running_loop().create_future()
        self._pongs.append(future)
        await self._send_command(PING_PROTO)
        await self._flush_pending()
