"""Tools for the approval tests: two that act on the world (so they need a person's yes)
and one that only reads. Each call is appended to the file ``$APPROVAL_TOOLS_LOG`` names,
so a test can tell whether a tool ran, in its own process or in a server's."""

from __future__ import annotations

import json
import os

from chatstream.tools import ToolContext, tool


def _record(name: str, **args: object) -> None:
    path = os.environ.get("APPROVAL_TOOLS_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write(json.dumps({"tool": name, **args}) + "\n")


def ran(path: str | os.PathLike[str]) -> list[dict[str, object]]:
    """The calls recorded in ``path`` so far (the ``ran_log`` fixture's file)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as log:
        return [json.loads(line) for line in log if line.strip()]


@tool(approval=True)
async def send_email(ctx: ToolContext, to: str, subject: str) -> str:
    """Send an email.

    Args:
        to: The address.
        subject: The subject line.
    """
    ctx.progress("sending", 0.5)
    _record("send_email", to=to, subject=subject)
    return f"Sent {subject!r} to {to}."


@tool(approval=True)
async def delete_file(ctx: ToolContext, path: str) -> str:
    """Delete a file.

    Args:
        path: Which file.
    """
    _record("delete_file", path=path)
    return f"Deleted {path}."


@tool
async def look_up(ctx: ToolContext, key: str) -> str:
    """Read a value (needs no approval).

    Args:
        key: What to read.
    """
    _record("look_up", key=key)
    return f"{key} = 42"


tools = [send_email, delete_file, look_up]
