"""Run a throwaway PostgreSQL server (the tests and the benchmarks use it).

Uses the machine's ``initdb`` / ``pg_ctl`` (from ``/usr/lib/postgresql/<version>/bin``
or ``$PATH``). The server refuses to run as root, so as root it runs as the ``postgres`` user. It
listens on a random free loopback port, trusts local connections, and is removed
with its data when stopped. ``preload`` puts libraries in
``shared_preload_libraries`` (TimescaleDB needs it); :func:`has_extension` says
whether the machine's PostgreSQL has an extension installed.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Self

from store_svc.devtools.processes import StartStop

__all__ = ["PostgresServer", "find_pg_bin", "has_extension"]


def find_pg_bin() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl``.

    Returns:
        The newest ``/usr/lib/postgresql/*/bin``, else the folder of ``pg_ctl`` on PATH.

    Raises:
        FileNotFoundError: PostgreSQL server binaries are not installed.
    """
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: p.split("/")[4])
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).parent
    raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) are not installed")


def has_extension(name: str) -> bool:
    """Whether the machine's PostgreSQL (the one :func:`find_pg_bin` finds) has the
    extension ``name`` installed (its control file in the share folder)."""
    try:
        pg_config = find_pg_bin() / "pg_config"
        if not pg_config.exists():
            found = shutil.which("pg_config")
            if found is None:
                return False
            pg_config = Path(found)
        share = subprocess.run(
            [str(pg_config), "--sharedir"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (FileNotFoundError, subprocess.CalledProcessError):
        return False
    return (Path(share) / "extension" / f"{name}.control").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer(StartStop):
    """A private PostgreSQL server in a temporary folder.

    Args:
        port: a fixed port (to restart on the same address); 0 picks one.
        preload: libraries for ``shared_preload_libraries`` (e.g. ``("timescaledb",)``).
    """

    def __init__(self, port: int = 0, preload: tuple[str, ...] = ()) -> None:
        self.preload = preload
        self.bin = find_pg_bin()
        self.port = port or _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="store-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._user = "postgres" if os.geteuid() == 0 else None
        self._initialised = False

    def _run(self, *args: str | Path) -> None:
        cmd = [str(a) for a in args]
        if self._user is not None:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    @property
    def dsn(self) -> str:
        """URL of the ``postgres`` database."""
        return self.url("postgres")

    def url(self, database: str) -> str:
        """URL of ``database`` on this server.

        Args:
            database: the database name.

        Returns:
            A ``postgresql://`` URL.
        """
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> Self:
        """Initialise (first time) and start the server; wait until it accepts clients.

        Returns:
            self.
        """
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        if not self._initialised:
            self._run(
                self.bin / "initdb",
                "-D",
                self.data,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            )
            self._initialised = True
        self._run(
            self.bin / "pg_ctl",
            "-D",
            self.data,
            "-l",
            self.log,
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
            + self._preload_options(),
            "start",
        )
        return self

    def _preload_options(self) -> str:
        if not self.preload:
            return ""
        # No telemetry calls from a test server (there is no network to call).
        extra = " -c timescaledb.telemetry_level=off" if "timescaledb" in self.preload else ""
        return f" -c shared_preload_libraries={','.join(self.preload)}{extra}"

    def stop(self, mode: str = "fast") -> None:
        """Stop the server, keeping its data (for a restart).

        Args:
            mode: ``fast`` (clean) or ``immediate`` (like a crash).
        """
        if (self.data / "postmaster.pid").exists():
            self._run(self.bin / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    def close(self) -> None:
        """Stop the server and delete its folder (the end of a ``with`` block)."""
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
