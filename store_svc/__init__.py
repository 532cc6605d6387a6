"""market-data-store: a NATS-native store for Core market data.

The path of a record through the package::

    intake.py      NATS write subscription (core mode)
    decode.py      payload -> validated rows + rejects (records.py: msgspec mirrors)
    queue.py       bounded queue, counted in records
    batcher.py     size-or-linger batches, retry, ack/reply after commit
    sinks/         SQLite (embedded default)
    service.py     lifecycle and shutdown order; cli.py the ``store-svc`` command
"""

from importlib.metadata import PackageNotFoundError, version

from .errors import (
    ConfigError,
    NatsUnavailable,
    RejectedInput,
    SchemaError,
    ShutdownTimeout,
    SinkError,
    StoreError,
)
from .settings import Settings, load_settings

try:
    __version__ = version("market-data-store")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

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


def __getattr__(name: str) -> object:
    # The service pulls in nats-py and Core; import it only when asked for.
    if name == "StoreService":
        from .service import StoreService

        return StoreService
    raise AttributeError(name)
