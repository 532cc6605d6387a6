"""The ordered-flush client keeps flush()'s promise where plain nats-py does not."""

from __future__ import annotations

import asyncio
import inspect
import signal
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import PING_PROTO, Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.protocol.parser import Parser

from store_svc.bus.client import OrderedFlushClient, close_client, server_info
from store_svc.bus.receive import ReceiveParser
from store_svc.devtools.natsserver import NatsServer

from .conftest import until


async def connect(url: str) -> OrderedFlushClient:
    nc = OrderedFlushClient()
    await nc.connect(url)
    return nc


@pytest.mark.logic
def test_the_overridden_method_still_exists_upstream() -> None:
    params = list(inspect.signature(Client._send_ping).parameters)
    assert params == ["self", "future"], (
        "nats-py changed _send_ping; review store_svc/bus/client.py"
    )


async def test_a_subscription_is_live_when_flush_returns(nats_server: NatsServer) -> None:
    requester = await connect(nats_server.url)
    try:
        for i in range(100):
            responder = await connect(nats_server.url)

            async def answer(msg: Msg) -> None:
                await msg.respond(b"ok")

            await responder.subscribe(f"probe.{i}", queue="q", cb=answer)
            await responder.flush()
            reply = await requester.request(f"probe.{i}", b"?", timeout=5)
            assert reply.data == b"ok", i
            await responder.close()
    finally:
        await requester.close()


async def test_drain_keeps_every_message_already_published(nats_server: NatsServer) -> None:
    for _ in range(10):
        sub_nc = await connect(nats_server.url)
        pub_nc = await connect(nats_server.url)
        got: list[int] = []

        async def slow(msg: Msg, got: list[int] = got) -> None:
            got.append(1)
            await asyncio.sleep(0.001)

        sub = await sub_nc.subscribe("x.>", queue="q", cb=slow)
        await sub_nc.flush()
        for _ in range(100):
            await pub_nc.publish("x.y", b"a" * 8000)
        await pub_nc.flush()
        await sub.drain()
        assert len(got) == 100
        await pub_nc.close()
        await sub_nc.close()


@pytest.mark.logic
def test_the_other_overridden_methods_still_exist_upstream() -> None:
    assert list(inspect.signature(Client._process_connect_init).parameters) == ["self"]
    assert list(inspect.signature(Parser.parse).parameters) == ["self", "data"]
    assert list(inspect.signature(Parser.reset).parameters) == ["self"]
    assert "self._ps.parse(" in inspect.getsource(Client._read_loop)
    assert list(inspect.signature(Client._connect_command).parameters) == ["self"]
    assert "self._connect_command()" in inspect.getsource(Client._process_connect_init)


@pytest.mark.parametrize("client", [Client, OrderedFlushClient])
async def test_refused_reconnects_leave_their_sockets_open_in_plain_nats_py(
    client: type[Client], tmp_path: Path
) -> None:
    """A server that refuses the reconnects (the user was removed): nats-py keeps
    each refused attempt's socket open and opens the next one beside it; the service's
    client closes each one."""
    conf = tmp_path / "server.conf"
    conf.write_text('authorization { users = [ { user: "u", password: "right" } ] }\n')
    with NatsServer(extra_args=("-c", str(conf))) as server:
        nc = client()
        refused: list[Any] = []

        async def on_error(exc: Exception) -> None:
            if "authorization" in str(exc).lower() and nc._transport is not None:
                refused.append(nc._transport._io_writer)  # type: ignore[attr-defined]

        await nc.connect(
            server.url, user="u", password="right", error_cb=on_error,
            reconnect_time_wait=0.1, max_reconnect_attempts=-1,
        )  # fmt: skip
        conf.write_text('authorization { users = [ { user: "v", password: "right" } ] }\n')
        assert server.proc is not None
        server.proc.send_signal(signal.SIGHUP)
        await until(lambda: len(refused) >= 8)
        left_open = [not writer.transport.is_closing() for writer in refused]
        await close_client(nc)
        for writer in refused:
            writer.close()
    print(f"{client.__name__}: refused attempts whose socket was left open: {left_open}")
    if client is Client:
        # (A server's reset can close one first; the others stay open.)
        assert any(left_open), "plain nats-py closes them now: drop the fix in client.py"
    else:
        assert not any(left_open)


async def test_messages_of_every_size_arrive_whole_through_the_sliced_parser(
    nats_server: NatsServer,
) -> None:
    # Reads are parsed in 4 KiB slices with turns of the loop between them: messages
    # larger than a slice, and headers and payloads cut at any byte, must arrive whole.
    sizes = [0, 1, 4095, 4096, 4097, 9000, 40_000, 100_000, 3, 8191, 12_289]
    sub_nc = await connect(nats_server.url)
    pub_nc = await connect(nats_server.url)
    got: list[tuple[bytes, dict[str, str] | None]] = []

    async def collect(msg: Msg) -> None:
        got.append((msg.data, msg.headers))

    await sub_nc.subscribe("sizes", cb=collect)
    await sub_nc.flush()
    sent = []
    for round_ in range(20):
        for i, size in enumerate(sizes):
            body = bytes((round_ * 31 + i + k) % 251 for k in range(size)).replace(b"\r", b"\n")
            headers = {"N": str(i), "Pad": "x" * (i * 397 % 3000)} if i % 2 else None
            sent.append((body, headers))
            await pub_nc.publish("sizes", body, headers=headers)
    await pub_nc.flush()
    async with asyncio.timeout(10):
        while len(got) < len(sent):
            await asyncio.sleep(0.01)
    assert got == sent
    await pub_nc.close()
    await sub_nc.close()


