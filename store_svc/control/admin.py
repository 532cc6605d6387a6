"""Admin control: pause, resume and reload over NATS, behind the admin token.

Subjects ``<prefix>.store.control.<action>``; the request carries the header
``Authorization: Bearer <token>`` (scheme and token compared exactly; the token
in constant time). Every instance listens (no queue group), so one request steers
the whole fleet; the requester gets the first answer and every instance audits its
own. Replies are Core ``ControlResult`` JSON; refusals also carry
``Nats-Service-Error(-Code)`` headers (401 bad or missing token, 403 control
disabled because no token is configured, 404 unknown action, 400 invalid reload,
503 while the service is starting or stopping, with ``Store-Retry-After-Ms``).
Every attempt on a known action, allowed or refused, is published as a Core
``AuditEnvelope`` on ``<prefix>.telemetry.audit``. The token never appears in a
log line, a reply or an audit event.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from store_svc.bus.headers import header_value
from store_svc.constants import (
    OVERLOAD_RETRY_AFTER_MS,
    RETRY_AFTER_HEADER,
    SERVICE_ERROR_CODE_HEADER,
    SERVICE_ERROR_HEADER,
)
from store_svc.core import AuditEnvelope, ControlAction, ControlResult
from store_svc.settings import Settings

__all__ = ["AdminControl", "NotRunning"]

log = logging.getLogger(__name__)

AUTH_HEADER = "Authorization"
ACTOR_HEADER = "Md-Actor"
#: Longer Authorization values are refused before any comparison.
MAX_AUTH_CHARS = 4096


class NotRunning(ValueError):
    """A control action arrived while the service is not running (starting,
    stopping), or could not be carried out for now (a resume while JetStream does not
    answer): not the caller's fault, so it is answered 503 with a retry hint.

    Attributes:
        status: what the service is doing instead (``starting``, ``draining`` ...).
    """

    def __init__(self, status: str, detail: str | None = None) -> None:
        super().__init__(detail or f"the service is {status}; retry shortly")
        self.status = status


class AdminControl:
    """Handles the control subjects of one instance.

    Args:
        settings: the admin token and the subjects.
        act: runs an allowed action and returns its detail text (raises
            :class:`NotRunning`, or ValueError for a reload that cannot be applied).
    """

    def __init__(self, settings: Settings, act: Callable[[ControlAction], Awaitable[str]]) -> None:
        self._act = act
        token = settings.admin_token
        self._token = token.get_secret_value().encode() if token is not None else None
        self._sub: Subscription | None = None
        self._nc: NATS | None = None
        self._prefix = settings.subject("store", "control") + "."
        self._audit_subject = settings.subject("telemetry", "audit")

    async def start(self, nc: NATS) -> None:
        """Subscribe to ``<prefix>.store.control.*``.

        Args:
            nc: a connected client.
        """
        self._nc = nc
        self._sub = await nc.subscribe(self._prefix + "*", cb=self._on_request)
        await nc.flush()

    async def stop(self) -> None:
        """Stop listening; idempotent."""
        sub, self._sub = self._sub, None
        if sub is not None:
            await sub.unsubscribe()

    def _check(self, msg: Msg) -> tuple[int, str] | None:
        if self._token is None:
            return 403, "control is disabled: no admin token is configured (STORE_ADMIN_TOKEN)"
        value = (msg.headers or {}).get(AUTH_HEADER)
        if value is None:
            return 401, "missing Authorization header (Authorization: Bearer <token>)"
        if len(value) > MAX_AUTH_CHARS or not value.startswith("Bearer "):
            return 401, "Authorization must be 'Bearer <token>'"
        given = value[len("Bearer ") :].encode()
        if not hmac.compare_digest(given, self._token):
            return 401, "invalid admin token"
        return None

    async def _on_request(self, msg: Msg) -> None:
        name = msg.subject[len(self._prefix) :]
        try:
            action = ControlAction(name)
        except ValueError:
            await self._reply(msg, 404, f"unknown control action {name[:32]!r}")
            return
        actor = header_value((msg.headers or {}).get(ACTOR_HEADER, "unknown"))[:128] or "unknown"
        refused = self._check(msg)
        if refused is not None:
            code, detail = refused
            result = ControlResult(status="error", detail=detail)
            log.warning("control %s refused for actor %r: %s", action.value, actor, detail)
            await self._audit(actor, "anonymous", action, result)
            await self._reply(msg, code, detail, result)
            return
        try:
            detail = await self._act(action)
        except NotRunning as exc:
            result = ControlResult(status="error", detail=str(exc))
            log.warning("control %s by %r refused: %s", action.value, actor, exc)
            await self._audit(actor, "admin", action, result)
            await self._reply(
                msg, 503, str(exc), result, {RETRY_AFTER_HEADER: str(OVERLOAD_RETRY_AFTER_MS)}
            )
            return
        except ValueError as exc:
            result = ControlResult(status="error", detail=str(exc))
            log.warning("control %s by %r failed: %s", action.value, actor, exc)
            await self._audit(actor, "admin", action, result)
            await self._reply(msg, 400, str(exc), result)
            return
        result = ControlResult(status="ok", detail=detail)
        log.info("control %s by %r: %s", action.value, actor, detail)
        await self._audit(actor, "admin", action, result)
        if msg.reply and self._nc is not None:
            # Not msg.respond(): nats-py would send the request's headers, token
            # included, back with the reply.
            await self._nc.publish(msg.reply, result.model_dump_json().encode())

    async def _reply(
        self,
        msg: Msg,
        code: int,
        detail: str,
        result: ControlResult | None = None,
        extra: dict[str, str] | None = None,
    ) -> None:
        if not msg.reply or self._nc is None:
            return
        body = (result or ControlResult(status="error", detail=detail)).model_dump_json()
        await self._nc.publish(
            msg.reply,
            body.encode(),
            headers={
                SERVICE_ERROR_HEADER: header_value(detail),
                SERVICE_ERROR_CODE_HEADER: str(code),
                **(extra or {}),
            },
        )

    async def _audit(
        self, actor: str, role: str, action: ControlAction, result: ControlResult
    ) -> None:
        if self._nc is None:
            return
        envelope = AuditEnvelope(
            actor=actor, role=role, action=action, result=result, ts=time.time()
        )
        await self._nc.publish(self._audit_subject, envelope.model_dump_json().encode())
