"""The parent's side of a SQLite worker process (``sqlite_worker.py``).

One :class:`WorkerProcess` per process: requests are framed MessagePack written to
its stdin, replies come back in order on its stdout and are handed to the request
they answer. A failed request raises :class:`~store_svc.errors.SinkError` (or
:class:`~store_svc.errors.SchemaError`) chosen by the reply's error code, never by
its text.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections import deque
from pathlib import Path
from typing import Any

import msgspec

from store_svc.errors import SchemaError, SinkError
from store_svc.store import sqlite_worker
from store_svc.tasks import cancel_and_wait

__all__ = ["WorkerProcess"]

log = logging.getLogger(__name__)

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode
#: Codes whose request may succeed when sent again.
_RETRYABLE = frozenset({sqlite_worker.RETRY, sqlite_worker.AHEAD_FAILED})
#: The child imports the very package this process runs (the folder above
#: ``store_svc``), first on its path, whatever the working directory holds.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_CHILD_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(
        p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p
    ),
}


def reply_error(text: str, code: str) -> SinkError:
    """The exception for a failed worker reply.

    Args:
        text: the worker's description (for logs and health).
        code: one of ``sqlite_worker.ERROR_CODES``.

    Returns:
        A :class:`SchemaError` for ``schema_too_new``, else a :class:`SinkError`,
        retryable for ``retry``, ``ahead_failed`` and a code this version does not
        know.
    """
    if code == sqlite_worker.SCHEMA_TOO_NEW:
        return SchemaError(text)
    if code not in sqlite_worker.ERROR_CODES:
        # Not a code this version knows: retry rather than drop the batch as refused.
        log.error("the SQLite worker answered with an unknown error code %r: %s", code, text)
        return SinkError(text)
    return SinkError(text, retryable=code in _RETRYABLE)


class WorkerProcess:
    """One ``sqlite_worker.py`` process: framed MessagePack requests, replies in order.

    Args:
        role: ``writer`` or ``reader`` (for messages).
        args: extra command-line arguments (``--read`` for a reader).
    """

    def __init__(self, role: str, args: tuple[str, ...] = ()) -> None:
        self.role = role
        self._args = args
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._replies: deque[asyncio.Future[Any]] = deque()

    @property
    def running(self) -> bool:
        """Whether the process is up (it is cleared when the process exits)."""
        return self.proc is not None

    async def start(self) -> None:
        """Start the process (not yet opened)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-P",  # not the working directory's store_svc, if it holds one
            "-m",
            sqlite_worker.__name__,
            *self._args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=_CHILD_ENV,
        )
        self.proc = proc
        self._reader = asyncio.create_task(self._read_replies(proc), name=f"sqlite-{self.role}")

    async def _read_replies(self, proc: asyncio.subprocess.Process) -> None:
        """Hand each reply to the request it answers (replies come in request order)."""
        assert proc.stdout is not None
        try:
            while True:
                head = await proc.stdout.readexactly(4)
                reply = _decode(await proc.stdout.readexactly(int.from_bytes(head)))
                fut = self._replies.popleft()
                if not fut.done():
                    fut.set_result(reply)
        except (asyncio.IncompleteReadError, ConnectionResetError, IndexError) as exc:
            self._fail_replies(SinkError(f"the SQLite {self.role} process exited ({exc!r})"))
            if self.proc is proc:
                self.proc = None
                self._reader = None
                if proc.returncode is None:
                    proc.kill()

    def _fail_replies(self, exc: SinkError) -> None:
        replies, self._replies = self._replies, deque()
        for fut in replies:
            if not fut.done():
                fut.set_exception(exc)

    def send(self, op: str, arg: Any) -> asyncio.Future[Any]:
        """Send one request; the returned future gets its reply."""
        proc = self.proc
        if proc is None or proc.stdin is None or proc.stdin.is_closing():
            raise SinkError(f"the SQLite {self.role} is not running")
        body = _encode([op, arg])
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._replies.append(fut)
        proc.stdin.write(len(body).to_bytes(4, "big") + body)
        return fut

    async def result(self, fut: asyncio.Future[Any]) -> Any:
        """Wait for a reply; a failed request raises :class:`SinkError`."""
        proc = self.proc
        if proc is not None and proc.stdin is not None:
            try:
                await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError) as exc:
                await self.discard()
                raise SinkError(f"the SQLite {self.role} process exited ({exc!r})") from None
        ok, result, code = await fut
        if not ok:
            raise reply_error(str(result), str(code))
        return result

    async def call(self, op: str, arg: Any) -> Any:
        """Send one request and wait for its reply."""
        return await self.result(self.send(op, arg))

    async def discard(self) -> None:
        """Kill the process; requests still waiting fail with :class:`SinkError`."""
        proc, self.proc = self.proc, None
        reader, self._reader = self._reader, None
        self._fail_replies(SinkError(f"the SQLite {self.role} was stopped"))
        await cancel_and_wait(reader)
        if proc is None:
            return
        if proc.returncode is None:
            proc.kill()
        await proc.wait()

    async def close(self, timeout: float | None = None) -> None:
        """Ask the process to close its database and end; idempotent.

        Args:
            timeout: how long to wait for it (a reader may still be running a
                query); then it is killed. ``None`` waits (the writer checkpoints).
        """
        if self.proc is None:
            return
        try:
            async with asyncio.timeout(timeout):
                await self.call("close", None)
        except SinkError as exc:
            log.warning("closing the SQLite %s: %s", self.role, exc)
        except TimeoutError:
            log.warning("the SQLite %s did not close within %gs; killed", self.role, timeout)
        await self.discard()
