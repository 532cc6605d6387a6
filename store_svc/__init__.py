"""market-data-store: a NATS-native store for Core market data.

The folders follow a record's path (docs/architecture.md draws it)::

    bus/       the NATS client, connections, header helpers shared by every edge
    ingest/    write subjects -> decode -> bounded queue -> batcher
    store/     the sink interface, SQLite (writer and reader processes), PostgreSQL
    read/      the read API (query / latest over request-reply) and ``store-svc query``
    control/   health, readiness, micro, admin, feedback, metrics, HTTP probes
    runtime/   the service's wiring and lifecycle
    devtools/  private nats-server and PostgreSQL runners, the demo

Every name below is imported on first use, so a child process that imports one
module of the package (the SQLite worker) pays for nothing else.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from store_svc.errors import (
        ConfigError,
        NatsUnavailable,
        RejectedInput,
        SchemaError,
        ShutdownTimeout,
        SinkError,
        StoreError,
    )
    from store_svc.runtime.service import StoreService
    from store_svc.settings import Settings, load_settings

__all__ = [
    "ConfigError",
    "NatsUnavailable",
    "RejectedInput",
    "SchemaError",
    "Settings",
    "ShutdownTimeout",
    "SinkError",
    "StoreError",
    "StoreService",
    "__version__",
    "load_settings",
]

_HOMES = {
    "ConfigError": "store_svc.errors",
    "NatsUnavailable": "store_svc.errors",
    "RejectedInput": "store_svc.errors",
    "SchemaError": "store_svc.errors",
    "ShutdownTimeout": "store_svc.errors",
    "SinkError": "store_svc.errors",
    "StoreError": "store_svc.errors",
    "StoreService": "store_svc.runtime.service",
    "Settings": "store_svc.settings",
    "load_settings": "store_svc.settings",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("market-data-store")
        except PackageNotFoundError:  # a source tree that was not installed
            value = "0.0.0"
    elif name in _HOMES:
        value = getattr(import_module(_HOMES[name]), name)
    else:
        raise AttributeError(f"module 'store_svc' has no attribute {name!r}")
    globals()[name] = value
    return value
