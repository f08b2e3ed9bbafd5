"""Waiting out a short outage of a shared store: one backoff loop for Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def retry_while_down(
    call: Callable[[], Awaitable[T]],
    *,
    within_s: float,
    what: str,
    errors: tuple[type[BaseException], ...],
    service: str,
    log: logging.Logger,
) -> T:
    """``await call()``, tried again with backoff (50 ms doubling to 1 s) while it raises one
    of ``errors``, for ``within_s``; the last error when the time is up.

    Only for calls that are safe to repeat: an attempt whose answer was lost may have been
    applied. The first failure is logged once, naming ``service``.
    """
    deadline = time.monotonic() + within_s
    delay = 0.05
    warned = False
    while True:
        try:
            return await call()
        except errors as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            if not warned:
                warned = True
                log.warning(
                    "%s: %s is unreachable (%s); trying again for %.1f s", what, service, exc, left
                )
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 1.0)
