"""The four built-in tools: what they answer, how they fail, and the schemas the model sees."""

from __future__ import annotations

import re
import socket
from dataclasses import replace
from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import hypothesis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatstream import config
from chatstream.config import ToolSettings
from chatstream.errors import ToolError
from chatstream.tools import (
    Tool,
    ToolContext,
    calculate,
    calculator,
    clock,
    convert_temperature,
    default_tools,
    get_current_time,
    get_weather,
    tool,
)
from tests.fakes.open_meteo import FakeOpenMeteo, run_fake_open_meteo

Steps = list[tuple[str, float | None]]


def context(settings: ToolSettings | None = None) -> tuple[ToolContext, Steps]:
    steps: Steps = []
    return ToolContext(lambda message, progress: steps.append((message, progress)), settings), steps


def weather_settings(fake: FakeOpenMeteo, **changes: Any) -> ToolSettings:
    return ToolSettings(
        weather_geocoding_url=fake.geocoding_url, weather_forecast_url=fake.forecast_url, **changes
    )


async def run(tool: Tool, arguments: dict[str, Any], settings: ToolSettings | None = None) -> str:
    ctx, _ = context(settings)
    return await tool(ctx, arguments)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the registry and the schemas ---------------------------------------------------------


def test_default_tools_are_the_four_in_order() -> None:
    registry = default_tools()
    assert [t.name for t in registry] == [
        "get_weather",
        "convert_temperature",
        "calculate",
        "get_current_time",
    ]
    assert default_tools() is not registry  # a fresh registry each time


@pytest.mark.parametrize(
    ("tool", "properties", "required"),
    [
        (get_weather, {"location": "string"}, ["location"]),
        (
            convert_temperature,
            {"value": "number", "from_unit": "string", "to_unit": "string"},
            ["value", "from_unit", "to_unit"],
        ),
        (calculate, {"expression": "string"}, ["expression"]),
        (get_current_time, {"timezone": "string"}, []),
    ],
)
def test_schema_has_typed_described_parameters(
    tool: Tool, properties: dict[str, str], required: list[str]
) -> None:
    schema = tool.parameters
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert schema.get("required", []) == required
    assert {name: p["type"] for name, p in schema["properties"].items()} == properties
    for prop in schema["properties"].values():
        assert prop["description"]  # from the docstring's Args section
        assert "title" not in prop
    assert tool.description and "\n" not in tool.description
    assert "Args:" not in tool.description


def test_time_zone_defaults_to_utc_in_the_schema() -> None:
    assert get_current_time.parameters["properties"]["timezone"]["default"] == "UTC"


@pytest.mark.parametrize(
    ("tool", "arguments"),
    [
        (get_weather, {}),
        (get_weather, {"location": 12}),
        (get_weather, {"location": "Seoul", "units": "metric"}),
        (convert_temperature, {"value": "warm", "from_unit": "C", "to_unit": "F"}),
        (convert_temperature, {"value": 20, "from_unit": "C"}),
        (calculate, {"expression": ["1", "+", "1"]}),
        (calculate, {"expression": "1+1", "precise": True}),
        (get_current_time, {"timezone": None}),
        (get_current_time, {"tz": "UTC"}),
    ],
)
async def test_validate_refuses_wrong_arguments(tool: Tool, arguments: dict[str, Any]) -> None:
    with pytest.raises(ToolError, match=f"invalid arguments for {tool.name}"):
        tool.validate(arguments)
    with pytest.raises(ToolError):
        await run(tool, arguments)


def test_validate_coerces_a_numeric_string() -> None:
    assert convert_temperature.validate({"value": "20", "from_unit": "C", "to_unit": "F"}) == {
        "value": 20.0,
        "from_unit": "C",
        "to_unit": "F",
    }


# -- get_weather ---------------------------------------------------------------------------


async def test_weather_reports_current_conditions_and_progress() -> None:
    with run_fake_open_meteo() as fake:
        ctx, steps = context(weather_settings(fake))
        result = await get_weather(ctx, {"location": "Seoul"})
    assert result == "Seoul, South Korea: 20.1°C, clear sky, humidity 55%, wind 7.2 km/h"
    assert [message for message, _ in steps] == [
        "Finding Seoul…",
        "Fetching the forecast for Seoul, South Korea…",
        "Done",
    ]
    assert [fraction for _, fraction in steps] == [0.1, 0.5, 1.0]


