"""A fake Open-Meteo (geocoding + forecast) that answers with the real response shapes.

It is a real HTTP/1.1 server on 127.0.0.1 (``LoopbackServer``, a thread of its own), so it
serves async tests, sync tests and a separately started chatstream process alike::

    with run_fake_open_meteo() as fake:             # delay_s=..., fail_status=503
        settings = Settings().with_(weather_geocoding_url=fake.geocoding_url,
                            weather_forecast_url=fake.forecast_url)
        ...
        fake.calls                                  # [("/v1/search", {"name": "Seoul", ...}), ...]

It knows Seoul, Busan, Tokyo, New York, London and Paris (by English or Korean name, in
any case) with fixed current conditions; any other name finds nothing, answered as the
real API does: ``{"generationtime_ms": ...}`` with no ``results`` key. Names are always
answered in English, whatever ``language`` asks. ``delay_s`` holds every response;
``fail_status`` answers every request with that status and Open-Meteo's error body
(``{"error": true, "reason": ...}``); both may be changed while it runs. Run
``python -m tests.fakes.open_meteo --port 8002`` for a standalone server.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlsplit
from zoneinfo import ZoneInfo

from tests.fakes.openai_upstream import LoopbackServer, _Exchange

__all__ = ["PLACES", "FakeOpenMeteo", "Place", "run_fake_open_meteo"]

Place = dict[str, Any]

# Geocoding entries as the real API returns them for language=en (GeoNames data), with
# the current conditions the fake forecast reports there and the grid point it snaps to.
PLACES: list[tuple[tuple[str, ...], Place, dict[str, Any]]] = [
    (
        ("seoul", "서울", "서울특별시"),
        {
            "id": 1835848,
            "name": "Seoul",
            "latitude": 37.566,
            "longitude": 126.9784,
            "elevation": 38.0,
            "feature_code": "PPLC",
            "country_code": "KR",
            "admin1_id": 1835847,
            "timezone": "Asia/Seoul",
            "population": 10349312,
            "country_id": 1835841,
            "country": "South Korea",
            "admin1": "Seoul",
        },
        {"grid": (37.55, 127.0), "abbreviation": "KST", "conditions": (20.1, 55, 0, 7.2)},
    ),
    (
        ("busan", "부산", "부산광역시"),
        {
            "id": 1838524,
            "name": "Busan",
            "latitude": 35.10168,
            "longitude": 129.03004,
            "elevation": 12.0,
            "feature_code": "PPLA",
            "country_code": "KR",
            "admin1_id": 1838519,
            "timezone": "Asia/Seoul",
            "population": 3678555,
            "country_id": 1835841,
            "country": "South Korea",
            "admin1": "Busan",
        },
        {"grid": (35.125, 129.0), "abbreviation": "KST", "conditions": (22.4, 65, 1, 14.0)},
    ),
    (
        ("tokyo", "도쿄", "東京"),
        {
            "id": 1850147,
            "name": "Tokyo",
            "latitude": 35.6895,
            "longitude": 139.69171,
            "elevation": 44.0,
            "feature_code": "PPLC",
            "country_code": "JP",
            "admin1_id": 1850144,
            "timezone": "Asia/Tokyo",
            "population": 8336599,
            "country_id": 1861060,
            "country": "Japan",
            "admin1": "Tokyo",
        },
        {"grid": (35.7, 139.6875), "abbreviation": "JST", "conditions": (24.3, 70, 3, 11.5)},
    ),
    (
        ("new york", "뉴욕", "new york city"),
        {
            "id": 5128581,
            "name": "New York",
            "latitude": 40.71427,
            "longitude": -74.00597,
            "elevation": 10.0,
            "feature_code": "PPL",
            "country_code": "US",
            "admin1_id": 5128638,
            "timezone": "America/New_York",
            "population": 8175133,
            "country_id": 6252001,
            "country": "United States",
            "admin1": "New York",
        },
        {"grid": (40.710335, -73.99307), "abbreviation": "EDT", "conditions": (15.8, 62, 61, 18.4)},
    ),
    (
        ("london", "런던"),
        {
            "id": 2643743,
            "name": "London",
            "latitude": 51.50853,
            "longitude": -0.12574,
            "elevation": 25.0,
            "feature_code": "PPLC",
            "country_code": "GB",
            "admin1_id": 6269131,
            "admin2_id": 2648110,
            "timezone": "Europe/London",
            "population": 8961989,
            "country_id": 2635167,
            "country": "United Kingdom",
            "admin1": "England",
            "admin2": "Greater London",
        },
        {"grid": (51.5, -0.120000124), "abbreviation": "BST", "conditions": (11.2, 81, 45, 9.7)},
    ),
    (
        ("paris", "파리"),
        {
            "id": 2988507,
            "name": "Paris",
            "latitude": 48.85341,
            "longitude": 2.3488,
            "elevation": 42.0,
            "feature_code": "PPLC",
            "country_code": "FR",
            "admin1_id": 3012874,
            "admin2_id": 2968815,
            "timezone": "Europe/Paris",
            "population": 2138551,
            "country_id": 3017382,
            "country": "France",
            "admin1": "Île-de-France",
            "admin2": "Paris",
        },
        {"grid": (48.86, 2.36), "abbreviation": "CEST", "conditions": (17.5, 60, 2, 6.1)},
    ),
]

_UNITS = {
    "time": "iso8601",
    "interval": "seconds",
    "temperature_2m": "°C",
    "relative_humidity_2m": "%",
    "weather_code": "wmo code",
    "wind_speed_10m": "km/h",
}
_VARIABLES = ("temperature_2m", "relative_humidity_2m", "weather_code", "wind_speed_10m")
_REASONS = {
    429: "Daily API request limit exceeded. Please try again tomorrow.",
    500: "Internal server error",
    502: "Bad gateway",
    503: "Service temporarily unavailable",
}


class FakeOpenMeteo(LoopbackServer):
    """Open-Meteo's ``/v1/search`` and ``/v1/forecast`` on loopback, with fixed data."""

    def __init__(self, *, port: int = 0, delay_s: float = 0.0, fail_status: int | None = None):
        super().__init__(port=port)
        self.delay_s = delay_s
        self.fail_status = fail_status

    @property
    def geocoding_url(self) -> str:
        """The URL for ``CHATSTREAM_WEATHER_GEOCODING_URL``."""
        return f"{self.base}/v1/search"

    @property
    def forecast_url(self) -> str:
        """The URL for ``CHATSTREAM_WEATHER_FORECAST_URL``."""
        return f"{self.base}/v1/forecast"

    @property
    def calls(self) -> list[tuple[str, dict[str, str]]]:
        """Each request received, as its path and its query parameters."""
        return [_split(r.path) for r in self.requests]

    async def handle(self, exchange: _Exchange) -> None:
        path, params = _split(exchange.record.path)
        await exchange.sleep(self.delay_s)
        started = time.perf_counter()
        if self.fail_status is not None:
            reason = _REASONS.get(self.fail_status, "Simulated failure")
            await exchange.json(self.fail_status, {"error": True, "reason": reason})
        elif exchange.record.method != "GET":
            await exchange.json(405, {"error": True, "reason": "Method not allowed"})
        elif path == "/v1/search":
            status, body = _search(params, started)
            await exchange.json(status, body)
        elif path == "/v1/forecast":
            status, body = _forecast(params, started)
            await exchange.json(status, body)
        else:
            await exchange.json(404, {"error": True, "reason": "Not Found"})


