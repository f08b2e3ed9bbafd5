"""chatstream: stream an LLM agent's answer and tool work over Server-Sent Events.

``chatstream.create_app(settings=None, *, tools=None, system_prompt=None, model=None,
deps=None)`` builds the ASGI app (imported on first use, so that ``chatstream.client``
does not pull in the server); ``chatstream.tools.tool`` makes your own tools.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "create_app"]

if TYPE_CHECKING:
    from chatstream.server.app import create_app


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from chatstream.server.app import create_app

        return create_app
    raise AttributeError(f"module 'chatstream' has no attribute {name!r}")
