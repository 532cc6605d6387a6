"""Sinks: where committed rows live. One module per backend behind :class:`Sink`."""

from __future__ import annotations

from store_svc.errors import ConfigError
from store_svc.settings import Settings
from store_svc.store.base import Batch, Sink
from store_svc.store.sqlite import SqliteSink

__all__ = ["Batch", "Sink", "SqliteSink", "make_sink"]


def make_sink(settings: Settings) -> Sink:
    """Build the sink that ``STORE_DATABASE_URL`` names (not yet opened).

    Args:
        settings: the service settings.

    Returns:
        An unopened sink.

    Raises:
        ConfigError: the URL names a backend this version does not have.
    """
    path = settings.sqlite_path
    if path is not None:
        return SqliteSink(
            path,
            synchronous=settings.sqlite_synchronous,
            expiring=frozenset(settings.retentions),
        )
    if settings.database_url.startswith(("postgresql://", "postgres://")):
        from store_svc.store.postgres import PostgresSink

        return PostgresSink(
            settings.database_url,
            timescaledb=settings.timescaledb,
            chunk_intervals=settings.chunk_intervals,
            expiring=frozenset(settings.retentions),
        )
    raise ConfigError(f"no sink for STORE_DATABASE_URL {settings.database_url.split(':')[0]}")
