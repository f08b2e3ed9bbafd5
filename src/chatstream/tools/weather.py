"""``get_weather``: current conditions from Open-Meteo (a geocoding call, then a forecast call).

Place names are sent as given, in any script ("서울" finds Seoul), and answers are asked
for in English (``language=en``), whatever the question's language: the model words the
reply. A name with a qualifier ("Seoul, KR", "Paris, Texas") is tried whole first, then as
the bare name narrowed by the qualifier, since not every Open-Meteo version reads commas.
Every failure of the service (refused connection, timeout, HTTP error, unreadable body)
becomes a ``ToolError`` that says what happened.
"""

from __future__ import annotations

from typing import Any, TypeGuard

import httpx

from chatstream.errors import ToolError
from chatstream.tools.base import ToolContext, tool

__all__ = ["WMO_CODES", "get_weather"]

# Each of the two requests gets this share of the agent's tool timeout, so that a slow
# service ends in this module's clear message rather than in the agent's generic one.
_TIMEOUT_SHARE = 0.4
_MAX_LOCATION_CHARS = 200
_NARROW_BY = ("country", "country_code", "admin1", "admin2")
_CURRENT = "temperature_2m,relative_humidity_2m,weather_code,wind_speed_10m"

# WMO weather interpretation codes, as the Open-Meteo forecast documentation lists them.
WMO_CODES: dict[int, str] = {
    0: "clear sky",
    1: "mainly clear",
    2: "partly cloudy",
    3: "overcast",
    45: "fog",
    48: "depositing rime fog",
    51: "light drizzle",
    53: "moderate drizzle",
    55: "dense drizzle",
    56: "light freezing drizzle",
    57: "dense freezing drizzle",
    61: "slight rain",
    63: "moderate rain",
    65: "heavy rain",
    66: "light freezing rain",
    67: "heavy freezing rain",
    71: "slight snowfall",
    73: "moderate snowfall",
    75: "heavy snowfall",
    77: "snow grains",
    80: "slight rain showers",
    81: "moderate rain showers",
    82: "violent rain showers",
    85: "slight snow showers",
    86: "heavy snow showers",
    95: "thunderstorm",
    96: "thunderstorm with slight hail",
    99: "thunderstorm with heavy hail",
}


@tool
async def get_weather(ctx: ToolContext, location: str) -> str:
    """Get the current weather (temperature, conditions, humidity, wind) for a place.

    Args:
        location: A city or place name, e.g. "Seoul" or "Paris, France"; any language works.
    """
    place = " ".join(location.split())
    if not place:
        raise ToolError("no location was given")
    if len(place) > _MAX_LOCATION_CHARS:
        raise ToolError(f"the location is too long (at most {_MAX_LOCATION_CHARS} characters)")
    settings = ctx.settings
    geocoding_url = settings.weather_geocoding_url
    forecast_url = settings.weather_forecast_url
    timeout = settings.tool_timeout_s * _TIMEOUT_SHARE

    async with httpx.AsyncClient(timeout=timeout, follow_redirects=True) as client:
        ctx.progress(f"Finding {place}…", 0.1)
        found = await _geocode(client, geocoding_url, place)
        label = _label(found)
        ctx.progress(f"Fetching the forecast for {label}…", 0.5)
        forecast = await _get(
            client,
            forecast_url,
            {
                "latitude": found["latitude"],
                "longitude": found["longitude"],
                "current": _CURRENT,
                "timezone": "auto",
            },
        )
    line = _describe(label, forecast)
    ctx.progress("Done", 1.0)
    return line


async def _geocode(client: httpx.AsyncClient, url: str, place: str) -> dict[str, Any]:
    """The best match for ``place``; ``ToolError`` when there is none."""
    params: dict[str, Any] = {"name": place, "count": 1, "language": "en", "format": "json"}
    results = await _search(client, url, params)
    name, _, qualifier = (part.strip() for part in place.partition(","))
    if not results and name and qualifier:
        # "Springfield, Illinois, US": the first qualifier narrows, the rest is ignored.
        wanted = qualifier.split(",")[0].strip().casefold()
        candidates = await _search(client, url, {**params, "name": name, "count": 10})
        matching = [
            r for r in candidates if wanted in (str(r.get(k, "")).casefold() for k in _NARROW_BY)
        ]
        # No candidate matches "New York, NY" (admin1 is "New York"): the most likely one
        # is still better than nothing, and its full name in the answer shows which it is.
        results = matching or candidates
    if not results:
        raise ToolError(f"no place called {place!r} was found")
    return results[0]


async def _search(
    client: httpx.AsyncClient, url: str, params: dict[str, Any]
) -> list[dict[str, Any]]:
    body = await _get(client, url, params)
    # An unknown name answers {"generationtime_ms": ...} with no "results" key at all.
    results = body.get("results") or []
    return [
        r
        for r in results
        if isinstance(r, dict) and _is_number(r.get("latitude")) and _is_number(r.get("longitude"))
    ]


async def _get(client: httpx.AsyncClient, url: str, params: dict[str, Any]) -> dict[str, Any]:
    """GET ``url`` and return its JSON object; every failure becomes a ``ToolError``."""
    try:
        response = await client.get(url, params=params)
    except httpx.TimeoutException:
        seconds = client.timeout.read or client.timeout.connect or 0
        raise ToolError(f"the weather service timed out after {seconds:g} s") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise ToolError(f"the weather service is unreachable ({_why(exc)})") from None
    if response.is_error:
        raise ToolError(
            f"the weather service answered an error: HTTP {response.status_code}"
            + _reason(response)
        )
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ToolError("the weather service sent an answer that could not be read")
    return body


def _describe(label: str, forecast: dict[str, Any]) -> str:
    """``Seoul, South Korea: 20.1°C, clear sky, humidity 55%, wind 7.2 km/h``."""
    current = forecast.get("current")
    units = forecast.get("current_units") or {}
    if not isinstance(current, dict) or not _is_number(current.get("temperature_2m")):
        raise ToolError("the weather service sent a forecast without current conditions")
    parts = [f"{current['temperature_2m']}{units.get('temperature_2m', '°C')}"]
    code = current.get("weather_code")
    if _is_number(code):
        parts.append(WMO_CODES.get(int(code), f"weather code {int(code)}"))
    humidity = current.get("relative_humidity_2m")
    if _is_number(humidity):
        parts.append(f"humidity {humidity}{units.get('relative_humidity_2m', '%')}")
    wind = current.get("wind_speed_10m")
    if _is_number(wind):
        parts.append(f"wind {wind} {units.get('wind_speed_10m', 'km/h')}")
    return f"{label}: {', '.join(parts)}"


def _label(place: dict[str, Any]) -> str:
    """``Name, Region, Country``, leaving out parts that repeat or are missing."""
    parts: list[str] = []
    for key in ("name", "admin1", "country"):
        value = place.get(key)
        if isinstance(value, str) and value.strip() and value not in parts:
            parts.append(value.strip())
    return ", ".join(parts) or f"{place['latitude']}, {place['longitude']}"


def _reason(response: httpx.Response) -> str:
    # Open-Meteo explains a 4xx in {"error": true, "reason": "..."}.
    try:
        reason = response.json().get("reason")
    except (ValueError, AttributeError):
        return ""
    return f" ({reason})" if isinstance(reason, str) and reason else ""


def _why(exc: Exception) -> str:
    detail = str(exc).strip()
    return detail if detail else type(exc).__name__


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)
