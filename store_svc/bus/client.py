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

And nats-py 2.16 ends its read loop when a PONG arrives for a ``flush()`` or
``rtt()`` that has already timed out: the timed-out wait cancels its future but
leaves it queued, ``_process_pong`` calls ``set_result`` on it, ``InvalidStateError``
escapes the parser, and the read loop logs ``nats: encountered error`` and stops,
with the socket left open. The client then reads nothing until its stale-connection
pings give up on it minutes later (measured: 5½ minutes deaf after a write flood
made one RTT probe late). :meth:`_process_pong` here skips a wait that is already
over, as the PONG still belongs to it. ``connection.py`` also watches the client's
tasks, so any other death of the read loop is a connection fault, not silence.

nats-py also upgrades a connection to TLS only when the server's INFO asks for it:
given a ``tls://`` URL or a TLS context, against a server (or anything listening
there) that does not ask, it goes on in plain text and sends the CONNECT with the
user's password or token in the clear (measured with a fake server).
:meth:`_connect_command`, which nats-py calls after any upgrade and before writing
the CONNECT, refuses with ``SecureConnWantedError`` when TLS was wanted and the
socket is not TLS; ``tests/test_secured.py`` checks that no credential leaves.

A connection attempt that fails after the socket is open (credentials refused, a
TLS failure) leaves that socket open in nats-py; :meth:`_process_connect_init`
closes it (``tests/test_natsclient.py`` shows plain nats-py leaving it).