async def test_weather_sends_the_requests_open_meteo_expects() -> None:
    with run_fake_open_meteo() as fake:
        await run(get_weather, {"location": "Tokyo"}, weather_settings(fake))
        calls = fake.calls
    assert calls == [
        ("/v1/search", {"name": "Tokyo", "count": "1", "language": "en", "format": "json"}),
        (
            "/v1/forecast",
            {
                "latitude": "35.6895",
                "longitude": "139.69171",
                "current": "temperature_2m,relative_humidity_2m,weather_code,wind_speed_10m",
                "timezone": "auto",
            },
        ),
    ]


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("서울", "Seoul, South Korea: 20.1°C"),
        ("new york", "New York, United States: 15.8°C, slight rain"),
        ("London", "London, England, United Kingdom: 11.2°C, fog"),
        ("Paris", "Paris, Île-de-France, France: 17.5°C, partly cloudy"),
        ("Seoul, KR", "Seoul, South Korea: 20.1°C"),
        ("  Busan  ", "Busan, South Korea: 22.4°C, mainly clear"),
    ],
)
async def test_weather_finds_places_by_any_name(location: str, expected: str) -> None:
    with run_fake_open_meteo() as fake:
        result = await run(get_weather, {"location": location}, weather_settings(fake))
        searched = fake.calls[0][1]["name"]
    assert result.startswith(expected)
    assert searched == location.strip()  # sent as given, never translated


async def test_weather_qualifier_picks_the_matching_place() -> None:
    # The fake, like older Open-Meteo versions, does not read "Name, Qualifier" itself.
    with run_fake_open_meteo() as fake:
        result = await run(get_weather, {"location": "Paris, France"}, weather_settings(fake))
        names = [params["name"] for _, params in fake.calls if "name" in params]
    assert result.startswith("Paris, Île-de-France, France:")
    assert names == ["Paris, France", "Paris"]


async def test_unknown_place_is_a_clear_error() -> None:
    with run_fake_open_meteo() as fake:
        ctx, steps = context(weather_settings(fake))
        with pytest.raises(ToolError, match="no place called 'Xyzzy' was found"):
            await get_weather(ctx, {"location": "Xyzzy"})
        assert len(fake.calls) == 1  # no forecast asked for
    assert steps == [("Finding Xyzzy…", 0.1)]


async def test_empty_location_is_refused_without_a_request() -> None:
    with run_fake_open_meteo() as fake:
        with pytest.raises(ToolError, match="no location"):
            await run(get_weather, {"location": "   "}, weather_settings(fake))
        assert fake.calls == []


async def test_service_error_status_is_reported() -> None:
    with run_fake_open_meteo(fail_status=503) as fake:
        with pytest.raises(ToolError) as caught:
            await run(get_weather, {"location": "Seoul"}, weather_settings(fake))
    assert "answered an error: HTTP 503" in caught.value.message
    assert "Service temporarily unavailable" in caught.value.message


async def test_forecast_error_after_geocoding_is_reported() -> None:
    with run_fake_open_meteo() as fake:
        settings = replace(weather_settings(fake), weather_forecast_url=f"{fake.base}/v1/missing")
        ctx, steps = context(settings)
        with pytest.raises(ToolError, match="answered an error: HTTP 404"):
            await get_weather(ctx, {"location": "Seoul"})
    assert [fraction for _, fraction in steps] == [0.1, 0.5]


async def test_unreachable_service_is_reported() -> None:
    port = closed_port()
    settings = ToolSettings(
        weather_geocoding_url=f"http://127.0.0.1:{port}/v1/search",
        weather_forecast_url=f"http://127.0.0.1:{port}/v1/forecast",
    )
    with pytest.raises(ToolError, match="the weather service is unreachable"):
        await run(get_weather, {"location": "Seoul"}, settings)


async def test_misconfigured_url_is_reported() -> None:
    settings = ToolSettings(weather_geocoding_url="not-a-url", weather_forecast_url="")
    with pytest.raises(ToolError, match="the weather service is unreachable"):
        await run(get_weather, {"location": "Seoul"}, settings)


async def test_slow_service_times_out_inside_the_tool_timeout() -> None:
    # Each request may take 40% of tool_timeout_s: 0.2 s here, against a 2 s delay.
    with run_fake_open_meteo(delay_s=2.0) as fake:
        started = datetime.now(UTC)
        with pytest.raises(ToolError, match=r"timed out after 0\.2 s"):
            await run(
                get_weather, {"location": "Seoul"}, weather_settings(fake, tool_timeout_s=0.5)
            )
        assert (datetime.now(UTC) - started).total_seconds() < 1.5
        assert await fake.wait_for_disconnect()


