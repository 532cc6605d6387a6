"""Rewrite the Core JSON-schema snapshots from the installed Core (run after a deliberate
Core upgrade, then review the diff): ``python tests/contracts/update.py``."""

from __future__ import annotations

import json
from pathlib import Path

from store_svc import core

HERE = Path(__file__).parent
MODELS = {
    "Bar": core.Bar,
    "Trade": core.Trade,
    "Quote": core.Quote,
    "OptionSnapshot": core.OptionSnapshot,
    "FeedbackEvent": core.FeedbackEvent,
    "HealthStatus": core.HealthStatus,
    "HealthComponent": core.HealthComponent,
}


def schema_text(model: type) -> str:
    """The canonical text of a model's JSON schema."""
    return json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"  # type: ignore[attr-defined]


if __name__ == "__main__":
    for name, model in MODELS.items():
        (HERE / f"{name}.json").write_text(schema_text(model))
        print(f"wrote {name}.json")
