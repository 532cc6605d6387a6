"""The public surface is what ``__all__`` says, and every name in it exists."""

from __future__ import annotations

import pytest

import store_svc

pytestmark = pytest.mark.logic


def test_exported_members() -> None:
    assert sorted(store_svc.__all__) == [
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
    for name in store_svc.__all__:
        assert getattr(store_svc, name) is not None


def test_every_error_is_a_store_error() -> None:
    for name in (
        "ConfigError",
        "NatsUnavailable",
        "RejectedInput",
        "SchemaError",
        "ShutdownTimeout",
        "SinkError",
    ):
        assert issubclass(getattr(store_svc, name), store_svc.StoreError)
