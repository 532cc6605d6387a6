"""The one place that imports ``market-data-core``.

Core warns about its own legacy module layout when imported; those warnings are
silenced for Core's modules only, never globally. Only the top-level package and
``market_data_core.telemetry`` are used: Core has other, unrelated classes that
share the names ``Bar``, ``EventMeta`` and ``Health``.
"""

from __future__ import annotations

import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"market_data_core(\..*)?$")

from market_data_core import (  # noqa: E402
    Bar,
    FeedbackPublisher,
    OptionSnapshot,
    Quote,
    Trade,
)
from market_data_core.telemetry import (  # noqa: E402
    AuditEnvelope,
    BackpressureLevel,
    ControlAction,
    ControlResult,
    FeedbackEvent,
    HealthComponent,
    HealthStatus,
    RateAdjustment,
)

__all__ = [
    "AuditEnvelope",
    "BackpressureLevel",
    "Bar",
    "ControlAction",
    "ControlResult",
    "FeedbackEvent",
    "FeedbackPublisher",
    "HealthComponent",
    "HealthStatus",
    "OptionSnapshot",
    "Quote",
    "RateAdjustment",
    "Trade",
]