async def test_answer_of_the_wrong_shape_is_reported() -> None:
    with run_fake_open_meteo() as fake:
        # The geocoding endpoint as the forecast: valid JSON, but no current conditions.
        settings = replace(weather_settings(fake), weather_forecast_url=fake.geocoding_url)
        with pytest.raises(ToolError, match="without current conditions"):
            await run(get_weather, {"location": "Seoul"}, settings)


def test_without_settings_a_tool_gets_the_default_endpoints_and_bounds() -> None:
    ctx, _ = context()
    assert ctx.settings.weather_geocoding_url == config.DEFAULT_GEOCODING_URL
    assert ctx.settings.weather_forecast_url == config.DEFAULT_FORECAST_URL
    assert ctx.settings == ToolSettings()
    assert ctx.deps is None


async def test_fake_answers_unknown_names_like_the_real_api() -> None:
    with run_fake_open_meteo() as fake:
        async with httpx.AsyncClient() as http:
            response = await http.get(fake.geocoding_url, params={"name": "Xyzzy", "count": 1})
    assert response.status_code == 200
    assert set(response.json()) == {"generationtime_ms"}


# -- convert_temperature ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "source", "target", "expected"),
    [
        (20, "C", "F", "20°C = 68°F"),
        (68, "F", "C", "68°F = 20°C"),
        (0, "celsius", "kelvin", "0°C = 273.15 K"),
        (0, "K", "C", "0 K = -273.15°C"),
        (300, "k", "°F", "300 K = 80.33°F"),
        (-40, "Fahrenheit", "Celsius", "-40°F = -40°C"),
        (36.6, "℃", "degrees Fahrenheit", "36.6°C = 97.88°F"),
        (100, "F", "C", "100°F = 37.78°C"),
        (-459.67, "F", "K", "-459.67°F = 0 K"),
        (21.5, "C", "C", "21.5°C = 21.5°C"),
        (-0.001, "C", "F", "0°C = 32°F"),
    ],
)
async def test_temperature_conversions(
    value: float, source: str, target: str, expected: str
) -> None:
    ctx, steps = context()
    result = await convert_temperature(
        ctx, {"value": value, "from_unit": source, "to_unit": target}
    )
    assert result == expected
    assert len(steps) == 1


@pytest.mark.parametrize("unit", ["X", "", "celsius fahrenheit", "°", "rankine"])
async def test_unknown_temperature_unit_is_refused(unit: str) -> None:
    with pytest.raises(ToolError, match="unknown temperature unit"):
        await run(convert_temperature, {"value": 1, "from_unit": unit, "to_unit": "C"})
    with pytest.raises(ToolError, match="use C, F or K"):
        await run(convert_temperature, {"value": 1, "from_unit": "C", "to_unit": unit})


@pytest.mark.parametrize(
    ("value", "unit", "floor"),
    [(-273.16, "C", "-273.15°C"), (-500, "F", "-459.67°F"), (-1, "K", "0 K")],
)
async def test_below_absolute_zero_is_refused(value: float, unit: str, floor: str) -> None:
    with pytest.raises(ToolError, match=f"below absolute zero \\({floor}\\)"):
        await run(convert_temperature, {"value": value, "from_unit": unit, "to_unit": "K"})


async def test_non_finite_temperature_is_refused() -> None:
    with pytest.raises(ToolError, match="not a temperature"):
        await run(convert_temperature, {"value": "nan", "from_unit": "C", "to_unit": "F"})


