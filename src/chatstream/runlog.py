"""Run logs: every event of a run, readable from any seq while it runs and for a while after.

An ``Entry`` is one event with its seq (1, 2, …) and its encoded SSE frame, so the native
stream writes frames as they are while other wire formats encode the event. A ``Log`` holds
one run's entries in this process; a ``Reader`` is a cursor into it plus a wake-up flag,
so a slow reader costs nothing but its cursor: it reads the shared list at its own pace
while the socket's flow control holds it back, and never has a queue that could grow.

``RunLog`` is where logs live: ``create`` one for a run that starts here, ``open`` one to
read a run from a seq, ``finish`` one with its terminal event, which ``expire``s after the
TTL. ``MemoryRunLog`` keeps them in this process (one instance); the Redis one
(``chatstream.cluster``) also shares them with every instance.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from chatstream.events import Done, Error, Event, Token, encode, id_prefix, token_frame
from chatstream.store.base import SessionRef


@dataclass(slots=True)
class Entry:
    """One event of a run: its seq, the event, and the event as an SSE frame.

    Not frozen, on purpose: one is made per token, and a frozen dataclass sets each field
    through ``object.__setattr__`` (0.6 µs against 0.2, about 1 µs of the ~8 a relayed
    token costs; bench notes in docs/performance.md). Nothing changes an entry once made.
    """

    seq: int
    event: Event
    frame: bytes

    @property
    def terminal(self) -> bool:
        return type(self.event) is Done or type(self.event) is Error


def entry(run_id: str, seq: int, event: Event) -> Entry:
    """``event`` as the entry of seq ``seq`` in run ``run_id``'s log."""
    if type(event) is Token:
        return Entry(seq, event, token_frame(id_prefix(run_id), seq, event.content))
    return Entry(seq, event, encode(event, event_id=f"{run_id}:{seq}"))


class Reader:
    """One reader's place in a log, and the flag that wakes it when entries arrive."""

    __slots__ = ("_log", "closed", "counted", "cursor", "wake")

    def __init__(self, log: Log, cursor: int, *, counted: bool) -> None:
        self._log = log
        self.cursor = cursor
        self.counted = counted
        self.closed = False
        self.wake = asyncio.Event()

    @property
    def log(self) -> Log:
        return self._log

    @property
    def seq(self) -> int:
        """The seq of the last entry read."""
        return self._log.offset + self.cursor

    @property
    def delivered(self) -> bool:
        """True once the log has ended and every entry has been read."""
        return self._log.ended and self.cursor >= len(self._log.entries)

    def read(self) -> list[Entry]:
        """The entries not read yet; advances the cursor."""
        entries = self._log.entries
        unread = entries[self.cursor :]
        self.cursor = len(entries)
        return unread

    def rewind(self, count: int) -> None:
        """Step back ``count`` entries, to read them again (a write that must be retried)."""
        self.cursor = max(0, self.cursor - count)

    async def wait(self) -> None:
        """Wait until there is something to read or the log ends."""
        while not self.closed and self.cursor >= len(self._log.entries) and not self.delivered:
            self.wake.clear()
            await self.wake.wait()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._log.forget(self)


