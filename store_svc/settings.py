"""The one settings object, read from the environment once at start-up.

Every setting is an environment variable with the prefix ``STORE_``; the admin token
is also accepted as plain ``ADMIN_TOKEN``. Nothing else in the package reads the
environment: components receive the :class:`Settings` instance they need.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from dotenv import dotenv_values
from pydantic import (
    AliasChoices,
    BeforeValidator,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "RELOADABLE",
    "Duration",
    "Settings",
    "format_duration",
    "load_settings",
    "parse_duration",
    "reloaded",
    "unknown_environment",
]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdwy]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400, "y": 365 * 86_400}


def parse_duration(value: object) -> object:
    """``90d``, ``12h``, ``5y`` (365 days), ``30m``, ``45s``, ``2w``, or seconds, as a
    ``timedelta``; anything else is handed on for pydantic to judge."""
    if isinstance(value, str):
        m = _DURATION.match(value.lower())
        if m is None:
            raise ValueError(f"{value!r} is not a duration (e.g. 90d, 12h, 5y, 30m, 45s)")
        try:
            return timedelta(seconds=float(m.group(1)) * _UNIT_S[m.group(2)])
        except OverflowError:
            raise ValueError(f"{value!r} is longer than any duration this store takes") from None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    return value


def format_duration(value: timedelta) -> str:
    """The shortest of ``5y``, ``2w``, ``7d``, ``12h``, ``30m``, ``45s`` that is exact."""
    seconds = value.total_seconds()
    for unit in ("y", "w", "d", "h", "m"):
        if seconds and seconds % _UNIT_S[unit] == 0:
            return f"{int(seconds // _UNIT_S[unit])}{unit}"
    return f"{seconds:g}s"


#: A length of time: ``90d``, ``12h``, ``5y``, or seconds.
Duration = Annotated[timedelta, BeforeValidator(parse_duration)]

_NATS_TOKEN = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"


class Settings(BaseSettings):
    """Runtime configuration of ``store-svc``."""

    model_config = SettingsConfigDict(
        env_prefix="STORE_",
        extra="ignore",
        frozen=True,
        populate_by_name=True,
    )

    nats_url: str = "nats://127.0.0.1:4222"
    """NATS server URL; several, comma-separated, for a cluster."""

    nats_connect_timeout_s: float = Field(default=10.0, gt=0.0)
    """How long start-up waits for NATS before giving up (exit code 1), and, in
    JetStream mode, for JetStream to answer (a cluster electing its leader). After the
    first connection the service reconnects for ever."""

    nats_ping_interval_s: float = Field(default=5.0, gt=0.0, le=600.0)
    """How often each connection PINGs its server. A server that stops answering
    (frozen, or the network gone quiet) is given up after ``nats_max_outstanding_pings``
    unanswered PINGs, and the client reconnects to another node of the cluster: about
    ``interval * (max + 1)`` seconds (nats-py's own default would take 4 to 6 minutes)."""

    nats_max_outstanding_pings: int = Field(default=3, ge=1, le=100)
    """Unanswered PINGs after which a connection counts as stale and reconnects."""

    nats_creds: Path | None = None
    """A NATS ``.creds`` file (user JWT and NKey seed, decentralised auth). One
    authentication method at most: creds, NKey, user/password or token."""

    nats_nkey: Path | None = None
    """A file holding an NKey seed (``SU...``): the user proves it holds the key."""

    nats_user: str | None = None
    """User name for user/password authentication (with ``nats_password``)."""

    nats_password: SecretStr | None = None
    """Password for ``nats_user``."""

    nats_token: SecretStr | None = None
    """Token authentication."""

    nats_tls_ca: Path | None = None
    """CA certificate(s) (PEM) that the server's certificate must chain to; turns TLS
    on (as does a ``tls://`` URL, which without a CA trusts the system's CAs)."""

    nats_tls_cert: Path | None = None
    """Client certificate (PEM) for mutual TLS, with ``nats_tls_key``."""

    nats_tls_key: Path | None = None
    """Private key (PEM) of ``nats_tls_cert``."""

    nats_inbox_prefix: str = Field(default="_INBOX", pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
    """Prefix of the reply subjects this service's requests use, so its user's
    permissions can be limited to its own inboxes (e.g. ``_INBOX_store``)."""

    database_url: str = "sqlite:///./var/store.db"
    """Where records are stored: ``sqlite:///relative/path``, ``sqlite:////absolute/path``
    or ``postgresql://user:pass@host:port/db``."""

    ingest_mode: Literal["core", "jetstream"] = "core"
    """``core``: plain NATS subscriptions (at-most-once, request-reply writes acked
    after commit). ``jetstream``: durable pull consumer, ack after commit."""

    js_stream: str = Field(default="STORE_WRITES", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    """JetStream mode: the stream over ``<prefix>.store.write.>``."""

    js_durable: str = Field(default="store", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    """JetStream mode: the durable pull consumer every instance shares."""

    js_create: bool = True
    """JetStream mode: create the stream and the consumer at start-up when they do not
    exist. Turn off when operators manage them; a missing one then stops start-up."""

    js_retention: Literal["workqueue", "limits", "interest"] = "workqueue"
    """Retention of a stream the service creates: ``workqueue`` deletes a message once
    the store has acked it (the stream is a durable buffer in front of the store);
    ``limits`` keeps messages until ``js_max_age_s`` for other consumers or replay."""

    js_storage: Literal["file", "memory"] = "file"
    """Storage of a stream the service creates (``file`` survives a server restart)."""

    js_replicas: int = Field(default=1, ge=1, le=5)
    """Replicas of a stream and consumer the service creates (3 in a cluster)."""

    js_max_age_s: float = Field(default=0.0, ge=0.0)
    """Oldest message a stream the service creates keeps; 0 means no age limit."""

    js_ack_wait_s: float = Field(default=30.0, ge=1.0, le=3600.0)
    """How long the server waits for an ack before redelivering a message. Messages
    held longer (queued behind a slow commit) are kept alive with ``in_progress``."""

    js_max_ack_pending: int = Field(default=20_000, ge=1)
    """Most messages the consumer hands out unacked, over all instances; at least
    ``2 * batch_size + js_fetch_batch`` so a batch can fill while two commit."""

    js_fetch_batch: int = Field(default=256, ge=2, le=10_000)
    """Messages asked for per pull request (a new request goes out when half of the
    last one has arrived, so delivery does not stop between pulls)."""

    js_fetch_expires_s: float = Field(default=2.0, ge=0.1, le=60.0)
    """Lifetime of one pull request; the server sends idle heartbeats at a quarter of
    it, and a request that goes quiet for longer (server restart) is replaced."""

    js_handback_after_s: float = Field(default=10.0, ge=0.0, le=3600.0)
    """After the database has failed commits for this long, messages this instance
    holds are handed back (nak) so an instance that can reach its database stores
    them; 0 keeps them here until the database is back."""

    js_nak_delay_s: float = Field(default=0.0, ge=0.0, le=3600.0)
    """Redelivery delay of messages the service hands back unprocessed (stopping with
    the grace period exhausted, or arriving after intake stopped)."""

    subject_prefix: str = "mdp"
    """First token(s) of every subject the service uses."""

    queue_group: str = "store"
    """Queue group of the write subscription; instances in one group share the load."""

    queue_capacity: int = Field(default=100_000, gt=0)
    """Records the in-memory queue holds before intake waits."""

    batch_size: int = Field(default=1000, gt=0)
    """Records per database transaction (a flush happens at this size or after the
    flush interval, whichever comes first)."""

    flush_interval_ms: int = Field(default=10, ge=1, le=60_000)
    """Longest time a record waits in a partly filled batch before it is flushed."""

    soft_watermark: float = Field(default=0.5, gt=0.0, lt=1.0)
    """Queue fill fraction at which feedback goes ``soft``."""

    hard_watermark: float = Field(default=0.8, gt=0.0, le=1.0)
    """Queue fill fraction at which feedback goes ``hard``."""

    soft_recovery_watermark: float | None = Field(default=None, gt=0.0, lt=1.0)
    """Queue fill fraction below which ``soft`` may fall back to ``ok`` (hysteresis);
    unset means 0.1 below ``soft_watermark``."""

    hard_recovery_watermark: float | None = Field(default=None, gt=0.0, lt=1.0)
    """Queue fill fraction below which ``hard`` may fall back to ``soft``; unset means
    0.1 below ``hard_watermark``."""

    feedback_min_dwell_ms: int = Field(default=250, ge=0, le=600_000)
    """How long a level is held at least before it may go down, so a depth hovering
    around a mark does not make the level flap. Going up is always immediate."""

    feedback_heartbeat_s: float = Field(default=5.0, gt=0.0, le=3600.0)
    """The current level is re-published this often, so a late subscriber learns it."""

    feedback_redis_url: SecretStr | None = None
    """Also publish every feedback event to Core's event bus on this Redis
    (``redis://[:password@]host:port/db``, ``rediss://`` or ``unix://``): the stream
    ``<feedback_redis_namespace>:telemetry.feedback`` that Core's
    ``create_event_bus(backend="redis")`` reads. Needs the ``redis`` extra."""

    feedback_redis_namespace: str = Field(
        default="mdp", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$"
    )
    """The key prefix of Core's bus (its ``MD_NAMESPACE``)."""

    feedback_redis_maxlen: int = Field(default=10_000, ge=100, le=10_000_000)
    """The feedback stream is trimmed to about this many entries (``XADD MAXLEN ~``)."""

    query_enabled: bool = True
    """Answer the read API (``<prefix>.store.query.<kind>``, ``<prefix>.store.latest.<kind>``)."""

    query_max_limit: int = Field(default=10_000, ge=1, le=1_000_000)
    """Largest page a query may ask for (``limit``); a larger one is refused with 400.
    A page is also cut short to fit the NATS server's maximum payload."""

    query_default_limit: int = Field(default=1000, ge=1)
    """Page size of a query that names no ``limit``."""

    query_timeout_s: float = Field(default=5.0, gt=0.0, le=600.0)
    """Longest a query may take, waiting for a free reader included; past it the
    database work is cancelled and the reply is a 504."""

    query_max_symbols: int = Field(default=100, ge=1, le=500)
    """Most symbols one query or latest request may name (at most 500: a SQLite page
    reads each symbol in its own arm of a compound SELECT, which SQLite caps at 500)."""

    query_concurrency: int = Field(default=2, ge=1, le=64)
    """Queries run at once: SQLite reader processes, or PostgreSQL read connections.
    Each is separate from the writer, so reads never hold up ingest's commits."""

    coordinator_id: str = Field(
        default_factory=lambda: f"store-{socket.gethostname()}-{os.getpid()}",
        min_length=1,
        max_length=128,
    )
    """``coordinator_id`` of the feedback events; unique per instance by default
    (``store-<host>-<pid>``)."""

    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Port of the Prometheus metrics endpoint; unset means no endpoint."""

    admin_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("STORE_ADMIN_TOKEN", "ADMIN_TOKEN")
    )
    """Bearer token for the control subjects; unset disables control."""

    max_payload_bytes: int = Field(default=1024 * 1024, gt=0)
    """Write messages larger than this are rejected as ``oversize_payload``."""

    max_future_skew_s: float = Field(default=86_400.0, ge=0.0)
    """Record times further in the future than this are rejected as absurd
    (``timestamp_out_of_range``); option expiries are exempt."""

    shutdown_grace_s: float = Field(default=30.0, gt=0.0)
    """Upper bound on a clean shutdown: flush, commit, reply and drain."""

    nats_pending_msgs_limit: int | None = Field(default=None, gt=0)
    """Messages the NATS client buffers for the write subscription before it drops
    them as a slow consumer (each drop is counted and logged); unset means the queue
    capacity (at least 65,536), so the buffer in front of the queue holds about as
    much as the queue and a burst costs bounded memory and catch-up time."""

    nats_pending_bytes_limit: int | None = Field(default=None, gt=0)
    """Payload bytes the NATS client buffers for the write subscription (see above);
    unset means 512 bytes per record of queue capacity, at least 64 MiB."""

    loop_stall_s: float = Field(default=5.0, gt=0.0, le=3600.0)
    """``GET /healthz`` and ``/readyz`` answer 503 (``loop`` unhealthy) once the event
    loop has not refreshed their snapshot for this long: the process is stuck, and a
    liveness probe should restart it. They answer from the HTTP thread either way."""

    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL"] = "NORMAL"
    """SQLite ``synchronous`` pragma. ``NORMAL`` with WAL survives a process crash;
    ``FULL`` also survives power loss at some cost in commit latency."""

    timescaledb: Literal["auto", "require", "off"] = "auto"
    """PostgreSQL only. ``auto``: hypertables when the server has TimescaleDB
    preloaded, plain tables otherwise (with one warning when it is installed but not
    preloaded). ``require``: start-up fails (exit 1) unless TimescaleDB can be used.
    ``off``: plain tables; the extension is not created (tables that are hypertables
    already are refused)."""

    chunk_interval_bars: Duration = timedelta(days=7)
    """TimescaleDB chunk interval of the bars hypertable (new chunks only)."""

    chunk_interval_trades: Duration = timedelta(days=1)
    """TimescaleDB chunk interval of the trades hypertable."""

    chunk_interval_quotes: Duration = timedelta(days=1)
    """TimescaleDB chunk interval of the quotes hypertable."""

    chunk_interval_options: Duration = timedelta(days=1)
    """TimescaleDB chunk interval of the options hypertable."""

    retention_bars: Duration | None = None
    """Bars older than this are removed (e.g. ``5y``); unset keeps them all."""

    retention_trades: Duration | None = None
    """Trades older than this are removed (e.g. ``90d``); unset keeps them all."""

    retention_quotes: Duration | None = None
    """Quotes older than this are removed; unset keeps them all."""

    retention_options: Duration | None = None
    """Option snapshots older than this are removed; unset keeps them all."""

    retention_interval_s: float = Field(default=3600.0, gt=0.0)
    """Time between two retention passes (the first runs a second after start-up)."""

    retention_batch: int = Field(default=5000, ge=1, le=1_000_000)
    """Rows removed per step of a pass (SQLite and plain PostgreSQL): a write waits
    for one step at most."""

    sink_retry_initial_s: float = Field(default=0.1, gt=0.0)
    """First back-off after a failed commit (doubles, with jitter)."""

    sink_retry_max_s: float = Field(default=5.0, gt=0.0)
    """Cap of the commit back-off."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Level of the service's log on stderr."""

    env_file: Path | None = None
    """A file of ``STORE_*=value`` lines read at start-up and again by the ``reload``
    control action (the process environment wins over the file)."""

    @field_validator("admin_token")
    @classmethod
    def _check_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None  # empty means unset: control stays disabled
        if len(value.get_secret_value()) < 16:
            raise ValueError("the admin token must be at least 16 characters")
        return value

    @field_validator("subject_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        tokens = value.split(".")
        if not value or any(not t or any(c not in _NATS_TOKEN for c in t) for t in tokens):
            raise ValueError(
                "subject_prefix must be dot-separated tokens of letters, digits, '-' or '_'"
            )
        return value

    @field_validator("queue_group")
    @classmethod
    def _check_group(cls, value: str) -> str:
        if not value or any(c not in _NATS_TOKEN + "." for c in value):
            raise ValueError("queue_group must be letters, digits, '.', '-' or '_'")
        return value

    @field_validator(
        "chunk_interval_bars",
        "chunk_interval_trades",
        "chunk_interval_quotes",
        "chunk_interval_options",
    )
    @classmethod
    def _check_chunk_interval(cls, value: timedelta) -> timedelta:
        if value < timedelta(minutes=1):
            raise ValueError("a chunk interval is at least 1m")
        return value

    @field_validator("retention_bars", "retention_trades", "retention_quotes", "retention_options")
    @classmethod
    def _check_retention(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and not timedelta(hours=1) <= value <= timedelta(days=100 * 365):
            raise ValueError("a retention is at least 1h and at most 100y")
        return value

    @field_validator("feedback_redis_url")
    @classmethod
    def _check_redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        url = value.get_secret_value()
        if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("feedback_redis_url must start with redis://, rediss:// or unix://")
        if importlib.util.find_spec("redis") is None:
            raise ValueError(
                "feedback_redis_url needs the redis package: pip install 'market-data-store[redis]'"
            )
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme not in ("sqlite", "postgresql", "postgres"):
            raise ValueError("database_url must start with sqlite:/// or postgresql://")
        if scheme == "sqlite" and (
            not value.startswith("sqlite:///") or not value.removeprefix("sqlite:///").strip("/")
        ):
            raise ValueError("a SQLite database_url is sqlite:///relative or sqlite:////absolute")
        return value

    @model_validator(mode="after")
    def _check_invariants(self) -> Settings:
        if self.batch_size > self.queue_capacity:
            raise ValueError(
                f"batch_size ({self.batch_size}) must not exceed "
                f"queue_capacity ({self.queue_capacity})"
            )
        if not self.soft_watermark < self.hard_watermark:
            raise ValueError(
                f"soft_watermark ({self.soft_watermark}) must be below "
                f"hard_watermark ({self.hard_watermark})"
            )
        if not 0 < self.soft_recovery < self.soft_watermark:
            raise ValueError(
                f"soft_recovery_watermark ({self.soft_recovery}) must be above 0 and below "
                f"soft_watermark ({self.soft_watermark})"
            )
        if not self.hard_recovery < self.hard_watermark:
            raise ValueError(
                f"hard_recovery_watermark ({self.hard_recovery}) must be below "
                f"hard_watermark ({self.hard_watermark})"
            )
        if not self.soft_recovery < self.hard_recovery:
            raise ValueError(
                f"soft_recovery_watermark ({self.soft_recovery}) must be below "
                f"hard_recovery_watermark ({self.hard_recovery})"
            )
        if (
            self.ingest_mode == "jetstream"
            and self.js_max_ack_pending < 2 * self.batch_size + self.js_fetch_batch
        ):
            raise ValueError(
                f"js_max_ack_pending ({self.js_max_ack_pending}) must be at least "
                f"2 * batch_size + js_fetch_batch ({2 * self.batch_size + self.js_fetch_batch})"
            )
        if self.query_default_limit > self.query_max_limit:
            raise ValueError(
                f"query_default_limit ({self.query_default_limit}) must not exceed "
                f"query_max_limit ({self.query_max_limit})"
            )
        if self.sink_retry_initial_s > self.sink_retry_max_s:
            raise ValueError("sink_retry_initial_s must not exceed sink_retry_max_s")
        self._check_nats_auth()
        return self

    def _check_nats_auth(self) -> None:
        methods = [
            name
            for name, given in (
                ("nats_creds", self.nats_creds is not None),
                ("nats_nkey", self.nats_nkey is not None),
                ("nats_user", self.nats_user is not None or self.nats_password is not None),
                ("nats_token", self.nats_token is not None),
                (
                    "credentials in nats_url",
                    any("@" in u.split("//", 1)[-1] for u in self.nats_servers),
                ),
            )
            if given
        ]
        if len(methods) > 1:
            raise ValueError(
                f"NATS authentication: one method at most, got {' and '.join(methods)}"
            )
        if (self.nats_user is None) != (self.nats_password is None):
            raise ValueError("nats_user and nats_password go together")
        if (self.nats_tls_cert is None) != (self.nats_tls_key is None):
            raise ValueError("nats_tls_cert and nats_tls_key go together (mutual TLS)")
        for name in ("nats_creds", "nats_nkey", "nats_tls_ca", "nats_tls_cert", "nats_tls_key"):
            path = getattr(self, name)
            if path is not None and not (path.is_file() and os.access(path, os.R_OK)):
                raise ValueError(f"{name}: {path} is not a readable file")
        if self.nats_creds is not None:
            _check_creds(self.nats_creds)
        if self.nats_nkey is not None:
            _check_seed(self.nats_nkey.read_bytes(), f"nats_nkey: {self.nats_nkey}")

    @property
    def chunk_intervals(self) -> dict[str, timedelta]:
        """The TimescaleDB chunk interval of each kind's table."""
        return {
            "bars": self.chunk_interval_bars,
            "trades": self.chunk_interval_trades,
            "quotes": self.chunk_interval_quotes,
            "options": self.chunk_interval_options,
        }

    @property
    def retentions(self) -> dict[str, timedelta]:
        """How long each kind with a retention keeps its records."""
        kept = {
            "bars": self.retention_bars,
            "trades": self.retention_trades,
            "quotes": self.retention_quotes,
            "options": self.retention_options,
        }
        return {kind: value for kind, value in kept.items() if value is not None}

    @property
    def nats_servers(self) -> list[str]:
        """The NATS URLs of ``nats_url``, one per server."""
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]

    @property
    def write_pending_msgs(self) -> int:
        """The effective ``nats_pending_msgs_limit`` of the write subscription."""
        return self.nats_pending_msgs_limit or max(self.queue_capacity, 65_536)

    @property
    def write_pending_bytes(self) -> int:
        """The effective ``nats_pending_bytes_limit`` of the write subscription."""
        return self.nats_pending_bytes_limit or max(self.queue_capacity * 512, 64 * 1024 * 1024)

    @property
    def soft_recovery(self) -> float:
        """The effective soft recovery mark (fraction of capacity)."""
        if self.soft_recovery_watermark is not None:
            return self.soft_recovery_watermark
        return round(self.soft_watermark - 0.1, 6)

    @property
    def hard_recovery(self) -> float:
        """The effective hard recovery mark (fraction of capacity)."""
        if self.hard_recovery_watermark is not None:
            return self.hard_recovery_watermark
        return round(self.hard_watermark - 0.1, 6)

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite file named by ``database_url``, or None for another database."""
        if not self.database_url.startswith("sqlite:///"):
            return None
        return Path(self.database_url.removeprefix("sqlite:///"))

    def subject(self, *tokens: str) -> str:
        """Join ``tokens`` below the subject prefix.

        Args:
            tokens: subject tokens after the prefix, e.g. ``("store", "health")``.

        Returns:
            The full subject, e.g. ``mdp.store.health``.
        """
        return ".".join((self.subject_prefix, *tokens))


#: Settings ``reload`` may change in a running service; the rest need a restart.
RELOADABLE = (
    "soft_watermark",
    "hard_watermark",
    "soft_recovery_watermark",
    "hard_recovery_watermark",
    "feedback_min_dwell_ms",
    "feedback_heartbeat_s",
    "batch_size",
    "flush_interval_ms",
    "log_level",
)


def reloaded(current: Settings, environ: dict[str, str] | None = None) -> Settings:
    """``current`` with the reloadable settings read again from the environment.

    Args:
        current: the running settings.
        environ: the environment to read (default: the process environment).

    Returns:
        New, validated settings; only fields in ``RELOADABLE`` can differ, and one
        that is set nowhere keeps its current value.

    Raises:
        pydantic.ValidationError: the new values are invalid or break an invariant.
    """
    if environ is not None:
        env: Mapping[str, str | None] = environ
    else:
        env = {**_file_values(current.env_file), **os.environ}
    # Names are matched without regard to case, as at start-up.
    by_name = {key.upper(): value for key, value in env.items()}
    values = current.model_dump()
    for name in RELOADABLE:
        raw = by_name.get(f"STORE_{name.upper()}")
        if raw is not None:
            values[name] = raw
    return Settings.model_validate(values)


def _file_values(path: Path | None) -> dict[str, str | None]:
    if path is None:
        return {}
    try:
        return dict(dotenv_values(path))
    except OSError as exc:
        raise ValueError(f"cannot read STORE_ENV_FILE {path}: {exc}") from exc


def unknown_environment(environ: dict[str, str] | None = None) -> list[str]:
    """``STORE_*`` variables that name no setting (most likely misspelt).

    Args:
        environ: the environment to check (default: the process environment).

    Returns:
        The unknown variable names, sorted.
    """
    env = os.environ if environ is None else environ
    known = {f"STORE_{name.upper()}" for name in Settings.model_fields}
    return sorted(k for k in env if k.startswith("STORE_") and k.upper() not in known)


def load_settings(**overrides: object) -> Settings:
    """Read the settings from the environment, with explicit overrides on top.

    Args:
        overrides: field values that win over the environment (used by tests and
            the demo command).

    Returns:
        The validated settings.

    Raises:
        pydantic.ValidationError: a value is invalid or the invariants do not hold.
    """
    env_file = overrides.get("env_file", os.environ.get("STORE_ENV_FILE"))
    return Settings(_env_file=env_file, **overrides)  # type: ignore[arg-type]


def _check_creds(path: Path) -> None:
    """A ``.creds`` file must hold a user JWT and an NKey seed block: nats-py reads a
    file without the JWT block in a loop that never ends (the whole process hangs)."""
    text = path.read_bytes()
    jwt_at = text.find(b"BEGIN NATS USER JWT")
    seed_at = text.find(b"BEGIN USER NKEY SEED")
    if jwt_at < 0 or seed_at < 0:
        raise ValueError(
            f"nats_creds: {path} is not a .creds file (it needs a NATS USER JWT block and "
            "a USER NKEY SEED block)"
        )
    lines = text[seed_at:].splitlines()
    _check_seed(lines[1] if len(lines) > 1 else b"", f"nats_creds: {path}")


def _check_seed(seed: bytes, where: str) -> None:
    import nkeys

    try:
        nkeys.from_seed(bytearray(seed.strip()))
    except Exception:  # whatever nkeys raises, the file is no use; never show its text
        raise ValueError(f"{where} does not hold a valid NKey seed") from None
