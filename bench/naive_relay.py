"""The relay most people write first: FastAPI ``StreamingResponse`` over the openai SDK.

It answers ``GET /api/chat/stream?message=...&sessionId=...`` with the same events as
chatstream (``token`` frames with ``id: <run>:<seq>``, then ``done``), so the load
client reads both the same way. Written the usual way on purpose: ``AsyncOpenAI``
streaming (a pydantic object per chunk), an async generator of f-strings, stdlib
``json``. With ``--store PATH`` it keeps sessions in SQLite the usual way too: load the
history before the turn, insert the two messages after it, on one aiosqlite connection.
One lock keeps those calls apart: concurrent turns sharing the connection otherwise fail
now and then with ``sqlite3.InterfaceError: bad parameter or other API misuse``, and a
baseline that drops streams would measure its bug rather than its cost.

Run: ``.venv/bin/python bench/naive_relay.py --port 8001 [--store /tmp/naive.db]``
(upstream from ``OPENAI_BASE_URL``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import aiosqlite
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

SYSTEM = "You are a helpful assistant."


def create_app(*, model: str, store: str | None) -> FastAPI:
    """The relay; ``store`` is a SQLite path, or None to keep nothing."""
    db: aiosqlite.Connection | None = None
    db_lock = asyncio.Lock()
    client = AsyncOpenAI(
        base_url=os.environ.get("OPENAI_BASE_URL"), api_key=os.environ.get("OPENAI_API_KEY", "x")
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal db
        if store:
            db = await aiosqlite.connect(store)
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute(
                "CREATE TABLE IF NOT EXISTS messages (session_id TEXT, position INTEGER,"
                " role TEXT, content TEXT, PRIMARY KEY (session_id, position))"
            )
            await db.commit()
        yield
        if db is not None:
            await db.close()
        await client.close()

    app = FastAPI(lifespan=lifespan)

    async def load(session_id: str) -> list[dict[str, Any]]:
        if db is None:
            return []
        async with db_lock:
            cursor = await db.execute(
                "SELECT role, content FROM messages WHERE session_id = ? ORDER BY position",
                (session_id,),
            )
            rows = await cursor.fetchall()
        return [{"role": role, "content": content} for role, content in rows]

    async def save(session_id: str, start: int, user: str, answer: str) -> None:
        if db is None:
            return
        async with db_lock:
            await db.executemany(
                "INSERT INTO messages VALUES (?, ?, ?, ?)",
                [
                    (session_id, start, "user", user),
                    (session_id, start + 1, "assistant", answer),
                ],
            )
            await db.commit()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/chat/stream")
    async def chat_stream(
        message: str, sessionId: str | None = None, enableTools: bool = True
    ) -> StreamingResponse:
        session_id = sessionId or uuid.uuid4().hex
        run_id = f"run_{uuid.uuid4().hex[:16]}"
        history = await load(session_id)

        async def events() -> AsyncIterator[str]:
            messages = [
                {"role": "system", "content": SYSTEM},
                *history,
                {"role": "user", "content": message},
            ]
            stream = await client.chat.completions.create(
                model=model,
                messages=cast(list[ChatCompletionMessageParam], messages),
                stream=True,
                stream_options={"include_usage": True},
            )
            seq = 0
            answer: list[str] = []
            usage: dict[str, int] = {}
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = {
                        "promptTokens": chunk.usage.prompt_tokens,
                        "completionTokens": chunk.usage.completion_tokens,
                        "totalTokens": chunk.usage.total_tokens,
                    }
                if chunk.choices and chunk.choices[0].delta.content:
                    text = chunk.choices[0].delta.content
                    answer.append(text)
                    seq += 1
                    data = json.dumps({"content": text})
                    yield f"id: {run_id}:{seq}\nevent: token\ndata: {data}\n\n"
            await save(session_id, len(history), message, "".join(answer))
            done = {
                "message": "complete",
                "sessionId": session_id,
                "historyLength": len(history) + 2,
                "runId": run_id,
                "usage": usage,
            }
            yield f"id: {run_id}:{seq + 1}\nevent: done\ndata: {json.dumps(done)}\n\n"

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Session-Id": session_id},
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model", default="bench")
    parser.add_argument("--store", default=None, help="a SQLite file for sessions")
    args = parser.parse_args()
    app = create_app(model=args.model, store=args.store)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
