"""The ``store-svc`` command line.

Only this module (and ``__main__``) touches the event loop policy and signals:
SIGTERM and SIGINT just set an Event that starts the clean shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

import pydantic
import uvloop

from store_svc import __version__
from store_svc.bus.client import CommandClient
from store_svc.constants import STOP_OVERRUN_S
from store_svc.errors import StoreError
from store_svc.read.cli import add_query_parser
from store_svc.runtime.heap import settle_heap
from store_svc.runtime.watchdog import StopWatchdog
from store_svc.settings import Settings, load_settings, unknown_environment
from store_svc.tasks import cancel_and_wait

__all__ = ["main"]

log = logging.getLogger("store_svc")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


#: The watchdogs of shutdowns under way: disarmed once the event loop has ended.
_STOP_WATCHDOGS: list[StopWatchdog] = []


def _arm_stop_watchdog(settings: Settings) -> None:
    """Every step of a stop is bounded by the grace period; should one still hang, the
    watchdog logs where and ends the process (the loop's own teardown too)."""
    watchdog = StopWatchdog(asyncio.get_running_loop(), settings.shutdown_grace_s + STOP_OVERRUN_S)
    _STOP_WATCHDOGS.append(watchdog)
    watchdog.arm()


async def _run(settings: Settings) -> int:
    from store_svc.runtime.service import StoreService

    stop = asyncio.Event()
    _stop_on_signals(stop)
    svc = StoreService(settings)
    # A signal during start-up (waiting for NATS, or for JetStream to answer) stops
    # it: start() undoes what it began when cancelled.
    starting = asyncio.create_task(svc.start(), name="start-up")
    signalled = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        log.info("signal received during start-up, stopping")
        _arm_stop_watchdog(settings)
        await cancel_and_wait(starting, patience=settings.shutdown_grace_s)
        if not starting.cancelled() and starting.exception() is None:
            await svc.stop()  # it started all the same (a cancellation swallowed)
        return 0
    signalled.cancel()
    starting.result()  # a start-up error ends the process here
    try:
        lost = asyncio.create_task(svc.connection_lost.wait())
        signalled = asyncio.create_task(stop.wait())
        await asyncio.wait({lost, signalled}, return_when=asyncio.FIRST_COMPLETED)
        for task in (lost, signalled):
            task.cancel()
        if svc.connection_lost.is_set():
            log.error("shutting down: the NATS connection is gone (exit code 1)")
            code = 1
        else:
            log.info("signal received, shutting down")
            code = 0
        _arm_stop_watchdog(settings)
    finally:
        await svc.stop()
    return code


def _cmd_run(args: argparse.Namespace) -> Coroutine[Any, Any, int]:
    settings = load_settings()
    _setup_logging(settings.log_level)
    for name in unknown_environment():
        log.warning("%s names no setting and is ignored (see docs/settings.md)", name)
    return _run(settings)


def _cmd_demo(args: argparse.Namespace) -> Coroutine[Any, Any, int]:
    from store_svc.devtools.demo import run_demo

    settings = load_settings(**({"database_url": args.database_url} if args.database_url else {}))
    _setup_logging("WARNING")
    return run_demo(settings, seconds=args.seconds, rate=args.rate)


async def _client(settings: Settings, timeout: float, command: str) -> CommandClient | None:
    """A short-lived client for an operator command, or None when NATS cannot be had
    (reported in one line that names the cause: refused, timed out, authorization, TLS)."""
    from store_svc.bus.auth import (
        connect_failure,
        connect_options,
        permission_refusal,
        redact_url,
    )
    from store_svc.bus.client import close_client

    where = ", ".join(redact_url(u) for u in settings.nats_servers)
    causes: list[tuple[str, bool]] = []
    nc = CommandClient()

    async def on_error(exc: Exception) -> None:
        # Instead of nats-py's default, which logs a whole traceback per attempt.
        refusal = permission_refusal(str(exc))
        if refusal is not None:
            nc.refused.append(refusal)
        else:
            causes.append(connect_failure(exc))

    try:
        options = connect_options(settings)
        async with asyncio.timeout(timeout):
            await nc.connect(
                servers=settings.nats_servers,
                allow_reconnect=False,
                connect_timeout=timeout,  # type: ignore[arg-type]  # nats-py takes floats
                error_cb=on_error,
                **options,
            )
    except Exception as exc:
        await close_client(nc)
        causes.append(connect_failure(exc))
        # The server's refusal explains the reset that follows it: name the refusal.
        refused = next((c for c, final in causes if final), None)
        cause = refused or causes[0][0]
        if isinstance(exc, TimeoutError) and len(causes) == 1:
            cause = f"timed out after {timeout:g}s"
        # As the service says it: "reach" while it may come, "connect" when refused.
        verb = "connect to" if refused else "reach"
        print(f"store-svc {command}: cannot {verb} NATS at {where}: {cause}", file=sys.stderr)
        return None
    return nc


async def _probe(settings: Settings, what: str, timeout: float) -> int:
    nc = await _client(settings, timeout, what)
    if nc is None:
        return 1
    try:
        reply = await nc.request(settings.subject("store", what), b"", timeout=timeout)
    except Exception as exc:
        print(
            f"store-svc {what}: {nc.no_answer(settings.subject('store', what), exc)}",
            file=sys.stderr,
        )
        return 1
    finally:
        await nc.close()
    print(reply.data.decode())
    headers = reply.headers or {}
    if "Nats-Service-Error-Code" in headers:
        print(f"store-svc {what}: {headers.get('Nats-Service-Error', '')}", file=sys.stderr)
        return 1
    if what == "health":
        return 0 if json.loads(reply.data).get("state") != "unhealthy" else 1
    return 0


async def _control(settings: Settings, action: str, timeout: float) -> int:
    if settings.admin_token is None:
        print("store-svc control: set STORE_ADMIN_TOKEN (or ADMIN_TOKEN)", file=sys.stderr)
        return 2
    nc = await _client(settings, timeout, "control")
    if nc is None:
        return 1
    subject = settings.subject("store", "control", action)
    try:
        reply = await nc.request(
            subject,
            b"",
            timeout=timeout,
            headers={
                "Authorization": f"Bearer {settings.admin_token.get_secret_value()}",
                "Md-Actor": f"store-svc-cli@{socket.gethostname()}",
            },
        )
    except Exception as exc:
        print(f"store-svc control: {nc.no_answer(subject, exc)}", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
    print(reply.data.decode())
    return 0 if not (reply.headers or {}).get("Nats-Service-Error-Code") else 1


def _cmd_control(args: argparse.Namespace) -> Coroutine[Any, Any, int]:
    return _control(load_settings(), args.action, args.timeout)


def _cmd_probe(args: argparse.Namespace) -> Coroutine[Any, Any, int]:
    return _probe(load_settings(), args.command, args.timeout)


async def _query(settings: Settings, args: argparse.Namespace) -> int:
    from store_svc.read.cli import run_query

    nc = await _client(settings, args.timeout, "query")
    if nc is None:
        return 1
    try:
        return await run_query(settings, nc, args)
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def _cmd_query(args: argparse.Namespace) -> Coroutine[Any, Any, int]:
    return _query(load_settings(), args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``store-svc``.

    Returns:
        The parser, with one sub-command per action.
    """
    parser = argparse.ArgumentParser(
        prog="store-svc",
        description="NATS-native market-data store. Settings come from STORE_* environment "
        "variables (see docs/settings.md).",
    )
    parser.add_argument("--version", action="version", version=f"store-svc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the service until SIGTERM/SIGINT")
    run.set_defaults(func=_cmd_run)

    demo = sub.add_parser(
        "demo",
        help="start a private nats-server, the service on SQLite and a synthetic feed; "
        "show progress and what was stored",
    )
    demo.add_argument("--seconds", type=float, default=10.0, help="how long the feed runs")
    demo.add_argument("--rate", type=int, default=20_000, help="records per second to publish")
    demo.add_argument(
        "--database-url", default=None, help="where to store (default: STORE_DATABASE_URL)"
    )
    demo.set_defaults(func=_cmd_demo)

    for name, text in (
        ("health", "print the service's health (Core HealthStatus); exit 1 when unhealthy"),
        ("ready", "print readiness; exit 1 when not ready (for container health checks)"),
    ):
        probe = sub.add_parser(name, help=text)
        probe.add_argument("--timeout", type=float, default=3.0, help="seconds to wait")
        probe.set_defaults(func=_cmd_probe)

    control = sub.add_parser(
        "control",
        help="pause / resume intake or reload settings (needs STORE_ADMIN_TOKEN); "
        "prints the Core ControlResult, exit 1 when refused",
    )
    control.add_argument("action", choices=["pause", "resume", "reload"])
    control.add_argument("--timeout", type=float, default=5.0, help="seconds to wait")
    control.set_defaults(func=_cmd_control)

    add_query_parser(sub).set_defaults(func=_cmd_query)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``store-svc`` console script.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        The process exit code.
    """
    args = build_parser().parse_args(argv)
    try:
        coro = args.func(args)
    except pydantic.ValidationError as exc:
        # Never print the input: it can hold the admin token or a database password.
        lines = [
            f"  {'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors(include_input=False, include_url=False)
        ]
        print("store-svc: invalid settings:\n" + "\n".join(lines), file=sys.stderr)
        return 2
    settle_heap()
    try:
        return int(uvloop.run(coro))
    except StoreError as exc:
        print(f"store-svc: {exc}", file=sys.stderr)
        return 1
    finally:
        for watchdog in _STOP_WATCHDOGS:
            watchdog.disarm()
        _STOP_WATCHDOGS.clear()


if __name__ == "__main__":
    sys.exit(main())
