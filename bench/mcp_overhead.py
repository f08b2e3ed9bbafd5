"""What an MCP call costs through chatstream, over calling the server with the SDK directly.

Both sides run in this process against the same server program
(``tests/support/mcp_server.py``, its trivial ``add`` tool): through chatstream, the
``Tool`` that ``McpServers`` offers is called as the agent calls it (``tool(ctx, args)``,
progress wired to a ``ToolContext``, the result turned into text); directly, the SDK's
``Client.call_tool`` on a connection of its own. Over stdio each side has its own server
process; over Streamable HTTP both talk to one server on loopback. The two sides take
turns in rounds of ``--batch`` calls so that drift (CPU frequency, a neighbour's load)
falls on both alike.

It prints, per transport, the median and mean milliseconds per call of each side and
the difference: chatstream's own cost per MCP call.

Run: ``.venv/bin/python bench/mcp_overhead.py`` (about 20 s; ``--calls 200`` for less).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # ``python bench/mcp_overhead.py`` as well as ``-m``

from bench.run import free_port  # noqa: E402
from mcp.client import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402
from tests.support.process import serving  # noqa: E402

from chatstream.tools.base import ToolContext  # noqa: E402
from chatstream.tools.mcp import McpServers  # noqa: E402

SERVER = ROOT / "tests" / "support" / "mcp_server.py"
ARGS = {"a": 20, "b": 22}

Call = Callable[[], Awaitable[str]]


@contextmanager
def http_server() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(SERVER), "--http", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with serving(process, port):
        yield f"http://127.0.0.1:{port}/mcp"


async def measure(call: Call, count: int) -> list[float]:
    """Seconds per call, one figure a call."""
    took = []
    for _ in range(count):
        begun = time.perf_counter()
        result = await call()
        took.append(time.perf_counter() - begun)
        assert result == "42", result
    return took


async def compare(label: str, config: dict[str, object], calls: int, batch: int) -> None:
    async with AsyncExitStack() as stack:
        servers = McpServers.from_config({"mcpServers": {"bench": config}})
        stack.push_async_callback(servers.close)
        await servers.start()
        tool = next(t for t in servers.tools() if t.name == "bench__add")
        ctx: ToolContext[None] = ToolContext(lambda message, fraction: None)

        if "url" in config:
            target: str | StdioServerParameters = str(config["url"])
        else:
            target = StdioServerParameters(command=sys.executable, args=[str(SERVER)])
        client = await stack.enter_async_context(Client(target, cache=None))

        async def through_chatstream() -> str:
            return await tool(ctx, ARGS)

        async def direct() -> str:
            result = await client.call_tool("add", ARGS)
            return "".join(getattr(block, "text", "") for block in result.content)

        await measure(through_chatstream, 50)  # warm up both
        await measure(direct, 50)
        ours: list[float] = []
        theirs: list[float] = []
        while len(ours) < calls:
            ours += await measure(through_chatstream, batch)
            theirs += await measure(direct, batch)

    ours_ms = [t * 1000 for t in ours]
    theirs_ms = [t * 1000 for t in theirs]
    median_ours, median_theirs = statistics.median(ours_ms), statistics.median(theirs_ms)
    mean_ours, mean_theirs = statistics.fmean(ours_ms), statistics.fmean(theirs_ms)
    print(
        f"| {label} | {len(ours)} | {median_theirs:.3f} | {median_ours:.3f} | "
        f"{median_ours - median_theirs:+.3f} | {mean_theirs:.3f} | {mean_ours:.3f} | "
        f"{mean_ours - mean_theirs:+.3f} |",
        flush=True,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls per side (default 1000)")
    parser.add_argument("--batch", type=int, default=50, help="calls per turn (default 50)")
    parser.add_argument("--transport", choices=("stdio", "http", "both"), default="both")
    options = parser.parse_args()
    print(
        "| transport | calls | SDK direct median ms | chatstream median ms | "
        "difference ms | SDK direct mean ms | chatstream mean ms | difference ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    if options.transport in ("stdio", "both"):
        config: dict[str, object] = {"command": sys.executable, "args": [str(SERVER)]}
        await compare("stdio", config, options.calls, options.batch)
    if options.transport in ("http", "both"):
        with http_server() as url:
            await compare("Streamable HTTP", {"url": url}, options.calls, options.batch)


if __name__ == "__main__":
    asyncio.run(main())
