"""The tools the model may call, and the registry a server offers by default."""

from __future__ import annotations

from chatstream.tools.base import Tool, ToolContext, ToolRegistry, tool
from chatstream.tools.calculator import calculate
from chatstream.tools.clock import get_current_time
from chatstream.tools.temperature import convert_temperature
from chatstream.tools.weather import get_weather

__all__ = [
    "Tool",
    "ToolContext",
    "ToolRegistry",
    "calculate",
    "convert_temperature",
    "default_tools",
    "get_current_time",
    "get_weather",
    "tool",
]


def default_tools() -> ToolRegistry:
    """A fresh registry of the four built-in tools."""
    return ToolRegistry([get_weather, convert_temperature, calculate, get_current_time])
