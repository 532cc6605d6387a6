"""The receive path of the service's NATS clients: a protocol parser, and write
messages handed over in batches.

nats-py's parser matches up to seven regular expressions per protocol line and hands
every message to ``Client._process_msg``, which parses its headers, builds a ``Msg``,
puts it on the subscription's ``asyncio.Queue``, and a task per subscription takes it
off again and awaits the callback: about 9 µs of a 21 µs single-record write went
there (py-spy). :class:`ReceiveParser` reads a line by finding its end and splitting
it, and for a subscription registered with :meth:`~store_svc.bus.client.
OrderedFlushClient.subscribe_batched` puts ``(subject, reply, data, headers)`` straight
into that subscription's :class:`Receiver`, which its consumer empties many messages
at a time: one wake-up per socket read, not one task step per message.

Everything else keeps nats-py's own handling: messages of other subscriptions go to
``_process_msg`` (so requests, micro, JetStream and callbacks behave as before),
``INFO``, ``PING``, ``PONG`` and ``-ERR`` to the client's ``_process_*`` methods, and
headers are parsed by the client's ``_process_headers``. A batched subscription is
still a nats-py subscription (re-subscribed on reconnect, drained by ``drain()``);
its limits are kept here with nats-py's rule (a message is dropped as a slow consumer
once the pending messages or bytes reach the limit) and its drops reach the client's
error callback as ``SlowConsumerError``, as nats-py reports them.
``tests/test_receive.py`` feeds both parsers the same protocol streams, cut at every
byte, and requires the same calls.

Like the parser it replaces (``bus/client.py``), it gives the event loop a turn once
it has parsed for ``TURN_SLICE_S``, and it stops on a reset (a reconnect) at once:
the rest of the buffer belonged to the old connection.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any, NamedTuple

from nats.errors import ProtocolError, SlowConsumerError
from nats.protocol.parser import AWAITING_CONTROL_LINE, AWAITING_MSG_PAYLOAD, Parser

from store_svc.tasks import Turns

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = ["Incoming", "ReceiveParser", "Receiver"]

#: Bytes parsed before the parser looks at the clock (about 20 small messages).
PARSE_SLICE = 4096

_CRLF = b"\r\n"

#: Decoded subjects remembered (then forgotten all at once): one per kind and symbol.
SUBJECT_CACHE = 4096


class Incoming(NamedTuple):
    """One message of a batched subscription (read as a ``Msg`` is: the same names)."""

    subject: str
    reply: str
    data: bytes
    headers: dict[str, str] | None


class Receiver:
    """The messages of one batched subscription not yet taken by its consumer.

    Args:
        msgs_limit: messages held before more are dropped (nats-py's
            ``pending_msgs_limit``).
        bytes_limit: payload bytes held before more are dropped (``pending_bytes_limit``).
    """

    def __init__(self, msgs_limit: int, bytes_limit: int) -> None:
        self._items: list[Incoming] = []
        self._bytes = 0
        self._msgs_limit = msgs_limit
        self._bytes_limit = bytes_limit
        self._event = asyncio.Event()
        self.closed = False

    @property
    def pending_msgs(self) -> int:
        """Messages waiting to be taken."""
        return len(self._items)

    @property
    def pending_bytes(self) -> int:
        """Payload bytes waiting to be taken."""
        return self._bytes

    def offer(self, item: Incoming) -> bool:
        """Hold ``item``; False (dropped) when a limit is reached, as nats-py drops, or
        once the receiver is closed (nothing would take it)."""
        size = len(item.data)
        if (
            self.closed
            or len(self._items) >= self._msgs_limit
            or (self._bytes_limit > 0 and self._bytes + size >= self._bytes_limit)
        ):
            return False
        self._items.append(item)
        self._bytes += size
        return True

    def wake(self) -> None:
        """Tell the consumer that messages came (once per parsed read, not per message)."""
        self._event.set()

    def take(self, most: int) -> list[Incoming]:
        """Up to ``most`` of the oldest messages, in order (the rest stay pending)."""
        items = self._items
        if len(items) <= most:
            self._items = []
            self._bytes = 0
            return items
        head = items[:most]
        del items[:most]
        self._bytes -= sum(len(i.data) for i in head)
        return head

    async def wait(self) -> None:
        """Wait until a message is pending or the receiver is closed."""
        while not self._items and not self.closed:
            self._event.clear()
            await self._event.wait()

    def close(self) -> None:
        """No more messages will come; the consumer takes what is left, then stops."""
        self.closed = True
        self._event.set()


class ReceiveParser(Parser):
    """nats-py's parser, reading lines by their end and handing batched messages over.

    Args:
        nc: the client; its ``_batched`` maps subscription ids to receivers.
    """

    def __init__(self, nc: Client) -> None:
        self.generation = 0
        super().__init__(nc)
        self._turns = Turns()
        self._batched: dict[int, Receiver] = {}
        self._subjects: dict[bytes, str] = {}

    def reset(self) -> None:
        # A reset (a reconnect) starts a new byte stream: counted, so that a read of
        # the old connection being parsed across a turn of the loop is not fed on.
        self.generation += 1
        super().reset()

    def batch(self, sid: int, receiver: Receiver) -> None:
        """Hand the messages of subscription ``sid`` to ``receiver`` from now on."""
        self._batched[sid] = receiver

    def unbatch(self, sid: int) -> None:
        """Stop handing over the messages of ``sid`` (they go to nats-py again)."""
        self._batched.pop(sid, None)

    async def parse(self, data: bytes = b"") -> None:
        generation = self.generation
        buf = self.buf
        buf.extend(data)
        nc: Any = self.nc
        stats = nc.stats
        subs = nc._subs
        subjects = self._subjects
        pos = 0
        checked = 0
        woken: set[Receiver] = set()
        try:
            while True:
                if pos - checked >= PARSE_SLICE:
                    checked = pos
                    self._wake(woken)
                    await self._turns.take()
                    if self.generation != generation:
                        return
                if self.state == AWAITING_MSG_PAYLOAD:
                    needed = self.needed
                    if len(buf) - pos < needed + 2:
                        break
                    hsize = self.header_needed
                    arg = self.msg_arg
                    if hsize:
                        hdr: bytes | None = bytes(buf[pos : pos + hsize])
                        payload = bytes(buf[pos + hsize : pos + needed])
                        self.header_needed = 0
                    else:
                        hdr = None
                        payload = bytes(buf[pos : pos + needed])
                    pos += needed + 2
                    self.state = AWAITING_CONTROL_LINE
                    sid = arg["sid"]
                    receiver = self._batched.get(sid)
                    if receiver is None:
                        self._wake(woken)
                        await nc._process_msg(sid, arg["subject"], arg["reply"], payload, hdr)
                    else:
                        woken.add(receiver)
                        await self._hand_over(
                            receiver, sid, arg["subject"], arg["reply"], payload, hdr
                        )
                    if self.generation != generation:
                        return
                    continue
                eol = buf.find(_CRLF, pos)
                if eol < 0:
                    break
                if buf.startswith(b"MSG ", pos):
                    # The hot path: a message without headers, whole in the buffer,
                    # of a batched subscription, is handed over without a suspension
                    # (what Client._process_msg does, for a Receiver).
                    parts = bytes(buf[pos + 4 : eol]).split()
                    if len(parts) == 3 or len(parts) == 4:
                        try:
                            sid = int(parts[1])
                            start = eol + 2
                            stop = start + int(parts[-1])
                        except ValueError:
                            raise ProtocolError("nats: malformed MSG") from None
                        receiver = self._batched.get(sid)
                        if receiver is not None and len(buf) >= stop + 2:
                            pos = stop + 2
                            payload = bytes(buf[start:stop])
                            stats["in_msgs"] += 1
                            stats["in_bytes"] += stop - start
                            sub = subs.get(sid)
                            if sub is None:
                                continue  # unsubscribed meanwhile: nats-py skips it too
                            sub._received += 1
                            subject = subjects.get(parts[0])
                            if subject is None:
                                subject = self._subject(parts[0])
                            reply = parts[2].decode() if len(parts) == 4 else ""
                            if receiver.offer(Incoming(subject, reply, payload, None)):
                                woken.add(receiver)
                                continue
                            # Over its limits: reported as nats-py reports it.
                            self._wake(woken)
                            await nc._error_cb(
                                SlowConsumerError(subject=subject, reply=reply, sid=sid, sub=sub)
                            )
                            if self.generation != generation:
                                return
                            continue
                if buf.startswith(b"MSG", pos) or buf.startswith(b"HMSG", pos):
                    self._message_line(bytes(buf[pos:eol]))
                    pos = eol + 2
                    continue
                line = bytes(buf[pos:eol])
                pos = eol + 2
                self._wake(woken)
                word = line.split(None, 1)[0] if line.strip() else b""
                if word == b"PING":
                    await nc._process_ping()
                elif word == b"PONG":
                    await nc._process_pong()
                elif word == b"+OK":
                    pass
                elif word == b"-ERR":
                    await nc._process_err(line[4:].strip().decode(errors="replace").lower())
                elif word == b"INFO":
                    try:
                        info = json.loads(line[4:].strip().decode())
                    except ValueError:  # as nats-py's parser fails on it: a protocol error
                        raise ProtocolError("nats: malformed INFO") from None
                    if not isinstance(info, dict):
                        raise ProtocolError("nats: malformed INFO")
                    await nc._process_info(info)
                else:
                    raise ProtocolError("nats: unknown protocol")
                if self.generation != generation:
                    return
        finally:
            self._wake(woken)
        del buf[:pos]

    def _message_line(self, line: bytes) -> None:
        """Read a ``MSG``/``HMSG`` line into the state, as nats-py's parser does."""
        parts = line.split()
        try:
            if parts[0] == b"MSG" and len(parts) in (4, 5):
                self.header_needed = 0
                size = parts[-1]
            elif parts[0] == b"HMSG" and len(parts) in (5, 6):
                self.header_needed = int(parts[-2])
                size = parts[-1]
            else:
                raise ValueError(line[:64])
            reply = parts[3] if len(parts) == (6 if parts[0] == b"HMSG" else 5) else b""
            self.msg_arg = {"subject": parts[1], "sid": int(parts[2]), "reply": reply}
            self.needed = int(size)
        except (ValueError, IndexError):
            raise ProtocolError("nats: malformed MSG") from None
        self.state = AWAITING_MSG_PAYLOAD

    async def _hand_over(
        self,
        receiver: Receiver,
        sid: int,
        subject: bytes,
        reply: bytes,
        payload: bytes,
        hdr: bytes | None,
    ) -> None:
        """What ``Client._process_msg`` does for a subscription, into ``receiver``."""
        nc: Any = self.nc
        stats = nc.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(payload)
        sub = nc._subs.get(sid)
        if sub is None:
            return  # unsubscribed meanwhile: nats-py skips it too
        sub._received += 1
        headers = await nc._process_headers(hdr) if hdr else None
        item = Incoming(subject.decode(), reply.decode(), payload, headers)
        if not receiver.offer(item):
            await nc._error_cb(
                SlowConsumerError(subject=item.subject, reply=item.reply, sid=sid, sub=sub)
            )

    def _subject(self, raw: bytes) -> str:
        """``raw`` decoded, remembered: write subjects repeat (kind and symbol)."""
        subjects = self._subjects
        if len(subjects) >= SUBJECT_CACHE:
            subjects.clear()
        subject = subjects[raw] = raw.decode()
        return subject

    @staticmethod
    def _wake(woken: set[Receiver]) -> None:
        for receiver in woken:
            receiver.wake()
        woken.clear()