@contextmanager
def run_fake_open_meteo(
    *, delay_s: float = 0.0, fail_status: int | None = None
) -> Iterator[FakeOpenMeteo]:
    """Serve a ``FakeOpenMeteo`` on a free loopback port for the ``with`` block."""
    with FakeOpenMeteo(delay_s=delay_s, fail_status=fail_status) as fake:
        yield fake
        if fake.errors:
            raise AssertionError(f"the fake Open-Meteo failed: {fake.errors!r}")


def _split(target: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(target)
    return parts.path, dict(parse_qsl(parts.query, keep_blank_values=True))


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 4)


def _search(params: dict[str, str], started: float) -> tuple[int, dict[str, Any]]:
    name = " ".join(params.get("name", "").casefold().split())
    try:
        count = max(1, min(100, int(params.get("count") or 10)))
    except ValueError:
        return 400, {"error": True, "reason": "Parameter count must be an integer"}
    # As the real API: fewer than two characters find nothing.
    found = [place for keys, place, _ in PLACES if len(name) >= 2 and name in keys][:count]
    body: dict[str, Any] = {"generationtime_ms": _elapsed_ms(started)}
    if found:
        body = {"results": [dict(place) for place in found], **body}
    return 200, body


def _forecast(params: dict[str, str], started: float) -> tuple[int, dict[str, Any]]:
    try:
        latitude, longitude = float(params["latitude"]), float(params["longitude"])
    except (KeyError, ValueError):
        reason = "Parameter 'latitude' and 'longitude' must have the same number of elements"
        return 400, {"error": True, "reason": reason}
    if not (-90 <= latitude <= 90 and -180 <= longitude <= 180):
        reason = f"Latitude must be in range of -90 to 90°. Given: {latitude}."
        return 400, {"error": True, "reason": reason}
    wanted = [v for v in params.get("current", "").split(",") if v]
    unknown = [v for v in wanted if v not in _VARIABLES]
    if unknown:
        reason = f"Cannot initialize WeatherVariable from invalid String value {unknown[0]}"
        return 400, {"error": True, "reason": reason}
    place, extra = _nearest(latitude, longitude)
    zone_name = place["timezone"] if place and params.get("timezone") == "auto" else "GMT"
    zone = ZoneInfo(zone_name)
    now = datetime.now(UTC).astimezone(zone)
    now -= timedelta(minutes=now.minute % 15, seconds=now.second, microseconds=now.microsecond)
    offset = now.utcoffset() or timedelta(0)
    grid = extra["grid"] if extra else (round(latitude, 2), round(longitude, 2))
    values = extra["conditions"] if extra else (10.0, 50, 0, 5.0)
    conditions = dict(zip(_VARIABLES, values, strict=True))
    body: dict[str, Any] = {
        "latitude": grid[0],
        "longitude": grid[1],
        "generationtime_ms": _elapsed_ms(started),
        "utc_offset_seconds": int(offset.total_seconds()),
        "timezone": zone_name,
        "timezone_abbreviation": now.tzname() if zone_name != "GMT" else "GMT",
        "elevation": place["elevation"] if place else 0.0,
    }
    if wanted:
        body["current_units"] = {k: _UNITS[k] for k in ("time", "interval", *wanted)}
        body["current"] = {
            "time": now.strftime("%Y-%m-%dT%H:%M"),
            "interval": 900,
            **{k: conditions[k] for k in wanted},
        }
    return 200, body


def _nearest(latitude: float, longitude: float) -> tuple[Place | None, dict[str, Any] | None]:
    """The known place within about 0.1° of the point, if any."""
    for _, place, extra in PLACES:
        if abs(place["latitude"] - latitude) < 0.1 and abs(place["longitude"] - longitude) < 0.1:
            return place, extra
    return None, None


def main() -> None:
    """Serve the fake until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--fail-status", type=int, default=None)
    args = parser.parse_args()
    with FakeOpenMeteo(port=args.port, delay_s=args.delay, fail_status=args.fail_status) as fake:
        print(f"geocoding: {fake.geocoding_url}\nforecast:  {fake.forecast_url}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
