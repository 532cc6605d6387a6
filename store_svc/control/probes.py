"""HTTP liveness and readiness (``GET /healthz``, ``GET /readyz``) that answer even
when the event loop is stuck.

The loop refreshes a snapshot of the service's health a few times a second
(:meth:`HealthSnapshot.keep_fresh`); the HTTP server's threads answer from that
snapshot and never wait on the loop. When the loop has not refreshed it for longer
than ``STORE_LOOP_STALL_S``, both endpoints answer ``503`` with the last status,
marked ``unhealthy`` and carrying a ``loop`` component that says for how long the
loop has been stuck.

* ``/healthz`` is liveness: ``200`` while the loop runs, whatever the components
  say (a database outage is survived by waiting, not by a restart that would drop
  the queue); ``503`` once the loop is stuck.
* ``/readyz`` is readiness: ``200`` when ready (as on ``<prefix>.store.ready``),
  else ``503``. Both bodies are Core ``HealthStatus`` JSON.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from store_svc import __version__
from store_svc.constants import SERVICE_NAME
from store_svc.core import HealthComponent, HealthStatus

__all__ = ["HealthSnapshot", "loop_component"]

log = logging.getLogger(__name__)

#: The snapshot is refreshed this often at most (a quarter of the stall limit when
#: that is shorter), so a stall is told from a refresh that is merely due.
REFRESH_S = 0.5


def loop_component(lag_ms: float, stalled_s: float | None = None) -> HealthComponent:
    """The event loop as a health component.

    Args:
        lag_ms: how late the loop last woke the snapshot refresher.
        stalled_s: how long the loop has not refreshed the snapshot, when that is
            past the stall limit (the loop is stuck); None while it runs.

    Returns:
        ``loop``: healthy while running, unhealthy while stuck.
    """
    details = {"lag_ms": f"{lag_ms:.1f}"}
    if stalled_s is not None:
        details["stalled_for_s"] = f"{stalled_s:.1f}"
    return HealthComponent(
        name="loop", state="unhealthy" if stalled_s is not None else "healthy", details=details
    )


class HealthSnapshot:
    """The service's latest health, for threads that must not wait on the loop.

    Args:
        stall_s: a snapshot older than this means the loop is stuck.
        build: returns ``(ready, reason, status)`` now (``health.readiness`` of the
            service); called on the loop only.
    """

    def __init__(self, stall_s: float, build: Callable[[], tuple[bool, str, HealthStatus]]) -> None:
        self.stall_s = stall_s
        self._build = build
        #: How late (ms) the loop woke the refresher last time.
        self.lag_ms = 0.0
        # One tuple, replaced whole, so a reading thread never sees half an update.
        self._state: tuple[float, HealthStatus, bool] | None = None
        self._last_error = ""

    async def keep_fresh(self) -> None:
        """Refresh the snapshot until cancelled."""
        interval = min(REFRESH_S, self.stall_s / 4)
        while True:
            self.refresh()
            started = time.monotonic()
            await asyncio.sleep(interval)
            self.lag_ms = max(0.0, (time.monotonic() - started - interval) * 1000)

    def refresh(self) -> None:
        """Take a new snapshot now (on the loop; also at every change of status)."""
        try:
            ready, _reason, status = self._build()
        except Exception as exc:
            # A bug in building the status must not pass for a stuck loop (liveness
            # would restart a working store) nor abort a shutdown: the loop is alive,
            # so the last status is kept with a fresh time, and the bug is logged.
            text = repr(exc)
            if text != self._last_error:
                self._last_error = text
                log.exception("building the health snapshot failed")
            state = self._state
            if state is not None:
                self._state = (time.monotonic(), state[1], state[2])
            return
        self._last_error = ""
        self._state = (time.monotonic(), status, ready)

    def answer(self, path: str) -> tuple[int, bytes]:
        """The HTTP answer to ``GET /healthz`` or ``GET /readyz``; safe in any thread.

        Args:
            path: ``/healthz`` or ``/readyz``.

        Returns:
            ``(status code, HealthStatus JSON)``.
        """
        status, ready = self.current()
        ok = ready if path == "/readyz" else self._fresh()
        return (200 if ok else 503), status.model_dump_json().encode()

    def _fresh(self) -> bool:
        state = self._state
        return state is not None and time.monotonic() - state[0] <= self.stall_s

    def current(self) -> tuple[HealthStatus, bool]:
        """``(status, ready)`` as of now; safe in any thread.

        Before the first snapshot, or once the snapshot is older than ``stall_s``
        (the loop is stuck), the status is unhealthy and not ready.
        """
        state = self._state
        if state is None:
            status = HealthStatus(
                service=SERVICE_NAME,
                state="unhealthy",
                components=[loop_component(0.0, 0.0)],
                version=__version__,
                ts=time.time(),
            )
            return status, False
        at, status, ready = state
        age = time.monotonic() - at
        if age > self.stall_s:
            others = [c for c in status.components if c.name != "loop"]
            status = status.model_copy(
                update={
                    "state": "unhealthy",
                    "components": [*others, loop_component(self.lag_ms, age)],
                    "ts": time.time(),
                }
            )
            return status, False
        return status, ready
