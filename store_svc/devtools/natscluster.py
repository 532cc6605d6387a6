"""Run a private three-node NATS cluster with JetStream on loopback (tests, benchmarks).

Each node is a :class:`~store_svc.devtools.natsserver.NatsServer` with its own client
port, cluster port and JetStream folder, routed to the other two. Ports are picked
once, so a node that is stopped or killed comes back on the same URL. The cluster
counts as up when JetStream has a meta leader and every node is a peer.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any, Self

from store_svc.devtools.natsserver import NatsServer
from store_svc.devtools.processes import StartStop

__all__ = ["NatsCluster"]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class NatsCluster(StartStop):
    """Three nats-server processes forming one JetStream cluster.

    Args:
        root: where each node keeps its JetStream files (``root/n1`` ...).
        size: the number of nodes.
        name: the cluster's name.
    """

    def __init__(self, root: Path, size: int = 3, name: str = "mds") -> None:
        self.root = root
        self.name = name
        ports = _free_ports(3 * size)
        self.client_ports = ports[:size]
        self.cluster_ports = ports[size : 2 * size]
        self.monitor_ports = ports[2 * size :]
        self.nodes: list[NatsServer] = []
        for i in range(size):
            routes = ",".join(
                f"nats://127.0.0.1:{p}" for j, p in enumerate(self.cluster_ports) if j != i
            )
            args = (
                "--server_name", self.node_name(i),
                "--cluster_name", name,
                "--cluster", f"nats://127.0.0.1:{self.cluster_ports[i]}",
                "--routes", routes,
                "--http_port", str(self.monitor_ports[i]),
            )  # fmt: skip
            self.nodes.append(
                NatsServer(
                    store_dir=root / self.node_name(i), port=self.client_ports[i], extra_args=args
                )
            )

    @staticmethod
    def node_name(i: int) -> str:
        """The ``server_name`` of node ``i`` (``n1``, ``n2``, ...)."""
        return f"n{i + 1}"

    def index(self, server_name: str) -> int:
        """The node index of ``server_name``."""
        return int(server_name.removeprefix("n")) - 1

    @property
    def urls(self) -> list[str]:
        """Every node's client URL."""
        return [f"nats://127.0.0.1:{p}" for p in self.client_ports]

    @property
    def url(self) -> str:
        """The seed URLs, comma-separated (as ``STORE_NATS_URL`` takes them)."""
        return ",".join(self.urls)

    def start(self, timeout: float = 30.0) -> Self:
        """Start every node and wait for the JetStream cluster to form (on failure the
        nodes already started are stopped again)."""
        try:
            for i in range(len(self.nodes)):
                self.start_node(i)
            self.wait_formed(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every node (a frozen one too); idempotent."""
        for node in self.nodes:
            node.stop()

    def start_node(self, i: int) -> None:
        """Start (or restart) node ``i`` on its own ports."""
        node = self.nodes[i]
        node.port = self.client_ports[i]
        node.start()

    def stop_node(self, i: int) -> None:
        """Stop node ``i`` cleanly (SIGTERM)."""
        self.nodes[i].stop()

    def kill_node(self, i: int) -> None:
        """Kill node ``i`` at once (SIGKILL), as a crash would."""
        self.nodes[i].kill()

    def freeze_node(self, i: int) -> None:
        """SIGSTOP node ``i``: it holds its sockets and answers nothing."""
        self.nodes[i].freeze()

    def thaw_node(self, i: int) -> None:
        """SIGCONT node ``i`` after :meth:`freeze_node`."""
        self.nodes[i].thaw()

    def running(self) -> list[int]:
        """The indexes of the nodes whose process is alive."""
        return [i for i, n in enumerate(self.nodes) if n.proc is not None and n.proc.poll() is None]

    def wait_formed(self, timeout: float = 30.0) -> None:
        """Wait until JetStream has a meta leader and every running node is a current peer."""
        deadline = time.monotonic() + timeout
        want = {self.node_name(i) for i in self.running()}
        last = ""
        while time.monotonic() < deadline:
            for i in self.running():
                try:
                    info = self.jsz(i)
                except OSError as exc:
                    last = str(exc)
                    continue
                meta = info.get("meta_cluster") or {}
                peers = {meta.get("leader"), self.node_name(i)} | {
                    r["name"] for r in meta.get("replicas") or [] if r.get("current")
                }
                if meta.get("leader") and want <= peers:
                    return
                last = json.dumps(meta)[:300]
            time.sleep(0.2)
        raise TimeoutError(f"the NATS cluster did not form in {timeout}s: {last}")

    def jsz(self, i: int) -> dict[str, Any]:
        """Node ``i``'s JetStream report from its monitoring port (``/jsz``)."""
        url = f"http://127.0.0.1:{self.monitor_ports[i]}/jsz"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]