Last, nats-py's read loop does not suspend while its socket buffer holds data: a
write flood kept it parsing for 40+ ms per turn of the event loop (measured with
asyncio's slow-callback log), and every other task, health on the other connection
included, waited that long for each of its steps. The client's parser
(``bus/receive.py``) yields to the loop once it has parsed for ``TURN_SLICE_S``
(checked every 4 KiB; a read is up to 32 KiB), and hands the messages of a
subscription made with :meth:`OrderedFlushClient.subscribe_batched` to its consumer
in batches, without a ``Msg`` or a task step per message.

And nats-py 2.16 reads a status without a description that comes with headers
(``NATS/1.0 503`` then ``Nats-Subject: ...``, as nats-server 2.11+ answers a pull
request nobody serves) as the description ``"\\nNats-Subject: ..."``: a log line of
that status broke in two. :meth:`_process_headers` drops that description.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from nats.aio.client import PING_PROTO
from nats.aio.client import Client as _Client
from nats.aio.subscription import Subscription
from nats.errors import (
    BadSubjectError,
    ConnectionClosedError,
    ConnectionDrainingError,
    MaxPayloadError,
    OutboundBufferLimitError,
    SecureConnWantedError,
    SlowConsumerError,
)

from store_svc.bus.receive import Incoming, ReceiveParser, Receiver

log = logging.getLogger(__name__)

#: The header nats-py puts a status line's description under.
_DESCRIPTION = "Description"

__all__ = ["CommandClient", "OrderedFlushClient", "close_client", "header_bytes", "payload_room"]


def header_bytes(headers: dict[str, str] | None) -> int:
    """An upper bound of the size of ``headers`` on the wire (``NATS/1.0`` line, one
    ``key: value`` line each, the blank line)."""
    if not headers:
        return 0
    return 12 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


def payload_room(nc: _Client, headers: dict[str, str] | None) -> int:
    """Payload bytes a message with ``headers`` may carry on ``nc``'s connection."""
    return int(nc.max_payload) - header_bytes(headers)


def server_info(nc: _Client) -> dict[str, Any]:
    """The INFO of the server ``nc`` is connected to (its name, cluster, ...).

    nats-py keeps it in a private member (guarded by tests/test_natsclient.py); an
    empty dict when there is none.
    """
    info = getattr(nc, "_server_info", None)
    return info if isinstance(info, dict) else {}


#: How long closing a client may take. nats-py's ``close()`` never returns after a
#: connect that failed in the TLS handshake (tests/test_secured.py shows it).
CLOSE_TIMEOUT_S = 2.0


async def close_client(nc: _Client, timeout: float = CLOSE_TIMEOUT_S) -> None:
    """Close ``nc``, giving up after ``timeout`` seconds; never raises.

    Args:
        nc: the client (connected, failed or closed already).
        timeout: seconds ``close()`` may take.
    """
    try:
        async with asyncio.timeout(timeout):
            await nc.close()
    except TimeoutError:
        # A client left half-open by a failed handshake: nothing is left to flush.
        log.debug("closing a NATS client did not finish within %gs; left", timeout)
    except Exception as exc:  # closing a broken client must not fail its caller
        log.debug("closing a NATS client: %r", exc)


def _on_tls(transport: Any) -> bool:
    """Whether nats-py's TCP transport runs over TLS (its writer has an SSL object)."""
    writer = getattr(transport, "_io_writer", None)
    return writer is not None and writer.get_extra_info("ssl_object") is not None


class OrderedFlushClient(_Client):
    """A nats-py client whose PINGs travel behind the commands sent before them, whose
    read loop survives a late PONG, and that never sends a message the server refuses."""

    def __init__(self) -> None:
        super().__init__()
        self._ps: ReceiveParser = ReceiveParser(self)

    async def subscribe_batched(
        self,
        subject: str,
        queue: str,
        pending_msgs_limit: int,
        pending_bytes_limit: int,
        receiver: Receiver | None = None,
    ) -> tuple[Subscription, Receiver]:
        """Subscribe, the messages going to a :class:`Receiver` in batches (no ``Msg``,
        no callback): for a consumer that takes many messages at once.

        It is a nats-py subscription all the same: re-made on a reconnect, ended by
        ``drain()`` or ``unsubscribe()``; call :meth:`unbatch` once it is over.

        Args:
            subject: the subject (wildcards allowed).
            queue: the queue group.
            pending_msgs_limit: messages held before more are dropped as a slow consumer.
            pending_bytes_limit: payload bytes held before more are dropped.
            receiver: an open receiver to go on filling (a subscription made again
                after a pause: the messages it still holds stay ahead of the new ones).

        Returns:
            The subscription and its receiver.
        """
        if receiver is None or receiver.closed:
            receiver = Receiver(pending_msgs_limit, pending_bytes_limit)
        sub = await self.subscribe(
            subject,
            queue=queue,
            pending_msgs_limit=pending_msgs_limit,
            pending_bytes_limit=pending_bytes_limit,
        )
        self._ps.batch(sub._id, receiver)
        # A message parsed before the line above (the SUB may have gone out and been
        # answered while subscribe() awaited) went to nats-py's queue: move it over.
        pending = sub._pending_queue
        while not pending.empty():
            msg = pending.get_nowait()
            pending.task_done()
            sub._pending_size -= len(msg.data)
            if not receiver.offer(Incoming(msg.subject, msg.reply, msg.data, msg.headers)):
                await self._error_cb(
                    SlowConsumerError(subject=msg.subject, reply=msg.reply, sid=sub._id, sub=sub)
                )
        if receiver.pending_msgs:
            receiver.wake()
        return sub, receiver

    async def publish_many(self, messages: list[tuple[str, bytes]]) -> None:
        """Publish ``(subject, payload)`` messages (no reply, no headers) as one write:
        the replies to a committed batch of request-reply writes, or its JetStream
        acks, cost one buffer append instead of one ``publish()`` each.

        Args:
            messages: subjects and payloads, sent in this order.

        Raises:
            BadSubjectError, ConnectionClosedError, ConnectionDrainingError,
            OutboundBufferLimitError, MaxPayloadError: as ``publish()`` raises them,
                before anything is sent.
        """
        if not messages:
            return
        if any(not subject or " " in subject for subject, _ in messages):
            raise BadSubjectError
        if self.is_closed:
            raise ConnectionClosedError
        if self.is_draining_pubs:
            raise ConnectionDrainingError
        command = b"".join(
            b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(payload), payload)
            for subject, payload in messages
        )
        size = sum(len(payload) for _, payload in messages)
        if not self.is_connected and (
            self._max_pending_size <= 0
            or len(command) + self._pending_data_size > self._max_pending_size
        ):
            raise OutboundBufferLimitError
        if any(len(payload) > self._max_payload for _, payload in messages):
            raise MaxPayloadError
        self.stats["out_msgs"] += len(messages)
        self.stats["out_bytes"] += size
        await self._send_command(command)
        await self._flush_pending()

    def unbatch(self, sub: Subscription) -> None:
        """Stop handing ``sub``'s messages to its receiver (after its drain)."""
        self._ps.unbatch(sub._id)

    async def _process_connect_init(self) -> None:
        try:
            await super()._process_connect_init()
        except BaseException:
            # nats-py leaves the socket of a failed attempt (refused credentials, TLS)
            # open and opens the next one beside it: one file descriptor per attempt
            # until garbage collection (a ResourceWarning each), twice a second while
            # a server refuses the reconnects.
            if self._transport is not None:
                self._transport.close()  # type: ignore[no-untyped-call]
            raise
        # _send_ping queues PINGs in _pending, which a reconnect keeps and sends on the
        # new connection, while the waits they belonged to were dropped with the old
        # _pongs: their PONGs would then answer the next flush() before its own PING
        # has been processed. Those waits time out either way; their PINGs go here.
        stale = sum(1 for cmd in self._pending if cmd is PING_PROTO)
        if stale:
            self._pending = [cmd for cmd in self._pending if cmd is not PING_PROTO]
            self._pending_data_size -= stale * len(PING_PROTO)

    def _connect_command(self) -> bytes:
        if "tls" in self.options and not _on_tls(self._transport):
            raise SecureConnWantedError  # never send credentials in the clear
        return bytes(super()._connect_command())

    async def _send_ping(self, future: asyncio.Future[bool] | None = None) -> None:
        if future is None:
            future = asyncio.get_running_loop().create_future()
        self._pongs.append(future)
        await self._send_command(PING_PROTO)
        await self._flush_pending()

    async def _process_pong(self) -> None:
        # PONGs come back in the order of the PINGs, so the head of the queue is this
        # PONG's wait even when it has given up (timed out, cancelled): pop it, and
        # only a wait still waiting gets the answer.
        if self._pongs:
            future = self._pongs.pop(0)
            if not future.done():
                future.set_result(True)
            self._pongs_received += 1
            self._pings_outstanding = 0

    async def _process_headers(self, headers: bytes) -> dict[str, str] | None:
        parsed: dict[str, str] | None = await super()._process_headers(headers)
        if parsed and parsed.get(_DESCRIPTION, "").startswith("\n"):
            # A status line without a description ("NATS/1.0 503\r\n") followed by
            # headers: nats-py reads the header lines as the description (and parses
            # them as headers too). There is no description.
            del parsed[_DESCRIPTION]
        return parsed

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


class CommandClient(OrderedFlushClient):
    """The client of an operator command (``health``, ``ready``, ``control``, ``query``):
    it keeps what the server refused once connected, so that a request that gets no
    answer because its user may not publish the subject (or hear the reply) says so,
    rather than time out with nothing to go on."""

    def __init__(self) -> None:
        super().__init__()
        #: The server's refusals (``permissions violation ...``), in lower case.
        self.refused: list[str] = []

    def no_answer(self, subject: str, exc: BaseException) -> str:
        """Why a request on ``subject`` failed with ``exc``, in one line."""
        if self.refused:
            return (
                f"no answer on {subject}: the server refused this user "
                f"({self.refused[-1]}; see docs/operations.md, Least privilege)"
            )
        return f"no answer on {subject}: {exc!r}"
