"""The ordered-flush client keeps flush()'s promise where plain nats-py does not."""

from __future__ import annotations

import asyncio
import inspect

from nats.aio.client import Client
from nats.aio.msg import Msg

from store_svc.natsclient import OrderedFlushClient
from store_svc.natsserver import NatsServer


async def connect(url: str) -> OrderedFlushClient:
    nc = OrderedFlushClient()
    await nc.connect(url)
    return nc


def test_the_overridden_method_still_exists_upstream() -> None:
    params = list(inspect.signature(Client._send_ping).parameters)
    assert params == ["self", "future"], "nats-py changed _send_ping; review natsclient.py"


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
