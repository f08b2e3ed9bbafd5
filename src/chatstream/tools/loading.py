"""Which tools a server offers: ``builtin`` and ``<module>:<attribute>`` references.

``--tools builtin,myapp.tools:registry`` offers the four built-in tools and the tools
that ``registry`` in module ``myapp.tools`` names: a ``Tool``, a ``ToolRegistry``, or an
iterable of ``Tool``s (made with ``@tool``). The module is imported with the current
directory on ``sys.path``, as ``python -m`` would. A reference that cannot be imported,
names something else, or brings a second tool of a name already taken is refused with a
``ToolLoadError`` that names it: start-up stops there rather than serving half an agent.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable, Sequence

from chatstream.tools import BUILTIN
from chatstream.tools.base import Tool, ToolRegistry

BUILTIN_NAME = "builtin"


class ToolLoadError(ValueError):
    """A ``--tools`` reference that does not give tools; the message names it."""


def load_tools(references: Sequence[str], *, cwd: str | None = None) -> list[Tool]:
    """The tools the references name, in order; ``ToolLoadError`` for a bad one."""
    found: list[Tool] = []
    names: dict[str, str] = {}
    for reference in references:
        reference = reference.strip()
        if not reference:
            continue
        tools = BUILTIN if reference == BUILTIN_NAME else _import(reference, cwd)
        for t in tools:
            if t.name in names:
                raise ToolLoadError(
                    f"--tools {reference}: a tool named {t.name!r} is already offered "
                    f"(by {names[t.name]}); tool names must be unique"
                )
            names[t.name] = reference
            found.append(t)
    return found


def _import(reference: str, cwd: str | None) -> list[Tool]:
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise ToolLoadError(
            f"--tools {reference}: use 'builtin' or '<module>:<attribute>', "
            "as in myapp.tools:registry"
        )
    directory = os.path.abspath(cwd or os.getcwd())
    if directory not in sys.path:
        sys.path.insert(0, directory)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an import runs the module's code: anything can fail there
        raise ToolLoadError(
            f"--tools {reference}: cannot import module {module_name!r} "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    value: object = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise ToolLoadError(
                f"--tools {reference}: module {module_name!r} has no attribute {attribute!r}"
            ) from None
    return _tools_of(value, reference)


def _tools_of(value: object, reference: str) -> list[Tool]:
    if isinstance(value, Tool):
        return [value]
    if isinstance(value, ToolRegistry | Iterable) and not isinstance(value, str | bytes):
        items = list(value)
        strangers = [item for item in items if not isinstance(item, Tool)]
        if not strangers and items:
            return items
        if strangers:
            raise ToolLoadError(
                f"--tools {reference}: holds {type(strangers[0]).__name__} values, not only "
                "tools made with @tool"
            )
        raise ToolLoadError(f"--tools {reference}: holds no tools")
    raise ToolLoadError(
        f"--tools {reference}: is a {type(value).__name__}, not a Tool, a ToolRegistry or "
        "an iterable of tools (make tools with chatstream.tools.tool)"
    )
