"""Plumbing of the ingest benchmark: child processes, the service, monitors, databases.

Used by ``bench_ingest.py`` (the entry point); nothing here decides what is measured.

* child roles (``ingest_roles.py``) started, released together and collected;
* :class:`ServiceProcess`: the real ``store-svc run`` as a subprocess;
* :class:`LoopThread`, :class:`FeedbackCounter` and :func:`wait_stream_drained`: NATS
  watchers running on an event loop in a thread of the orchestrator;
* :class:`RssSampler`: resident memory of the service's process tree (psutil);
* :class:`CpuMeter`: CPU seconds of process trees and of the orchestrator's children;
* row counts of a SQLite file or a PostgreSQL database, fresh PostgreSQL databases;
* what the machine is (for the JSON report).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Sequence
from contextlib import closing, suppress
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

import asyncpg
import msgspec
import nats
import psutil
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError as JsNotFoundError

from benchmarks.ingest_roles import (
    _GO,
    _READY,
    CORE,
    JETSTREAM,
    PublisherSpec,
    PublishResult,
)
from store_svc.constants import EXIT_HUNG
from store_svc.devtools.natsserver import find_nats_server
from store_svc.devtools.pgserver import PostgresServer, find_pg_bin
from store_svc.settings import Settings

_T = TypeVar("_T")
ROLES_SCRIPT = Path(__file__).resolve().with_name("ingest_roles.py")

_STOPPED_LINE = re.compile(
    r"store-svc stopped: (\d+) records committed, (\d+) rejected, (\d+) messages dropped"
    r"(?: \((\d+) received\))?"
)
_JS_STOPPED_LINE = re.compile(
    r"JetStream: (\d+) messages acked, (\d+) redelivered to this instance, "
    r"(\d+) terminated, (\d+) handed back"
)


# --------------------------------------------------------------- child management


def spawn(role: str, spec: msgspec.Struct) -> subprocess.Popen[str]:
    """Start ``ingest_roles.py`` in a role; its stdout carries READY and the result."""
    return subprocess.Popen(
        [sys.executable, str(ROLES_SCRIPT), role, msgspec.json.encode(spec).decode()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _role(proc: subprocess.Popen[str]) -> str:
    """The internal role a child runs (for error messages)."""
    args = proc.args
    return str(args[2]) if isinstance(args, list) and len(args) > 2 else str(args)


def await_ready(proc: subprocess.Popen[str]) -> None:
    """Wait for a child's READY line."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != _READY:
        proc.kill()
        raise RuntimeError(f"child {_role(proc)} did not get ready (said {line!r})")


def send_line(proc: subprocess.Popen[str], line: str) -> None:
    """Write one line to a child's stdin."""
    stdin: IO[str] | None = proc.stdin
    assert stdin is not None
    stdin.write(line + "\n")
    stdin.flush()


def collect(proc: subprocess.Popen[str], kind: type[_T], timeout: float) -> _T:
    """Read a child's JSON result line and reap it."""
    assert proc.stdout is not None
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"child {_role(proc)} timed out after {timeout:.0f}s") from None
    if proc.returncode != 0 or not out.strip():
        raise RuntimeError(f"child {_role(proc)} failed with exit code {proc.returncode}")
    return msgspec.json.decode(out.strip().splitlines()[-1], type=kind)


def reap(procs: Sequence[subprocess.Popen[str]]) -> None:
    """Kill children that still run (after a failure)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


@dataclass(frozen=True)
class FlowControl:
    """How throughput publishers are flow-controlled.

    Attributes:
        chunk: core mode: every ``chunk``-th message is a request.
        window: core mode: unanswered requests allowed; JetStream mode: outstanding
            PubAcks allowed.
    """

    chunk: int
    window: int


def run_publishers(
    url: str,
    subject: str,
    payload_file: Path,
    n_msgs: int,
    mode: str,
    flow: FlowControl,
    publishers: int,
    timeout: float = 300.0,
) -> list[PublishResult]:
    """Start ``publishers`` throughput publishers on contiguous slices, release them
    together and collect their results (each waits at most ``timeout`` seconds for
    its last reply).
    """
    bounds = [n_msgs * k // publishers for k in range(publishers + 1)]
    procs = [
        spawn(
            "--publisher",
            PublisherSpec(
                url,
                subject,
                str(payload_file),
                bounds[k],
                bounds[k + 1],
                flow.chunk,
                flow.window,
                timeout=timeout,
                mode=mode,
            ),
        )
        for k in range(publishers)
    ]
    try:
        for p in procs:
            await_ready(p)
        for p in procs:
            send_line(p, _GO)
        return [collect(p, PublishResult, timeout=600.0) for p in procs]
    finally:
        reap(procs)


@dataclass
class Throughput:
    """Throughput of one run, from the publishers' point of view."""

    published_msgs: int
    published_records: int
    start: float
    duration_s: float
    publish_s: float
    replies: int
    requests: int
    error_replies: int
    timed_out: bool

    def as_dict(self) -> dict[str, Any]:
        """Plain values for the JSON report."""
        return {
            "published_msgs": self.published_msgs,
            "published_records": self.published_records,
            "duration_s": round(self.duration_s, 4),
            "publish_msgs_per_s": self.published_msgs / self.publish_s
            if self.publish_s > 0
            else None,
            "flow_control_requests": self.requests,
            "flow_control_replies": self.replies,
            "error_replies": self.error_replies,
            "timed_out": self.timed_out,
        }


