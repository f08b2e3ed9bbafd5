"""The tools the model may call, and the registry a server offers by default."""

from __future__ import annotations

from dataclasses import replace

from chatstream.tools.base import Tool, ToolContext, ToolRegistry, ToolSource, tool
from chatstream.tools.calculator import calculate
from chatstream.tools.clock import get_current_time
from chatstream.tools.temperature import convert_temperature
from chatstream.tools.weather import get_weather

__all__ = [
    "BUILTIN",
    "Tool",
    "ToolContext",
    "ToolRegistry",
    "ToolSource",
    "calculate",
    "convert_temperature",
    "default_tools",
    "get_current_time",
    "get_weather",
    "tool",
]


BUILTIN = tuple(
    replace(t, source="builtin")
    for t in (get_weather, convert_temperature, calculate, get_current_time)
)
"""The four built-in tools, in the order they are offered."""


def default_tools() -> ToolRegistry:
    """A fresh registry of the four built-in tools."""
    return ToolRegistry(BUILTIN)