# -- calculate ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("48 * 12 - 7", "569"),
        ("2 + 3 * 4", "14"),
        ("(2 + 3) * 4", "20"),
        ("2 ** 3 ** 2", "512"),
        ("-2 ** 2", "-4"),
        ("7 / 2", "3.5"),
        ("6 / 3", "2"),
        ("7 // 2", "3"),
        ("-7 // 2", "-4"),
        ("7 % 3", "1"),
        ("0.1 + 0.2", "0.3"),
        ("1 / 3", "0.333333333333"),
        ("2 ** -2", "0.25"),
        ("+5 - -5", "10"),
        ("2 ** 100", "1267650600228229401496703205376"),
        ("sqrt(16) + abs(-3)", "7"),
        ("round(3.14159, 2)", "3.14"),
        ("min(4, 2, 8) + max(1, 9)", "11"),
        ("floor(2.7) + ceil(2.1)", "5"),
        ("log(e) + log10(1000) + log2(8)", "7"),
        ("log(8, 2)", "3"),
        ("cos(0) + sin(0) + exp(0)", "2"),
        ("round(pi, 4)", "3.1416"),
        ("1e20", "1e+20"),
        ("-0.0", "0"),
        ("  1_000 + 1 ", "1001"),
        ("(" * 200 + "1" + ")" * 200, "1"),
    ],
)
async def test_calculator_arithmetic(expression: str, expected: str) -> None:
    ctx, steps = context()
    assert await calculate(ctx, {"expression": expression}) == expected
    assert len(steps) == 1


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os')", "'__import__' is not a known function"),
        ("__import__('os').system('true')", "attribute access cannot be used"),
        ("open('/etc/passwd')", "'open' is not a known function"),
        ("eval('1')", "'eval' is not a known function"),
        ("x + 1", "unknown name 'x'"),
        ("().__class__", "attribute access cannot be used"),
        ("math.pi", "attribute access cannot be used"),
        ("(lambda: 1)()", "lambda cannot be used"),
        ("(2)(3)", "only the known functions can be called"),
        ("lambda: 1", "lambda cannot be used"),
        ("[1, 2][0]", "indexing cannot be used"),
        ("1 < 2", "comparisons cannot be used"),
        ("'a' * 3", "'a' is not a number"),
        ("True + 1", "True is not a number"),
        ("1j * 1j", "1j is not a number"),
        ("2 ^ 3", "use \\*\\* for powers"),
        ("1 << 3", "operator << is not supported"),
        ("~1", "only unary"),
        ("sqrt(x=4)", "plain arguments only"),
        ("sqrt(*[4])", "plain arguments only"),
        ("sqrt(1, 2)", "takes 1 argument"),
        ("min()", "takes at least 1 argument"),
        ("round(1, 10 ** 9)", "between -100 and 100"),
        ("1 +", "not a valid arithmetic expression"),
        ("import os", "not a valid arithmetic expression"),
        ("1\x00", "not a valid arithmetic expression"),
        ("", "the expression is empty"),
        ("1 / 0", "division by zero"),
        ("1 // 0", "division by zero"),
        ("1 % 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("sqrt(-1)", "math error"),
        ("log(0)", "math error"),
        ("(-8) ** 0.5", "not a real number"),
        ("9 ** 9 ** 9", "too large"),
        ("2 ** 100000", "too large"),
        ("10 ** 600 * 10 ** 600", "too large"),
        ("1e308 * 10", "too large"),
        ("exp(1000)", "too large"),
        ("10 ** 400 / 1", "too large"),
        ("1" + "+1" * 300, "too long|too complex"),
        ("-" * 499 + "1", "too complex"),
    ],
)
async def test_calculator_refuses(expression: str, message: str) -> None:
    with pytest.raises(ToolError, match=message):
        await run(calculate, {"expression": expression})


def test_calculator_bounds_length_and_node_count() -> None:
    with pytest.raises(ToolError, match="too long"):
        calculator.evaluate("1" * (calculator.MAX_CHARS + 1))
    within_length = "+".join(["1"] * 200)  # 399 characters, 401 nodes
    assert len(within_length) <= calculator.MAX_CHARS
    with pytest.raises(ToolError, match="too complex"):
        calculator.evaluate(within_length)


def test_calculator_allows_results_up_to_the_digit_limit() -> None:
    assert calculator.format_number(calculator.evaluate("10 ** 999")) == "1" + "0" * 999
    assert calculator.evaluate("(-1) ** (10 ** 50)") == 1  # a huge exponent of a small base


Expression = tuple[str, int]


def _combine(pair: tuple[Expression, str, Expression]) -> Expression:
    (left, a), op, (right, b) = pair
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"({left} {op} {right})", value


def _divide(pair: tuple[Expression, str, Expression]) -> Expression:
    (left, a), op, (right, b) = pair
    return f"({left} {op} {right})", a // b if op == "//" else a % b


_leaves = st.integers(-50, 50).map(lambda n: (str(n), n))
_expressions = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["+", "-", "*"]), inner).map(_combine),
        st.tuples(inner, st.sampled_from(["//", "%"]), inner.filter(lambda e: e[1] != 0)).map(
            _divide
        ),
        inner.map(lambda e: (f"-{e[0]}", -e[1])),
    ),
    max_leaves=12,
)


@hypothesis.settings(max_examples=300, deadline=None)
@given(_expressions)
def test_calculator_matches_python_integer_arithmetic(case: Expression) -> None:
    text, value = case
    assert calculator.evaluate(text) == value
    assert calculator.format_number(calculator.evaluate(text)) == str(value)


@hypothesis.settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False, width=64))
def test_calculator_float_formatting_reads_back_close(x: float) -> None:
    text = calculator.format_number(x)
    assert abs(float(text) - x) <= abs(x) * 1e-11


