"""``convert_temperature``: Celsius, Fahrenheit and Kelvin, in exact arithmetic.

The value is taken as the decimal it is written as and converted with fractions, so
``-459.67 F`` is exactly absolute zero rather than a hair below it; the result is rounded
to two decimals at the end only.
"""

from __future__ import annotations

import math
from fractions import Fraction

from chatstream.errors import ToolError
from chatstream.tools.base import ToolContext, tool

__all__ = ["convert", "convert_temperature", "parse_unit"]

_ALIASES = {
    "C": ("c", "celsius", "centigrade", "degc", "℃", "섭씨"),
    "F": ("f", "fahrenheit", "degf", "℉", "화씨"),
    "K": ("k", "kelvin", "kelvins", "켈빈"),
}
_UNITS = {alias: unit for unit, aliases in _ALIASES.items() for alias in aliases}
_SYMBOLS = {"C": "°C", "F": "°F", "K": " K"}
_ZERO_CELSIUS = Fraction("273.15")  # in kelvin
_NINE_FIFTHS = Fraction(9, 5)


@tool
async def convert_temperature(ctx: ToolContext, value: float, from_unit: str, to_unit: str) -> str:
    """Convert a temperature between Celsius (C), Fahrenheit (F) and Kelvin (K).

    Args:
        value: The temperature to convert, e.g. 20.
        from_unit: The unit of value: "C", "F" or "K" (names like "celsius" work too).
        to_unit: The unit to convert to: "C", "F" or "K".
    """
    source, target = parse_unit(from_unit), parse_unit(to_unit)
    ctx.progress(f"Converting {_number(value)}{_SYMBOLS[source]} to {target}")
    result = convert(value, source, target)
    return f"{_number(value)}{_SYMBOLS[source]} = {_number(result)}{_SYMBOLS[target]}"


def parse_unit(text: str) -> str:
    """``"C"``, ``"F"`` or ``"K"`` for a unit written any common way; ``ToolError`` otherwise."""
    key = " ".join(text.casefold().split())
    for prefix in ("degrees ", "degree ", "deg "):
        key = key.removeprefix(prefix)
    unit = _UNITS.get(key.lstrip("°º") or key)
    if unit is None:
        raise ToolError(f"unknown temperature unit {text!r}; use C, F or K")
    return unit


def convert(value: float, source: str, target: str) -> float:
    """``value`` in unit ``source`` expressed in unit ``target`` (each one of C, F, K)."""
    if not math.isfinite(value):
        raise ToolError(f"{value} is not a temperature")
    # repr() gives the shortest decimal that reads back as this float: the number as written.
    exact = Fraction(repr(value))
    kelvin = _to_kelvin(exact, source)
    if kelvin < 0:
        floor = _number(float(_from_kelvin(Fraction(0), source)))
        raise ToolError(
            f"{_number(value)}{_SYMBOLS[source]} is below absolute zero ({floor}{_SYMBOLS[source]})"
        )
    try:
        return float(_from_kelvin(kelvin, target))
    except OverflowError:
        raise ToolError(f"{_number(value)}{_SYMBOLS[source]} is too large to convert") from None


def _to_kelvin(value: Fraction, unit: str) -> Fraction:
    if unit == "C":
        return value + _ZERO_CELSIUS
    if unit == "F":
        return (value - 32) / _NINE_FIFTHS + _ZERO_CELSIUS
    return value


def _from_kelvin(kelvin: Fraction, unit: str) -> Fraction:
    if unit == "C":
        return kelvin - _ZERO_CELSIUS
    if unit == "F":
        return (kelvin - _ZERO_CELSIUS) * _NINE_FIFTHS + 32
    return kelvin


def _number(value: float) -> str:
    """At most two decimals, trailing zeros dropped: 68.0 -> "68", 36.666 -> "36.67"."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text
