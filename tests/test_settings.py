"""Settings: names, defaults, invariants, and where the admin token may come from."""

from __future__ import annotations

from datetime import timedelta

import pydantic
import pytest

from store_svc.settings import (
    Settings,
    format_duration,
    load_settings,
    parse_duration,
    unknown_environment,
)

pytestmark = pytest.mark.logic


def test_defaults_match_the_design() -> None:
    s = load_settings()
    assert s.queue_capacity == 100_000
    assert (s.soft_watermark, s.hard_watermark) == (0.5, 0.8)
    assert s.subject_prefix == "mdp"
    assert s.queue_group == "store"
    assert s.ingest_mode == "core"
    assert s.database_url.startswith("sqlite:///")
    assert s.admin_token is None


def test_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "STORE_NATS_URL": "nats://example:4222",
        "STORE_DATABASE_URL": "sqlite:////data/x.db",
        "STORE_INGEST_MODE": "jetstream",
        "STORE_SUBJECT_PREFIX": "desk.md",
        "STORE_QUEUE_CAPACITY": "5000",
        "STORE_BATCH_SIZE": "500",
        "STORE_FLUSH_INTERVAL_MS": "25",
        "STORE_SOFT_WATERMARK": "0.4",
        "STORE_HARD_WATERMARK": "0.9",
        "STORE_METRICS_PORT": "9108",
        "STORE_ADMIN_TOKEN": "s3cret-0123456789",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = Settings()
    assert s.nats_url == "nats://example:4222"
    assert str(s.sqlite_path) == "/data/x.db"
    assert s.ingest_mode == "jetstream"
    assert s.subject("store", "health") == "desk.md.store.health"
    assert (s.queue_capacity, s.batch_size, s.flush_interval_ms) == (5000, 500, 25)
    assert (s.soft_watermark, s.hard_watermark) == (0.4, 0.9)
    assert s.metrics_port == 9108
    assert s.admin_token is not None
    assert s.admin_token.get_secret_value() == "s3cret-0123456789"
    assert "s3cret" not in repr(s)


def test_plain_admin_token_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADMIN_TOKEN", "plain-token-0123456789")
    s = Settings()
    assert s.admin_token is not None
    assert s.admin_token.get_secret_value() == "plain-token-0123456789"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch_size": 200, "queue_capacity": 100}, "batch_size"),
        ({"soft_watermark": 0.8, "hard_watermark": 0.8}, "soft_watermark"),
        ({"soft_watermark": 0.9, "hard_watermark": 0.5}, "soft_watermark"),
        ({"hard_watermark": 1.5}, "hard_watermark"),
        ({"queue_capacity": 0}, "queue_capacity"),
        ({"database_url": "mysql://x"}, "database_url"),
        ({"database_url": "sqlite://relative.db"}, "sqlite"),
        ({"database_url": "sqlite:///"}, "sqlite"),
        ({"subject_prefix": "a..b"}, "subject_prefix"),
        ({"subject_prefix": "a.>"}, "subject_prefix"),
        ({"subject_prefix": "has space"}, "subject_prefix"),
        ({"ingest_mode": "kafka"}, "ingest_mode"),
        ({"flush_interval_ms": 0}, "flush_interval_ms"),
        ({"sink_retry_initial_s": 10, "sink_retry_max_s": 1}, "sink_retry"),
        ({"soft_watermark": 0.05, "hard_watermark": 0.5}, "soft_recovery_watermark"),
        ({"soft_recovery_watermark": 0.6}, "soft_recovery_watermark"),
        ({"hard_recovery_watermark": 0.85}, "hard_recovery_watermark"),
        ({"soft_recovery_watermark": 0.45, "hard_recovery_watermark": 0.3}, "soft_recovery"),
        ({"feedback_heartbeat_s": 0}, "feedback_heartbeat_s"),
        ({"coordinator_id": ""}, "coordinator_id"),
        ({"query_default_limit": 500, "query_max_limit": 100}, "query_default_limit"),
        ({"query_timeout_s": 0}, "query_timeout_s"),
        ({"query_concurrency": 0}, "query_concurrency"),
    ],
)
def test_invalid_combinations_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        load_settings(**overrides)


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(pydantic.ValidationError):
        s.batch_size = 5  # type: ignore[misc]


