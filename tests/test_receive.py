"""The client's receive path (bus/receive.py): the same protocol reading as nats-py's
parser, and batched subscriptions against a real server."""

from __future__ import annotations

import asyncio
import inspect
import json
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.errors import ConnectionClosedError, ProtocolError, SlowConsumerError
from nats.protocol.parser import Parser

from store_svc.bus.client import OrderedFlushClient
from store_svc.bus.receive import Incoming, ReceiveParser, Receiver
from store_svc.devtools.natsserver import NatsServer
from store_svc.ingest.edge import drain_subscription

from .conftest import until


class _Sub:
    _received = 0


class _Recorder:
    """What a parser hands to the client (pure logic: no connection)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.stats = {"in_msgs": 0, "in_bytes": 0}
        self._subs: dict[int, Any] = {1: _Sub(), 7: _Sub()}

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, hdr: Any):  # type: ignore[no-untyped-def]
        self.calls.append(("msg", sid, bytes(subject), bytes(reply), data, hdr))

    async def _process_headers(self, hdr: bytes) -> dict[str, str]:
        return {"raw": hdr.decode()}

    async def _process_ping(self) -> None:
        self.calls.append(("ping",))

    async def _process_pong(self) -> None:
        self.calls.append(("pong",))

    async def _process_err(self, text: str) -> None:
        self.calls.append(("err", text))

    async def _process_info(self, info: dict[str, Any]) -> None:
        self.calls.append(("info", info))

    async def _error_cb(self, exc: Exception) -> None:
        self.calls.append(("error", type(exc).__name__))


def _hmsg(subject: bytes, sid: int, reply: bytes, hdr: bytes, payload: bytes) -> bytes:
    args = b" ".join(a for a in (subject, b"%d" % sid, reply) if a)
    return b"HMSG %s %d %d\r\n%s%s\r\n" % (args, len(hdr), len(hdr) + len(payload), hdr, payload)


#: What a server sends, op by op: every op nats-py reads, payloads holding CRLF,
#: empty payloads and headers, replies or none, uneven spacing.
STREAM = b"".join(
    [
        b'INFO {"server_id":"x","max_payload":1048576}\r\n',
        b"MSG mdp.store.write.trades 1 5\r\nhello\r\n",
        b"MSG mdp.store.write.trades.AAPL 1 _INBOX.abc.1 4\r\n\r\n\r\n\r\n",
        b"PING\r\n",
        b"MSG a 7 0\r\n\r\n",
        _hmsg(b"a.b", 1, b"", b"NATS/1.0\r\nX-A: 1\r\n\r\n", b"world"),
        _hmsg(b"a.b", 7, b"$JS.ACK.S.C.1.2.3.4.5", b"NATS/1.0 100\r\n\r\n", b""),
        _hmsg(b"a.c", 1, b"r.2", b"NATS/1.0\r\nB: 2\r\n\r\n", b"x\r\ny"),
        b"+OK\r\n",
        b"MSG  spaced  1  r.1  3\r\nabc\r\n",
        b"PONG\r\n",
        b"-ERR 'Permissions Violation for Publish to \"x\"'\r\n",
        b"MSG big 1 5000\r\n" + bytes(range(256)) * 19 + b"\r\n" * 68 + b"\r\n",
    ]
)


async def _replay(parser: Parser, chunks: list[bytes]) -> None:
    for chunk in chunks:
        await parser.parse(chunk)


def _cuts(stream: bytes) -> list[list[bytes]]:
    """The stream whole, cut once at every byte, and in pieces of 1, 2, 3 and 7 bytes."""
    out = [[stream]]
    out += [[stream[:i], stream[i:]] for i in range(1, len(stream))]
    for step in (1, 2, 3, 7):
        out.append([stream[i : i + step] for i in range(0, len(stream), step)])
    return out


@pytest.mark.logic
async def test_the_receive_parser_hands_over_what_nats_py_does_at_every_cut() -> None:
    upstream = _Recorder()
    await _replay(Parser(upstream), [STREAM])  # type: ignore[arg-type]
    assert len([c for c in upstream.calls if c[0] == "msg"]) == 8
    for chunks in _cuts(STREAM):
        ours = _Recorder()
        await _replay(ReceiveParser(ours), chunks)  # type: ignore[arg-type]
        assert ours.calls == upstream.calls, [len(c) for c in chunks]


@pytest.mark.logic
async def test_a_batched_subscription_gets_its_messages_in_order_at_every_cut() -> None:
    upstream = _Recorder()
    await _replay(Parser(upstream), [STREAM])  # type: ignore[arg-type]
    expected_rest = [c for c in upstream.calls if not (c[0] == "msg" and c[1] == 1)]
    expected = [
        Incoming(c[2].decode(), c[3].decode(), c[4], {"raw": c[5].decode()} if c[5] else None)
        for c in upstream.calls
        if c[0] == "msg" and c[1] == 1
    ]
    for chunks in _cuts(STREAM):
        ours = _Recorder()
        parser = ReceiveParser(ours)  # type: ignore[arg-type]
        receiver = Receiver(1000, 1 << 20)
        parser.batch(1, receiver)
        await _replay(parser, chunks)
        assert receiver.take(1000) == expected
        assert ours.calls == expected_rest  # sid 7, pings, errors: nats-py's way
        assert ours.stats["in_msgs"] == len(expected)
        assert ours.stats["in_bytes"] == sum(len(i.data) for i in expected)


@pytest.mark.logic
@pytest.mark.parametrize(
    "line", [b"MSG a b 3\r\nabc\r\n", b"MSG a 1 x\r\n", b"HMSG a 1 2\r\n", b"BOGUS\r\n", b"\r\n"]
)
async def test_a_malformed_line_is_a_protocol_error_for_both(line: bytes) -> None:
    for parser_class in (Parser, ReceiveParser):
        with pytest.raises(ProtocolError):
            await parser_class(_Recorder()).parse(line)  # type: ignore[arg-type]


@pytest.mark.logic
async def test_a_full_receiver_drops_as_nats_py_drops_and_reports_it() -> None:
    nc = _Recorder()
    parser = ReceiveParser(nc)  # type: ignore[arg-type]
    receiver = Receiver(3, 1 << 20)
    parser.batch(1, receiver)
    await parser.parse(b"".join(b"MSG s 1 1\r\n%d\r\n" % i for i in range(5)))
    assert [i.data for i in receiver.take(10)] == [b"0", b"1", b"2"]
    assert nc.calls == [("error", "SlowConsumerError")] * 2
    # Bytes: nats-py drops once the pending bytes would reach the limit.
    by_bytes = Receiver(100, 10)
    assert by_bytes.offer(Incoming("s", "", b"x" * 9, None))
    assert not by_bytes.offer(Incoming("s", "", b"x", None))
    assert by_bytes.pending_bytes == 9


@pytest.mark.logic
async def test_take_leaves_the_rest_pending_with_its_bytes() -> None:
    receiver = Receiver(100, 0)
    for i in range(5):
        assert receiver.offer(Incoming("s", "", b"x" * (i + 1), None))
    assert [len(i.data) for i in receiver.take(2)] == [1, 2]
    assert receiver.pending_msgs == 3
    assert receiver.pending_bytes == 3 + 4 + 5
    receiver.close()
    await asyncio.wait_for(receiver.wait(), 1)  # pending: no wait
    assert len(receiver.take(10)) == 3
    await asyncio.wait_for(receiver.wait(), 1)  # closed: no wait either


@pytest.mark.logic
def test_what_the_receive_path_uses_of_nats_py_is_still_there() -> None:
    assert list(inspect.signature(Client._process_headers).parameters) == ["self", "headers"]
    assert list(inspect.signature(Client._process_msg).parameters) == [
        "self", "sid", "subject", "reply", "data", "headers",
    ]  # fmt: skip
    assert list(inspect.signature(Client._send_command).parameters) == [
        "self", "cmd", "priority",
    ]  # fmt: skip
    assert list(inspect.signature(Client._flush_pending).parameters) == ["self", "force_flush"]
    source = inspect.getsource(Client._process_msg)
    for used in ('self.stats["in_msgs"]', "self._subs.get(sid)", "sub._received += 1"):
        assert used in source, used
    sub_init = inspect.getsource(Subscription.__init__)
    assert "self._pending_queue" in sub_init
    assert "self._id = id" in sub_init


async def _connect(url: str, **kwargs: Any) -> OrderedFlushClient:
    nc = OrderedFlushClient()
    await nc.connect(url, **kwargs)
    return nc


async def test_a_batched_subscription_receives_everything_in_order(nats_server: NatsServer) -> None:
    sub_nc = await _connect(nats_server.url)
    pub_nc = await _connect(nats_server.url)
    try:
        sub, receiver = await sub_nc.subscribe_batched("w.>", "q", 100_000, 1 << 30)
        await sub_nc.flush()
        sent = []
        for i in range(3000):
            headers = {"N": str(i)} if i % 3 == 0 else None
            reply = f"r.{i}" if i % 5 == 0 else ""
            body = b"x" * (i % 700)
            sent.append(Incoming(f"w.{i % 7}", reply, body, headers))
            await pub_nc.publish(f"w.{i % 7}", body, reply=reply, headers=headers)
        await pub_nc.flush()
        got: list[Incoming] = []
        async with asyncio.timeout(10):
            while len(got) < len(sent):
                await receiver.wait()
                got += receiver.take(256)
        assert got == sent
        assert sub.subject == "w.>"
        assert sub.queue == "q"
    finally:
        await pub_nc.close()
        await sub_nc.close()


async def test_drain_brings_in_everything_published_before_it(nats_server: NatsServer) -> None:
    for _ in range(5):
        sub_nc = await _connect(nats_server.url)
        pub_nc = await _connect(nats_server.url)
        sub, receiver = await sub_nc.subscribe_batched("x.>", "q", 100_000, 1 << 30)
        await sub_nc.flush()
        for _ in range(300):
            await pub_nc.publish("x.y", b"a" * 8000)
        await pub_nc.flush()
        await sub.drain()
        sub_nc.unbatch(sub)
        assert receiver.pending_msgs == 300
        await pub_nc.close()
        await sub_nc.close()


async def test_a_batched_subscriptions_drops_reach_the_error_callback(
    nats_server: NatsServer,
) -> None:
    drops: list[SlowConsumerError] = []

    async def on_error(exc: Exception) -> None:
        if isinstance(exc, SlowConsumerError):
            drops.append(exc)

    sub_nc = await _connect(nats_server.url, error_cb=on_error)
    pub_nc = await _connect(nats_server.url)
    try:
        _, receiver = await sub_nc.subscribe_batched("s.>", "", 10, 1 << 30)
        await sub_nc.flush()
        for i in range(25):
            await pub_nc.publish("s.t", str(i).encode(), reply="r")
        await pub_nc.flush()
        await until(lambda: receiver.pending_msgs + len(drops) == 25)
        assert receiver.pending_msgs == 10
        assert {(d.subject, d.reply) for d in drops} == {("s.t", "r")}
    finally:
        await pub_nc.close()
        await sub_nc.close()


async def test_a_batched_subscription_comes_back_after_a_server_restart(
    tmp_path: Any,
) -> None:
    server = NatsServer().start()
    port = server.port
    reconnected = asyncio.Event()

    async def on_reconnected() -> None:
        reconnected.set()

    sub_nc = await _connect(
        server.url, reconnected_cb=on_reconnected, reconnect_time_wait=0.1,
        max_reconnect_attempts=-1,
    )  # fmt: skip
    try:
        _, receiver = await sub_nc.subscribe_batched("z.>", "q", 1000, 1 << 20)
        server.stop()
        server = NatsServer(port=port).start()
        await asyncio.wait_for(reconnected.wait(), 10)
        await sub_nc.flush()
        pub_nc = await _connect(server.url)
        await pub_nc.publish("z.a", b"after")
        await pub_nc.flush()
        await asyncio.wait_for(receiver.wait(), 5)
        assert [i.data for i in receiver.take(10)] == [b"after"]
        await pub_nc.close()
    finally:
        await sub_nc.close()
        server.stop()


async def test_publish_many_sends_in_order_and_refuses_once_closed(
    nats_server: NatsServer,
) -> None:
    sub_nc = await _connect(nats_server.url)
    pub_nc = await _connect(nats_server.url)
    got: list[tuple[str, bytes]] = []

    async def collect(msg: Any) -> None:
        got.append((msg.subject, msg.data))

    await sub_nc.subscribe("m.>", cb=collect)
    await sub_nc.flush()
    messages = [(f"m.{i % 4}", json.dumps({"i": i}).encode() if i % 2 else b"") for i in range(500)]
    await pub_nc.publish_many(messages[:250])
    await pub_nc.publish_many([])
    await pub_nc.publish_many(messages[250:])
    await pub_nc.flush()
    await until(lambda: len(got) == len(messages))
    assert got == messages
    assert pub_nc.stats["out_msgs"] == 500
    await pub_nc.close()
    with pytest.raises(ConnectionClosedError):
        await pub_nc.publish_many(messages[:1])
    await sub_nc.close()


async def test_a_drain_cut_short_leaves_no_subscription_behind(nats_server: NatsServer) -> None:
    """The server frozen mid-drain: the drain gives up, and the subscription must not
    stay with the client, to be made again at the next reconnect and take writes that
    nothing reads."""
    assert nats_server.proc is not None
    nc = await _connect(nats_server.url)
    try:
        sub, _ = await nc.subscribe_batched("d.>", "q", 1000, 1 << 20)
        await nc.flush()
        nats_server.freeze()
        try:
            await drain_subscription(sub, 0.3)  # its round trip cannot come back
        finally:
            nats_server.thaw()
        assert sub._id not in nc._subs
    finally:
        await nc.close()


@pytest.mark.logic
def test_what_a_cut_short_drain_uses_of_nats_py_is_still_there() -> None:
    assert list(inspect.signature(Client._remove_sub).parameters) == ["self", "sid", "max_msgs"]
    assert list(inspect.signature(Client._send_unsubscribe).parameters) == [
        "self", "sid", "limit",
    ]  # fmt: skip
    assert "self._closed = True" in inspect.getsource(Subscription._drain)


@pytest.mark.logic
async def test_a_malformed_info_is_a_protocol_error_so_the_client_reconnects() -> None:
    # nats-py's parser lets json's error out, which ends the read loop without a
    # reconnect; a ProtocolError is what the read loop turns into a reconnect.
    with pytest.raises(ProtocolError):
        await ReceiveParser(_Recorder()).parse(b"INFO {not json\r\n")  # type: ignore[arg-type]