# -- get_current_time -------------------------------------------------------------------

_STAMP = re.compile(
    r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}) (\S+) \((\S+), UTC([+-]\d{2}:\d{2})\), (\w+)$"
)


def stop_clock(monkeypatch: pytest.MonkeyPatch, instant: datetime) -> None:
    def now(zone: tzinfo) -> datetime:
        return instant.astimezone(zone)

    monkeypatch.setattr(clock, "_now", now)


@pytest.mark.parametrize(
    ("zone", "expected"),
    [
        ("Asia/Seoul", "2026-11-24 17:05:12 KST (Asia/Seoul, UTC+09:00), Tuesday"),
        ("UTC", "2026-11-24 08:05:12 UTC (UTC, UTC+00:00), Tuesday"),
        ("America/New_York", "2026-11-24 03:05:12 EST (America/New_York, UTC-05:00), Tuesday"),
        ("Asia/Kolkata", "2026-11-24 13:35:12 IST (Asia/Kolkata, UTC+05:30), Tuesday"),
        ("America/St_Johns", "2026-11-24 04:35:12 NST (America/St_Johns, UTC-03:30), Tuesday"),
        ("asia/seoul", "2026-11-24 17:05:12 KST (Asia/Seoul, UTC+09:00), Tuesday"),
        ("Seoul", "2026-11-24 17:05:12 KST (Asia/Seoul, UTC+09:00), Tuesday"),
        ("New York", "2026-11-24 03:05:12 EST (America/New_York, UTC-05:00), Tuesday"),
    ],
)
async def test_current_time_is_formatted_for_the_zone(
    monkeypatch: pytest.MonkeyPatch, zone: str, expected: str
) -> None:
    stop_clock(monkeypatch, datetime(2026, 11, 24, 8, 5, 12, tzinfo=UTC))
    ctx, steps = context()
    assert await get_current_time(ctx, {"timezone": zone}) == expected
    assert len(steps) == 1


async def test_current_time_follows_daylight_saving(monkeypatch: pytest.MonkeyPatch) -> None:
    stop_clock(monkeypatch, datetime(2026, 7, 1, 12, 0, 0, tzinfo=UTC))
    result = await run(get_current_time, {"timezone": "Europe/London"})
    assert result == "2026-07-01 13:00:00 BST (Europe/London, UTC+01:00), Wednesday"


async def test_current_time_defaults_to_utc_and_reads_the_real_clock() -> None:
    result = await run(get_current_time, {})
    match = _STAMP.match(result)
    assert match, result
    stamp, abbreviation, name, offset, weekday = match.groups()
    assert (abbreviation, name, offset) == ("UTC", "UTC", "+00:00")
    shown = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - shown).total_seconds()) < 5
    assert weekday == shown.strftime("%A")


async def test_current_time_matches_zoneinfo() -> None:
    result = await run(get_current_time, {"timezone": "Australia/Sydney"})
    match = _STAMP.match(result)
    assert match, result
    shown = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")
    expected = datetime.now(ZoneInfo("Australia/Sydney")).replace(tzinfo=None)
    assert abs((expected - shown).total_seconds()) < 5


@pytest.mark.parametrize(
    "zone", ["Mars/Olympus_Mons", "Asia", "../etc/passwd", "/etc/localtime", ""]
)
async def test_unknown_time_zone_is_named_in_the_error(zone: str) -> None:
    with pytest.raises(ToolError, match=f"unknown time zone {re.escape(repr(zone))}"):
        await run(get_current_time, {"timezone": zone})


async def _ok(ctx: ToolContext, text: str) -> str:
    return text


async def _star(ctx: ToolContext, *texts: str) -> str:
    return " ".join(texts)


async def _stars(ctx: ToolContext, **fields: str) -> str:
    return str(fields)


async def _positional(ctx: ToolContext, text: str, /) -> str:
    return text


@pytest.mark.parametrize("name", ["with space", "ünïcode", "x" * 65, "dots.in.it"])
def test_a_tool_name_the_providers_refuse_is_refused_at_once(name: str) -> None:
    with pytest.raises(TypeError, match="must be 1-64 characters of"):
        tool(name=name)(_ok)
    assert tool(name="send-email_2")(_ok).name == "send-email_2"


@pytest.mark.parametrize("function", [_star, _stars, _positional])
def test_a_parameter_no_call_can_name_is_refused_at_once(function: Any) -> None:
    with pytest.raises(TypeError, match="must be one a call can name"):
        tool(function)
