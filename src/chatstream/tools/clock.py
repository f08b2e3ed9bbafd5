"""``get_current_time``: the time now in an IANA time zone, from the system's tz database.

Besides exact IANA names it accepts the same names in any case (``asia/seoul``) and a
zone's city alone (``Seoul``, ``New York``) when that city names exactly one zone.
"""

from __future__ import annotations

import functools
import zoneinfo
from datetime import UTC, datetime, timedelta, tzinfo

from chatstream.errors import ToolError
from chatstream.tools.base import ToolContext, tool

__all__ = ["get_current_time", "resolve_zone"]

# Zone names under these areas are the ones people mean; "US/Pacific" and the like are
# legacy links that would make city lookups ambiguous.
_AREAS = (
    "Africa/",
    "America/",
    "Antarctica/",
    "Asia/",
    "Atlantic/",
    "Australia/",
    "Europe/",
    "Indian/",
    "Pacific/",
)


@tool
async def get_current_time(ctx: ToolContext, timezone: str = "UTC") -> str:
    """Get the current date, time and weekday in a time zone.

    Args:
        timezone: An IANA time zone name such as "Asia/Seoul", "Europe/London" or "UTC".
    """
    name, zone = resolve_zone(timezone)
    ctx.progress(f"Reading the clock for {name}")
    return describe(_now(zone), name)


def resolve_zone(text: str) -> tuple[str, tzinfo]:
    """The canonical name and zone for ``text``; ``ToolError`` naming it when there is none."""
    key = text.strip()
    name = _names().get(key.casefold().replace(" ", "_"), key)
    try:
        return name, zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        # ValueError: a key that is not a relative path ("../x", "/etc/localtime", "").
        raise ToolError(
            f"unknown time zone {text!r}; use an IANA name such as 'Asia/Seoul' or 'UTC'"
        ) from None


def describe(now: datetime, name: str) -> str:
    """``2026-11-24 17:05:12 KST (Asia/Seoul, UTC+09:00), Tuesday``."""
    offset = now.utcoffset() or timedelta(0)
    sign = "-" if offset < timedelta(0) else "+"
    minutes = abs(offset) // timedelta(minutes=1)
    return (
        f"{now:%Y-%m-%d %H:%M:%S} {now.tzname()} "
        f"({name}, UTC{sign}{minutes // 60:02d}:{minutes % 60:02d}), {now:%A}"
    )


def _now(zone: tzinfo) -> datetime:
    # The one place that reads the clock, so tests can stop it.
    return datetime.now(UTC).astimezone(zone)


@functools.cache
def _names() -> dict[str, str]:
    """Lower-cased zone names, and cities that name one zone, to their canonical names."""
    zones = zoneinfo.available_timezones()
    names = {zone.casefold(): zone for zone in zones}
    cities: dict[str, list[str]] = {}
    for zone in zones:
        if zone.startswith(_AREAS):
            cities.setdefault(zone.rsplit("/", 1)[-1].casefold(), []).append(zone)
    for city, matches in cities.items():
        if len(matches) == 1:
            names.setdefault(city, matches[0])
    return names