def summarize(results: list[PublishResult], per_msg: int) -> Throughput:
    """Combine publisher results: first publish of any to last reply of all."""
    start = min(r.first_publish for r in results)
    end = max(r.last_reply if r.replies else r.last_publish for r in results)
    msgs = sum(r.messages for r in results)
    return Throughput(
        published_msgs=msgs,
        published_records=msgs * per_msg,
        start=start,
        duration_s=end - start,
        publish_s=max(r.last_publish for r in results) - start,
        replies=sum(r.replies for r in results),
        requests=sum(r.requests for r in results),
        error_replies=sum(r.error_replies for r in results),
        timed_out=any(r.timed_out for r in results),
    )


# ----------------------------------------------------------------- the service


def service_settings(
    nats_url: str,
    database_url: str,
    mode: str = CORE,
    timescaledb: Literal["auto", "require", "off"] = "off",
    replicas: int = 1,
) -> Settings:
    """The settings a benchmarked service runs with (defaults but these four). A
    PostgreSQL sink runs on plain tables unless ``timescaledb`` asks for hypertables
    (the run's server preloads TimescaleDB where it is installed)."""
    if mode not in (CORE, JETSTREAM):
        raise ValueError(f"unknown ingest mode {mode!r}")
    ingest_mode: Literal["core", "jetstream"] = "jetstream" if mode == JETSTREAM else "core"
    return Settings.model_construct(
        nats_url=nats_url,
        database_url=database_url,
        ingest_mode=ingest_mode,
        timescaledb=timescaledb,
        js_replicas=replicas,
    )