class _Recorder:
    """What a parser dispatches (pure logic: no connection)."""

    def __init__(self) -> None:
        self.msgs: list[bytes] = []
        self.stats = {"in_msgs": 0, "in_bytes": 0}
        self._subs: dict[int, Any] = {}

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, hdr: Any
    ) -> None:
        self.msgs.append(data)

    async def _process_pong(self) -> None: ...


@pytest.mark.logic
async def test_a_reset_while_parsing_drops_the_rest_of_the_old_read() -> None:
    nc = _Recorder()
    parser = ReceiveParser(nc)  # type: ignore[arg-type]
    stream = b"".join(b"MSG a 1 1000\r\n" + bytes([65 + i]) * 1000 + b"\r\n" for i in range(40))

    async def reset_soon() -> None:
        await asyncio.sleep(0)
        parser.reset()  # as a reconnect does while the read loop yields

    resetter = asyncio.create_task(reset_soon())
    # Use every turn: a clock that has always run past the slice.
    parser._turns._slice = 0.0
    await parser.parse(stream)
    await resetter
    assert 0 < len(nc.msgs) < 40, "the old stream was fed on after the reset"
    assert parser.buf == bytearray()
    # The fresh parser reads a new stream from its start.
    await parser.parse(b"MSG b 1 2\r\nok\r\n")
    assert nc.msgs[-1] == b"ok"


async def test_pings_queued_while_disconnected_are_not_sent_after_the_reconnect(
    tmp_path: Path,
) -> None:
    server = NatsServer().start()
    port = server.port
    nc = OrderedFlushClient()
    reconnected = asyncio.Event()

    async def on_reconnected() -> None:
        reconnected.set()

    await nc.connect(
        server.url,
        reconnected_cb=on_reconnected,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,  # type: ignore[arg-type]
    )
    after_init: list[list[bytes]] = []
    original = nc._process_connect_init

    async def spy() -> None:
        await original()
        after_init.append(list(nc._pending))

    nc._process_connect_init = spy  # type: ignore[method-assign]
    try:
        server.stop()
        async with asyncio.timeout(10):
            while nc.is_connected:
                await asyncio.sleep(0.01)
        # An RTT probe while the server is away: its PING waits in the pending buffer.
        with pytest.raises(NatsTimeout):
            await nc.rtt(timeout=0.3)  # type: ignore[arg-type]
        assert PING_PROTO in nc._pending
        server = NatsServer(port=port).start()
        await asyncio.wait_for(reconnected.wait(), 15)
        assert after_init, "the reconnect did not go through _process_connect_init"
        assert PING_PROTO not in after_init[-1]
        # Round trips match their own PONGs after the reconnect.
        assert await nc.rtt(timeout=2) < 2  # type: ignore[arg-type]
        assert nc._pongs == []
    finally:
        await nc.close()
        server.stop()


async def test_the_server_info_read_from_nats_py_is_there(nats_server: NatsServer) -> None:
    nc = await connect(nats_server.url)
    try:
        info = server_info(nc)
        assert info["server_id"]
        assert "server_name" in info
    finally:
        await nc.close()
    assert server_info(Client()) == {}


#: A status without a description, with a header after it (how nats-server 2.11+
#: answers a request nobody serves).
BARE_STATUS = b"NATS/1.0 503\r\nNats-Subject: nobody.here\r\n\r\n"


@pytest.mark.logic
async def test_plain_nats_py_reads_the_header_after_a_bare_status_as_its_description() -> None:
    plain = await Client()._process_headers(BARE_STATUS)
    assert plain is not None
    assert plain["Description"] == "\nNats-Subject: nobody.here"  # the slip mended here
    ours = await OrderedFlushClient()._process_headers(BARE_STATUS)
    assert ours == {"Status": "503", "Nats-Subject": "nobody.here"}
    described = b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 5\r\n\r\n"
    assert await OrderedFlushClient()._process_headers(described) == {
        "Status": "408",
        "Description": "Request Timeout",
        "Nats-Pending-Messages": "5",
    }
    assert list(inspect.signature(Client._process_headers).parameters) == ["self", "headers"]


async def test_a_no_responders_status_has_no_description(nats_server: NatsServer) -> None:
    """Both ways a message arrives (a batched subscription, nats-py's own)."""
    nc = await connect(nats_server.url)
    try:
        _, receiver = await nc.subscribe_batched("answers.batched", "", 10, 1 << 20)
        plain = await nc.subscribe("answers.plain")
        await nc.flush()
        for reply in ("answers.batched", "answers.plain"):
            await nc.publish("nobody.here", b"?", reply=reply)
        async with asyncio.timeout(5):
            await receiver.wait()
        (batched,) = receiver.take(10)
        msg = await plain.next_msg(timeout=5)
        for headers in (batched.headers, msg.headers):
            assert headers is not None
            assert headers["Status"] == "503"
            assert "Description" not in headers
            assert headers["Nats-Subject"] == "nobody.here"  # nats-server 2.11+ sends it
    finally:
        await nc.close()