def test_misspelt_variables_are_found() -> None:
    env = {"STORE_BATCH_SIZE": "5", "STORE_BACTH_SIZE": "5", "STORE_ADMIN_TOKEN": "x", "HOME": "/"}
    assert unknown_environment(env) == ["STORE_BACTH_SIZE"]


def test_recovery_marks_default_below_their_marks() -> None:
    s = load_settings(soft_watermark=0.6, hard_watermark=0.9)
    assert (s.soft_recovery, s.hard_recovery) == (0.5, 0.8)
    s = load_settings(soft_recovery_watermark=0.2, hard_recovery_watermark=0.3)
    assert (s.soft_recovery, s.hard_recovery) == (0.2, 0.3)
    assert load_settings().coordinator_id.startswith("store-")


def test_empty_admin_token_means_unset_and_short_ones_are_refused() -> None:
    assert load_settings(admin_token="").admin_token is None
    with pytest.raises(pydantic.ValidationError, match="at least 16"):
        load_settings(admin_token="short")


def test_reload_reads_names_in_any_case_and_keeps_what_is_not_set() -> None:
    from store_svc.settings import reloaded

    current = load_settings(batch_size=10, queue_capacity=100, flush_interval_ms=7)
    new = reloaded(current, {"store_batch_size": "50", "STORE_LOG_LEVEL": "DEBUG"})
    assert (new.batch_size, new.log_level, new.flush_interval_ms) == (50, "DEBUG", 7)
    assert new.queue_capacity == 100, "only run-time settings change"
    with pytest.raises(pydantic.ValidationError, match="batch_size"):
        reloaded(current, {"STORE_BATCH_SIZE": "500"})


@pytest.mark.parametrize(
    ("text", "seconds", "shown"),
    [
        ("90d", 90 * 86_400, "90d"),
        ("12h", 43_200, "12h"),
        ("5y", 5 * 365 * 86_400, "5y"),
        ("2w", 14 * 86_400, "2w"),
        ("30m", 1_800, "30m"),
        ("45s", 45, "45s"),
        ("3600", 3_600, "1h"),
        (" 1.5d ", 129_600, "36h"),
    ],
)
def test_durations_read_as_a_desk_writes_them(text: str, seconds: int, shown: str) -> None:
    value = parse_duration(text)
    assert isinstance(value, timedelta)
    assert value.total_seconds() == seconds
    assert format_duration(value) == shown


@pytest.mark.parametrize("text", ["1 day", "d", "-1d", "7x", ""])
def test_a_duration_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_chunk_intervals_per_kind_and_their_floor() -> None:
    s = load_settings(chunk_interval_trades="6h", chunk_interval_options=3600)
    assert s.chunk_intervals == {
        "bars": timedelta(days=7),
        "trades": timedelta(hours=6),
        "quotes": timedelta(days=1),
        "options": timedelta(hours=1),
    }
    with pytest.raises(pydantic.ValidationError, match="at least 1m"):
        load_settings(chunk_interval_bars="30s")


def test_retentions_per_kind_and_their_bounds() -> None:
    s = load_settings(retention_trades="90d", retention_bars="5y")
    assert s.retentions == {"bars": timedelta(days=5 * 365), "trades": timedelta(days=90)}
    for wrong in ("30m", "101y"):
        with pytest.raises(pydantic.ValidationError, match="at least 1h and at most 100y"):
            load_settings(retention_quotes=wrong)
    with pytest.raises(pydantic.ValidationError, match="longer than any duration"):
        load_settings(retention_quotes="99999999999y")