class ServiceProcess:
    """``store-svc run`` as a subprocess, with its log in a file.

    Args:
        settings: the settings it runs with (only the two URLs, the ingest mode when
            it is not ``core`` and, for PostgreSQL, ``timescaledb`` are passed; every
            other ``STORE_*`` variable is removed from its environment, so it runs
            with the defaults).
        log_path: where its stderr goes.
        extra_env: more environment variables (e.g. ``STORE_METRICS_PORT``).
    """

    def __init__(
        self, settings: Settings, log_path: Path, extra_env: dict[str, str] | None = None
    ) -> None:
        self.settings = settings
        self.log_path = log_path
        self.extra_env = dict(extra_env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.exited_early: int | None = None

    @staticmethod
    def executable() -> str:
        """The ``store-svc`` console script next to the interpreter (or on ``$PATH``)."""
        beside = Path(sys.executable).parent / "store-svc"
        found = str(beside) if beside.exists() else shutil.which("store-svc")
        if found is None:
            raise FileNotFoundError("the store-svc console script is not installed")
        return found

    def start(self, timeout: float = 30.0) -> None:
        """Start the service and wait for its "running" log line.

        Raises:
            RuntimeError: it exited or did not log readiness in time.
        """
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("STORE_") and k != "ADMIN_TOKEN"
        }
        env["STORE_NATS_URL"] = self.settings.nats_url
        env["STORE_DATABASE_URL"] = self.settings.database_url
        if self.settings.ingest_mode != CORE:
            env["STORE_INGEST_MODE"] = self.settings.ingest_mode
        if self.settings.database_url.startswith("postgres"):
            env["STORE_TIMESCALEDB"] = self.settings.timescaledb
        if self.settings.js_replicas > 1:
            env["STORE_JS_REPLICAS"] = str(self.settings.js_replicas)
        env.update(self.extra_env)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [self.executable(), "run"], env=env, stdout=subprocess.DEVNULL, stderr=self._log
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"store-svc exited at start-up:\n{self.log_text()[-2000:]}")
            if "store-svc running" in self.log_text():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"store-svc not running after {timeout}s:\n{self.log_text()[-2000:]}")

    @property
    def pid(self) -> int:
        """The service's process id."""
        assert self.proc is not None
        return self.proc.pid

    def check_alive(self) -> None:
        """Note (once) that the service exited on its own.

        Raises:
            RuntimeError: it is no longer running.
        """
        if self.proc is not None and self.proc.poll() is not None:
            self.exited_early = self.proc.returncode
            raise RuntimeError(
                f"store-svc exited with code {self.proc.returncode} during the run:\n"
                f"{self.log_text()[-2000:]}"
            )

    def log_text(self) -> str:
        """Everything the service has logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 90.0) -> dict[str, Any]:
        """SIGTERM, wait for the clean shutdown, and read its final counters.

        Returns:
            ``exit_code``, ``crashed`` (it had exited before it was asked to stop, or
            stopped with a non-zero code), the shutdown line's counters (if logged)
            and any warning or error lines.
        """
        proc, self.proc = self.proc, None
        code: int | None = None
        exited_before = self.exited_early is not None
        killed = False
        started = time.monotonic()
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            else:
                exited_before = True
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                killed = True
                proc.kill()
                code = proc.wait()
        stop_s = time.monotonic() - started
        if self._log is not None:
            self._log.close()
            self._log = None
        text = self.log_text()
        out: dict[str, Any] = {
            "exit_code": code,
            "crashed": exited_before or code != 0,
            "exited_before_stop": exited_before,
            "killed_after_s": round(timeout, 1) if killed else None,
            "stop_s": None if exited_before else round(stop_s, 2),
        }
        if out["crashed"]:
            lines = text.splitlines()
            # A hung stop's report (the tasks, then the threads) first, else the end.
            hung = next((i for i, ln in enumerate(lines) if "has not stopped" in ln), None)
            out["log_tail"] = lines[hung : hung + 60] if hung is not None else lines[-40:]
        if m := _STOPPED_LINE.search(text):
            keys = ("committed", "rejected", "dropped_messages", "received_messages")
            out.update({k: int(v) for k, v in zip(keys, m.groups(), strict=True) if v is not None})
        if m := _JS_STOPPED_LINE.search(text):
            keys = ("js_acked", "js_redelivered", "js_terminated", "js_handed_back")
            out.update({k: int(v) for k, v in zip(keys, m.groups(), strict=True)})
        problems = [ln for ln in text.splitlines() if " WARNING " in ln or " ERROR " in ln]
        out["warnings_and_errors"] = problems[:10]
        return out


def shutdown_failure(what: str, shutdown: dict[str, Any]) -> str:
    """The failure line of a service that did not stop cleanly: how it ended, and the
    end of its log (a CI run shows nothing else of it)."""
    hung = shutdown.get("exit_code") == EXIT_HUNG
    if hung:
        how = "its stop hung, and its watchdog ended it; the report follows"
    elif shutdown.get("exited_before_stop"):
        how = "it had exited before it was asked to stop"
    elif shutdown.get("killed_after_s") is not None:
        how = f"killed: still running {shutdown['killed_after_s']:.0f} s after SIGTERM"
    else:
        how = f"it stopped {shutdown.get('stop_s', 0.0):.1f} s after SIGTERM"
    tail = "\n    ".join(shutdown.get("log_tail", []))
    said = "its log" if hung else "its log ends"
    return f"{what} crashed (exit code {shutdown['exit_code']}; {how}); {said}:\n    {tail}"


async def probe_core(url: str, subject: str, timeout: float) -> None:
    """Wait until the service answers on ``subject`` (an empty write is refused at once
    with a 400 error reply, so the probe stores nothing)."""
    nc: NATS = await nats.connect(url.split(","), name="bench-probe")
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                await nc.request(subject, b"", timeout=1.0)
                return
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
    finally:
        await nc.close()


async def probe_jetstream(url: str, settings: Settings, timeout: float) -> None:
    """Wait until the service's consumer has a pull request waiting (a probe write
    would be stored by the stream, so JetStream mode is probed this way)."""
    nc: NATS = await nats.connect(url.split(","), name="bench-probe-js")
    try:
        jsm = nc.jsm()
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = await jsm.consumer_info(settings.js_stream, settings.js_durable)
                if info.num_waiting:
                    return
            except JsNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no pull request on {settings.js_stream}/{settings.js_durable}")
            await asyncio.sleep(0.05)
    finally:
        await nc.close()


def delete_stream(url: str, name: str) -> bool:
    """Delete a JetStream stream (and its consumers) if it exists.

    Returns:
        Whether there was one.
    """

    async def go() -> bool:
        nc: NATS = await nats.connect(url.split(","), name="bench-admin")
        try:
            return bool(await nc.jsm().delete_stream(name))
        except JsNotFoundError:
            return False
        finally:
            await nc.close()

    return asyncio.run(go())


def jetstream_state(url: str, settings: Settings) -> dict[str, Any]:
    """What the service's stream and consumer hold (after the service stopped)."""

    async def go() -> dict[str, Any]:
        nc: NATS = await nats.connect(url.split(","), name="bench-admin")
        try:
            jsm = nc.jsm()
            stream = await jsm.stream_info(settings.js_stream)
            consumer = await jsm.consumer_info(settings.js_stream, settings.js_durable)
            return {
                "stream_messages_left": stream.state.messages,
                "stream_last_seq": stream.state.last_seq,
                "consumer_ack_pending": consumer.num_ack_pending,
                "consumer_redelivered": consumer.num_redelivered,
                "consumer_pending": consumer.num_pending,
            }
        except JsNotFoundError as exc:
            return {"error": str(exc)}
        finally:
            await nc.close()

    return asyncio.run(go())