class Log:
    """One run's entries in this process and the readers following them.

    A log read from the middle (a reader on another instance resumed at seq N) starts at
    ``offset``: its first entry has seq ``offset + 1``. ``on_idle`` is called when its last
    counted reader leaves (the run's owner starts the resume grace period then).
    """

    __slots__ = (
        "_ended",
        "_id_prefix",
        "_readers",
        "ended",
        "entries",
        "offset",
        "on_idle",
        "run_id",
        "session",
    )

    def __init__(self, run_id: str, session: SessionRef, *, offset: int = 0) -> None:
        self.run_id = run_id
        self.session = session
        self.offset = offset
        self._id_prefix = id_prefix(run_id)
        self.entries: list[Entry] = []
        self.ended = False
        self.on_idle: Callable[[], None] | None = None
        self._readers: set[Reader] = set()
        self._ended = asyncio.Event()

    @property
    def last_seq(self) -> int:
        return self.offset + len(self.entries)

    @property
    def readers(self) -> int:
        """How many counted readers follow the log (internal ones, like a mirror, are not)."""
        return sum(1 for r in self._readers if r.counted)

    def append(self, event: Event) -> Entry:
        """Encode ``event`` as the next entry, add it, and wake every reader."""
        seq = self.offset + len(self.entries) + 1
        if type(event) is Token:  # the hot path: one per token, the id's prefix made once
            new = Entry(seq, event, token_frame(self._id_prefix, seq, event.content))
        else:
            new = entry(self.run_id, seq, event)
        self.add(new)
        return new

    def next_entry(self, event: Event) -> Entry:
        """``event`` as the entry that would be appended next (not appended)."""
        return entry(self.run_id, self.last_seq + 1, event)

    def add(self, new: Entry) -> None:
        """Add an entry made elsewhere (its seq is the next one) and wake every reader."""
        self.entries.append(new)
        for reader in self._readers:
            reader.wake.set()

    def end(self, terminal: Entry) -> None:
        """Add the terminal entry and mark the log ended."""
        self.add(terminal)
        self.mark_ended()

    def mark_ended(self) -> None:
        """Mark the log ended; its terminal entry is already in it."""
        self.ended = True
        self._ended.set()
        for reader in self._readers:
            reader.wake.set()

    async def wait_ended(self) -> None:
        await self._ended.wait()

    def reader(self, after_seq: int = 0, *, counted: bool = True) -> Reader:
        """A reader of the entries after ``after_seq``."""
        cursor = min(max(after_seq - self.offset, 0), len(self.entries))
        reader = Reader(self, cursor, counted=counted)
        self._readers.add(reader)
        return reader

    def forget(self, reader: Reader) -> None:
        self._readers.discard(reader)
        if reader.counted and self.on_idle is not None and not self.readers:
            self.on_idle()


class RunLog(Protocol):
    """Where runs' logs live, so that readers can follow a run from any seq."""

    def create(self, run_id: str, session: SessionRef) -> Log:
        """The log of a run that starts in this process."""
        ...

    async def open(self, run_id: str, after_seq: int, *, owner: str) -> Log | None:
        """The log of a run to read after ``after_seq``.

        None when no such run is known, or it is not ``owner``'s (as if it did not exist).
        """
        ...

    async def finish(self, log: Log, event: Done | Error) -> Entry:
        """Write a run's ending where every reader sees it; the entry that ends the log.

        The entry is not added to ``log`` here: the caller adds it (``log.end``) once the
        session is free, so a reader who sends the next turn at once finds it free.
        """
        ...

    def expire(self, run_id: str) -> None:
        """Forget a run's log: its TTL passed, or the run never started."""
        ...

    async def close(self) -> None:
        """Release connections and timers."""
        ...


class MemoryRunLog:
    """Logs kept in this process; a finished one is dropped ``ttl_s`` after its end."""

    def __init__(self, *, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._logs: dict[str, Log] = {}
        self._expiry: dict[str, asyncio.TimerHandle] = {}

    def create(self, run_id: str, session: SessionRef) -> Log:
        log = Log(run_id, session)
        self._logs[run_id] = log
        return log

    async def open(self, run_id: str, after_seq: int, *, owner: str) -> Log | None:
        log = self._logs.get(run_id)
        return log if log is not None and log.session.owned_by(owner) else None

    async def finish(self, log: Log, event: Done | Error) -> Entry:
        loop = asyncio.get_running_loop()
        self._expiry[log.run_id] = loop.call_later(self.ttl_s, self.expire, log.run_id)
        return log.next_entry(event)

    def expire(self, run_id: str) -> None:
        """Forget a run's log (its TTL passed, or it never started)."""
        handle = self._expiry.pop(run_id, None)
        if handle is not None:
            handle.cancel()
        self._logs.pop(run_id, None)

    async def close(self) -> None:
        for handle in self._expiry.values():
            handle.cancel()
        self._expiry.clear()
        self._logs.clear()
