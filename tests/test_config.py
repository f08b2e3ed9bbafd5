"""Settings come from CHATSTREAM_* variables into small typed groups, or stop start-up clearly."""

from __future__ import annotations

import pytest

from chatstream.config import Settings, StreamSettings, ToolSettings, parse


def test_variables_fill_their_groups_by_type() -> None:
    settings = Settings.from_env(
        {
            "CHATSTREAM_PORT": "4000",
            "CHATSTREAM_HEARTBEAT_S": "2.5",
            "CHATSTREAM_CORS_ORIGINS": "http://a.example, http://b.example,",
            "CHATSTREAM_TOOL_TIMEOUT_S": "3",
            "CHATSTREAM_API_KEYS": "sk-one",
            "CHATSTREAM_MAX_STREAMS_PER_KEY": "",  # empty: the default
        }
    )
    assert settings.port == 4000
    assert settings.streams.heartbeat_s == 2.5
    assert settings.http.cors_origins == ("http://a.example", "http://b.example")
    assert settings.tooling.tool_timeout_s == 3.0
    assert settings.auth.api_keys == ("sk-one",)
    assert settings.limits.max_streams_per_key == 20


def test_options_given_on_the_command_line_win_over_variables() -> None:
    settings = Settings.from_env({"CHATSTREAM_MODEL": "openai:x"}, model="scripted", port=None)
    assert settings.model == "scripted"
    assert settings.port == 3002


@pytest.mark.parametrize(
    ("variable", "raw", "says"),
    [
        ("CHATSTREAM_PORT", "eighty", "CHATSTREAM_PORT='eighty' is not a whole number"),
        ("CHATSTREAM_RESUME_GRACE_S", "soon", "CHATSTREAM_RESUME_GRACE_S='soon' is not a number"),
        ("CHATSTREAM_RUN_TTL_S", "inf", "is not a finite number"),
    ],
)
def test_a_value_that_does_not_parse_names_its_variable(variable: str, raw: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        Settings.from_env({variable: raw})


@pytest.mark.parametrize(
    ("raw", "value"), [("true", True), ("1", True), ("Yes", True), ("off", False), ("0", False)]
)
def test_booleans_parse_as_booleans_not_as_text(raw: str, value: bool) -> None:
    assert parse("verbose", bool, raw) is value


def test_a_boolean_that_is_neither_names_its_variable() -> None:
    with pytest.raises(ValueError, match="CHATSTREAM_VERBOSE='maybe' is not a boolean"):
        parse("verbose", bool, "maybe")


def test_with_takes_flat_names_and_keeps_the_rest_of_each_group() -> None:
    base = Settings().with_(heartbeat_s=1.0, calculate_max_chars=9)
    changed = base.with_(retry_ms=10, model="scripted")
    assert changed.streams == StreamSettings(heartbeat_s=1.0, retry_ms=10)
    assert changed.tooling == ToolSettings(calculate_max_chars=9)
    assert changed.model == "scripted"
    assert base.streams.retry_ms == 3000  # frozen: the original is unchanged
    with pytest.raises(TypeError, match="no field 'heartbeat'"):
        base.with_(heartbeat=1)