def start_py_spy(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    """Sample a process and its children (the SQLite writer) with py-spy (if
    installed) until the returned process is sent SIGINT."""
    exe = Path(sys.executable).parent / "py-spy"
    if not exe.exists():
        print("py-spy is not installed in the venv; no profile", file=sys.stderr)
        return None
    return subprocess.Popen(
        [
            str(exe),
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            "--format",
            "speedscope",
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_py_spy(proc: subprocess.Popen[bytes] | None) -> None:
    """End a py-spy recording (it writes its file on SIGINT)."""
    if proc is None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------ NATS watchers


class LoopThread:
    """An asyncio event loop in a daemon thread, for watchers that run beside the
    orchestrator's blocking waits (on child processes)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="bench-loop")
        self._thread.daemon = True
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Schedule ``coro`` on the loop."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = 60.0) -> _T:
        """Run ``coro`` on the loop and wait for its result."""
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        """Stop the loop and the thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10.0)
        if not self._thread.is_alive():
            self.loop.close()


class FeedbackCounter:
    """Counts the service's feedback events (``<prefix>.telemetry.feedback``) per level.

    Counts every event: level changes and the heartbeat that re-publishes the
    current level (every ``STORE_FEEDBACK_HEARTBEAT_S``, 5 s by default).

    Args:
        lt: the loop the subscriber runs on.
        url: the nats-server URL.
        subject: the feedback subject.
    """

    def __init__(self, lt: LoopThread, url: str, subject: str) -> None:
        self._lt = lt
        self._url = url
        self._subject = subject
        self._nc: NATS | None = None
        self.levels: Counter[str] = Counter()
        self.max_queue_size = 0
        self.capacity: int | None = None
        self.last_level: str | None = None
        self.first_hard_at: float | None = None

    def start(self) -> None:
        """Subscribe (returns once the server knows the subscription)."""
        self._lt.run(self._start())

    async def _start(self) -> None:
        self._nc = await nats.connect(self._url.split(","), name="bench-feedback")
        await self._nc.subscribe(self._subject, cb=self._on_event)
        await self._nc.flush()

    async def _on_event(self, msg: Msg) -> None:
        try:
            event = json.loads(msg.data)
            level = str(event["level"])
        except (ValueError, KeyError, TypeError):
            self.levels["unparsable"] += 1
            return
        self.levels[level] += 1
        self.last_level = level
        if level == "hard" and self.first_hard_at is None:
            self.first_hard_at = time.monotonic()
        size = event.get("queue_size")
        if isinstance(size, int):
            self.max_queue_size = max(self.max_queue_size, size)
        if isinstance(event.get("capacity"), int):
            self.capacity = event["capacity"]

    def stop(self) -> dict[str, Any]:
        """Unsubscribe (after a flush, so events already sent are counted).

        Returns:
            Events per level (``ok``, ``soft``, ``hard``), their total and the largest
            queue size they reported.
        """
        if self._nc is not None:
            nc, self._nc = self._nc, None
            self._lt.run(_flush_close(nc))
        return {
            "ok": self.levels.get("ok", 0),
            "soft": self.levels.get("soft", 0),
            "hard": self.levels.get("hard", 0),
            "events": sum(self.levels.values()),
            "max_queue_size": self.max_queue_size,
        }


async def _flush_close(nc: NATS) -> None:
    try:
        await nc.flush(timeout=5)
    finally:
        await nc.close()


async def wait_stream_drained(
    url: str, stream: str, target_seq: int, stall_timeout: float, interval: float = 0.01
) -> tuple[float | None, dict[str, Any]]:
    """Poll a workqueue stream until it has taken ``target_seq`` messages and holds none.

    In workqueue retention a message leaves the stream when the service acks it, and
    the service acks after the commit, so an empty stream whose last sequence is the
    number published means every record is committed (the ack reached the server).

    Args:
        url: the nats-server URL.
        stream: the stream name.
        target_seq: the stream sequence of the last message of the run.
        stall_timeout: give up after this many seconds without a change.
        interval: seconds between polls.

    Returns:
        ``time.monotonic`` of the first poll that saw the end (None when it stalled),
        and the last state seen.
    """
    nc: NATS = await nats.connect(url.split(","), name="bench-stream-watch")
    state: dict[str, Any] = {}
    try:
        jsm = nc.jsm()
        last: tuple[int, int] | None = None
        last_change = time.monotonic()
        while True:
            now = time.monotonic()
            try:
                info = await jsm.stream_info(stream)
                seen = (int(info.state.last_seq), int(info.state.messages))
            except (JsNotFoundError, nats.errors.TimeoutError):
                seen = (0, 0)
            state = {"last_seq": seen[0], "messages": seen[1]}
            if seen != last:
                last, last_change = seen, now
            if seen[0] >= target_seq and seen[1] == 0:
                return now, state
            if now - last_change > stall_timeout:
                return None, state
            await asyncio.sleep(interval)
    finally:
        await nc.close()


# ---------------------------------------------------------------------- memory


class RssSampler:
    """Samples the resident memory of process trees (each root plus its descendants).

    A thread adds up ``memory_info().rss`` of every process in the trees every
    ``interval`` seconds (shared pages, e.g. of the interpreter, count once per
    process: an upper bound of what the trees hold).

    Args:
        roots: process ids of the roots (service instances).
        interval: seconds between samples.
    """

    def __init__(self, roots: Sequence[int], interval: float = 0.1) -> None:
        self.roots = list(roots)
        self.interval = interval
        #: ``(time.monotonic, total bytes, bytes per root)``.
        self.samples: list[tuple[float, int, list[int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        """Start sampling (one sample is taken at once)."""
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling (after one last sample)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> int:
        """Take one sample now.

        Returns:
            The total RSS of the trees in bytes.
        """
        per_root = [_tree_rss(pid) for pid in self.roots]
        total = sum(per_root)
        self.samples.append((time.monotonic(), total, per_root))
        return total

    def peak_mb(self, since: float | None = None, until: float | None = None) -> float | None:
        """The largest total in MB (10^6 bytes) between two ``time.monotonic`` readings."""
        values = [
            total
            for t, total, _ in self.samples
            if (since is None or t >= since) and (until is None or t <= until)
        ]
        return max(values) / 1e6 if values else None

    def peak_per_root_mb(self) -> list[float]:
        """The largest RSS of each tree in MB."""
        if not self.samples:
            return []
        return [max(s[2][i] for s in self.samples) / 1e6 for i in range(len(self.roots))]


def _tree(pid: int) -> list[psutil.Process]:
    """A process and its live descendants (empty when it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _tree_rss(pid: int) -> int:
    total = 0
    for p in _tree(pid):
        with suppress(psutil.Error):
            total += p.memory_info().rss
    return total


# ------------------------------------------------------------------------- CPU


def tree_cpu_seconds(pid: int | list[int]) -> float:
    """CPU seconds (user + system) a process tree has used so far: the root and its
    live descendants, each with the children it has reaped (so short-lived workers,
    e.g. PostgreSQL's parallel query workers, are counted once they are gone); a
    list of roots is summed."""
    if isinstance(pid, list):
        return sum(tree_cpu_seconds(p) for p in pid)
    total = 0.0
    for p in _tree(pid):
        with suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


class CpuMeter:
    """CPU seconds used between two readings, per named process tree, and by the
    orchestrator's reaped children (the benchmark roles: publishers, query client).

    Args:
        roots: a name per root process id (e.g. the service, nats-server, the
            PostgreSQL postmaster).
    """

    def __init__(self, roots: dict[str, int | list[int]]) -> None:
        self.roots = dict(roots)

    def read(self) -> dict[str, float]:
        """The CPU seconds used so far, per name and ``load_generators``."""
        out = {name: tree_cpu_seconds(pid) for name, pid in self.roots.items()}
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        out["load_generators"] = kids.ru_utime + kids.ru_stime
        return out

    @staticmethod
    def used(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, Any]:
        """CPU seconds per name between two readings, their total, and the cores
        that total kept busy over ``seconds``."""
        used = {k: round(after[k] - before.get(k, 0.0), 3) for k in after}
        total = sum(used.values())
        return {
            "cpu_s": used,
            "total_cpu_s": round(total, 3),
            "cores_busy": round(total / seconds, 3) if seconds > 0 else None,
        }


def postmaster_pid(data_dir: Path) -> int | None:
    """The PostgreSQL server's process id (first line of ``postmaster.pid``)."""
    try:
        return int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


# -------------------------------------------------------------------- databases


def is_postgres_url(database_url: str) -> bool:
    """True for a ``postgresql://`` (or ``postgres://``) database URL."""
    return database_url.startswith(("postgresql://", "postgres://"))


def count_rows(db_path: Path, table: str) -> int:
    """Rows in a table of a SQLite file."""
    with closing(sqlite3.connect(db_path, timeout=30.0)) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def count_stored(database_url: str, table: str) -> int:
    """Rows in ``table`` of the database a service URL names.

    Args:
        database_url: ``sqlite:///<path>`` or ``postgresql://...``.
        table: the table (the record kind).

    Returns:
        The row count.
    """
    if not is_postgres_url(database_url):
        return count_rows(Path(database_url.removeprefix("sqlite:///")), table)

    async def go() -> int:
        conn = await asyncpg.connect(database_url)
        try:
            return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
        finally:
            await conn.close()

    return asyncio.run(go())


def wait_rows(database_url: str, table: str, target: int, stall_timeout: float = 10.0) -> int:
    """Wait until ``table`` holds ``target`` rows, or its count stopped growing.

    Args:
        database_url: the service's database.
        table: the table (the record kind).
        target: the row count expected.
        stall_timeout: give up after this many seconds without a new row.

    Returns:
        The last count.
    """
    last, last_change = -1, time.monotonic()
    while True:
        n = count_stored(database_url, table)
        now = time.monotonic()
        if n >= target:
            return n
        if n != last:
            last, last_change = n, now
        elif now - last_change > stall_timeout:
            return n
        time.sleep(0.05)


def create_pg_database(pg: PostgresServer, label: str) -> str:
    """Create a fresh, empty database on the run's PostgreSQL server.

    Args:
        pg: the running server.
        label: part of the name (anything; reduced to ``[a-z0-9_]``); a random suffix
            keeps every name unique.

    Returns:
        The new database's URL.
    """
    name = f"bench_{re.sub(r'[^a-z0-9]+', '_', label.lower())}_{secrets.token_hex(4)}"[:63]

    async def go() -> None:
        conn = await asyncpg.connect(pg.dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(go())
    return pg.url(name)


def drop_pg_database(pg: PostgresServer, database_url: str) -> None:
    """Drop a database made by :func:`create_pg_database` (frees its disk early)."""
    name = database_url.rsplit("/", 1)[1]

    async def go() -> None:
        conn = await asyncpg.connect(pg.dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(go())


# ---------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """Where the numbers come from."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    server = subprocess.run(
        [find_nats_server(), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
        "nats_server": server,
        "packages": {
            name: metadata.version(name)
            for name in (
                "market-data-store",
                "nats-py",
                "msgspec",
                "uvloop",
                "asyncpg",
                "market-data-core",
            )
        },
        "loadavg_at_start": os.getloadavg(),
        "git": git_state(),
    }


def pg_version() -> str:
    """The version of the PostgreSQL server binaries the run uses."""
    return subprocess.run(
        [str(find_pg_bin() / "pg_ctl"), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()


def git_state() -> dict[str, Any]:
    """The commit of the code under test and whether ``store_svc`` has local changes."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=False
        ).stdout.strip()

    return {
        "head": git("rev-parse", "HEAD"),
        "store_svc_changed": bool(git("status", "--porcelain", "store_svc")),
    }
