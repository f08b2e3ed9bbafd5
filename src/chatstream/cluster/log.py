"""``RedisRunLog``: run logs in this process, mirrored to Redis Streams for every instance.

The owner's readers read its log in memory, as with one instance; a mirror (one more
reader of that log) copies it into the run's stream in batches, one script call per
wake-up, never one round trip per token. A reader on another instance gets a log of its
own, fed from the stream with ``XREAD BLOCK`` from the seq it asked for. When the owner
dies its lock expires: a follower that finds the lock gone for a lock TTL (or taken by
another run) and no ending in the log appends ``error RUN_LOST`` itself, atomically and
only once, so every reader sees the same ending. The one follower whose script appended
it also stores what the run's readers were sent as the turn's interrupted answer
(``salvage.lost_turn``), named by the dead claim's fencing token: the store refuses it if
the owner stored the turn before it died, or a newer turn wrote the session since, so the
turn is stored once. After a restart that lost the stream, the mirror re-sends it from
the first entry Redis lost, so it never has a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from chatstream.cluster.salvage import lost_turn
from chatstream.cluster.scripts import APPEND_LOG, DECLARE_LOST, Keys, read_run
from chatstream.config import Settings
from chatstream.coordinator import Opening, RunState
from chatstream.errors import ErrorCode, StoreError
from chatstream.events import Done, Error, Event, decode_frame, encode_around_seq
from chatstream.runlog import Entry, Log, MemoryRunLog, Reader
from chatstream.store.base import Fenced, SessionRef, SessionStore
from chatstream.store.redis import outlast

log = logging.getLogger("chatstream.cluster")

RUN_LOST = Error(ErrorCode.RUN_LOST, "The server running this turn stopped before it finished.")
# Frames per mirror call: after an outage the backlog goes in pieces, so Redis stays responsive.
BATCH = 1000
# How long a lost turn's storing goes on trying while the store or Redis is unreachable.
SALVAGE_S = 30.0
_TERMINAL = (b"done", b"error")


@dataclass(slots=True)
class _Mirror:
    """What the owner does for its run's log: copy it into Redis."""

    reader: Reader
    task: asyncio.Task[None] | None = None
    closing: bool = False
    # Set when Redis may have lost the stream (a lock taken back): check where it ends even
    # with nothing new to send.
    recheck: bool = False


def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()


class RedisRunLog:
    """Logs of this process's runs mirrored into Redis, and logs of others' runs followed."""

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        *,
        keys: Keys | None = None,
        store: SessionStore | None = None,
    ) -> None:
        self.redis = redis
        # Where a lost run's turn is stored; None: nowhere (its readers still get RUN_LOST).
        self.store = store
        self.keys = keys or Keys()
        self.settings = settings
        self.lock_ttl_s = settings.streams.lock_ttl_s
        self._ended_ttl_ms = int(settings.streams.run_ttl_s * 1000)
        self._outage_s = max(settings.streams.lock_ttl_s, 2.0)
        # This process's runs, as with one instance; finished ones until their TTL.
        self._local = MemoryRunLog(ttl_s=settings.streams.run_ttl_s)
        self._mirrors: dict[str, _Mirror] = {}
        self._followers: set[asyncio.Task[None]] = set()
        self._salvages: set[asyncio.Task[None]] = set()
        self._append_log = redis.register_script(APPEND_LOG)
        self._declare_lost = redis.register_script(DECLARE_LOST)

    # -- the owner's side ---------------------------------------------------------------

    def create(self, run_id: str, session: SessionRef) -> Log:
        run_log = self._local.create(run_id, session)
        mirror = _Mirror(run_log.reader(counted=False))
        mirror.task = asyncio.create_task(self._mirror(mirror), name=f"chatstream-mirror-{run_id}")
        self._mirrors[run_id] = mirror
        return run_log

    def recheck(self, run_id: str) -> None:
        """Redis may have lost the run's stream: make the mirror check where it ends."""
        mirror = self._mirrors.get(run_id)
        if mirror is not None:
            mirror.recheck = True
            mirror.reader.wake.set()

    async def _mirror(self, mirror: _Mirror) -> None:
        reader = mirror.reader
        run_log = reader.log
        key = self.keys.log(run_log.run_id)
        cap = self.settings.streams.run_log_max_events
        while True:
            reader.wake.clear()
            first = reader.seq + 1
            unread = reader.read()
            batch = unread[:BATCH]
            reader.rewind(len(unread) - len(batch))
            if batch or mirror.recheck:
                mirror.recheck = False
                args: list[Any] = [first, cap]
                for entry in batch:
                    args += (entry.event.type, entry.frame)
                try:
                    ends = int(await self._append_log(keys=[key], args=args))
                except (RedisError, OSError) as exc:
                    # Keep the entries: rewind and try again once Redis answers. Entries a
                    # half-applied attempt did write are skipped by the script.
                    reader.rewind(len(batch))
                    mirror.recheck = True
                    log.warning("run %s: mirroring to Redis failed (%s)", run_log.run_id, exc)
                    await asyncio.sleep(0.5)
                    continue
                if ends < 0:
                    log.warning("run %s: its log in Redis says it was lost", run_log.run_id)
                    return
                if ends < first - 1:
                    # Redis lost entries (a restart): re-send the log from the first one.
                    log.warning(
                        "run %s: Redis lost its log after seq %d; re-sending", run_log.run_id, ends
                    )
                    reader.rewind(reader.seq - ends)
                continue
            if mirror.closing:
                return
            await reader.wake.wait()

    async def finish(self, log_of_run: Log, event: Done | Error) -> Entry:
        run_id = log_of_run.run_id
        await self._local.finish(log_of_run, event)
        mirror = self._mirrors.pop(run_id, None)
        if mirror is not None and mirror.task is not None:
            mirror.closing = True
            mirror.recheck = True  # a restart since the last renewal may have emptied it
            mirror.reader.wake.set()  # the mirror writes what is left, then returns
            try:
                await asyncio.wait_for(mirror.task, timeout=5)
            except TimeoutError:
                log.warning("run %s: Redis did not take the whole log in time", run_id)
            mirror.reader.close()
        ending = log_of_run.next_entry(event)
        key = self.keys.log(run_id)

        async def write_end() -> int:
            # Safe to repeat: the entry's id is fixed.
            args = [ending.seq, self.settings.streams.run_log_max_events, event.type, ending.frame]
            return int(await self._append_log(keys=[key], args=args))

        what = f"run {run_id}: writing its end"
        try:
            ends = await outlast(write_end, within_s=self._outage_s, what=what)
        except (RedisError, OSError) as exc:
            log.warning("%s in Redis failed (%s)", what, exc)
            return ending
        if ends == -1:
            # A follower declared the run lost: that is its ending, for readers here too.
            with contextlib.suppress(RedisError, OSError, ValueError, IndexError):
                last = cast(
                    "list[tuple[bytes, dict[bytes, bytes]]]",
                    await self.redis.xrevrange(key, count=1),
                )
                entry_id, fields = last[0]
                seq = int(entry_id.split(b"-")[0])
                if seq == ending.seq:
                    frame = fields[b"f"]
                    return Entry(seq, decode_frame(frame), frame)
            return log_of_run.next_entry(RUN_LOST)
        if ends != ending.seq:
            log.warning("run %s: its log in Redis ends otherwise (at %d)", run_id, ends)
        return ending

    def expire(self, run_id: str) -> None:
        mirror = self._mirrors.pop(run_id, None)
        if mirror is not None and mirror.task is not None:
            mirror.task.cancel()
        self._local.expire(run_id)

    # -- everyone else's side -----------------------------------------------------------

    async def open(self, run_id: str, after_seq: int, *, owner: str) -> Log | None:
        local = await self._local.open(run_id, after_seq, owner=owner)
        if local is not None:
            return local
        record = await read_run(self.redis, self.keys, run_id)
        if record is None or not record.session.owned_by(owner):
            return None
        if record.state is not RunState.RUNNING and after_seq >= record.last_seq:
            return None  # read to its end already
        followed = Log(run_id, record.session, offset=after_seq)
        task = asyncio.create_task(
            self._follow(followed, record.session.key), name=f"chatstream-follow-{run_id}"
        )
        self._followers.add(task)
        task.add_done_callback(self._followers.discard)
        # Nobody reads it any more (its reader left): stop following.
        followed.on_idle = lambda: _stop(task)
        return followed

    async def _follow(self, followed: Log, session_key: str) -> None:
        key = self.keys.log(followed.run_id)
        block_ms = max(100, min(1000, int(self.lock_ttl_s * 250)))
        lock_gone_since: float | None = None
        while True:
            try:
                replies = cast(
                    "list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]",
                    await self.redis.xread(
                        {key: f"{followed.last_seq}-0"}, count=500, block=block_ms
                    ),
                )
                if not replies:
                    lock_gone_since = await self._check_owner(
                        followed, session_key, lock_gone_since
                    )
                    continue
                for _, entries in replies:
                    for entry_id, fields in entries:
                        frame = bytes(fields[b"f"])
                        seq = int(entry_id.split(b"-")[0])
                        followed.add(Entry(seq, decode_frame(frame), frame))
                        if fields[b"t"] in _TERMINAL:
                            followed.mark_ended()
                            return
            except (RedisError, OSError) as exc:
                log.warning("run %s: following it in Redis failed (%s)", followed.run_id, exc)
                await asyncio.sleep(0.5)

    async def _check_owner(
        self, followed: Log, session_key: str, gone_since: float | None
    ) -> float | None:
        """When the owner's lock is lost and the log has no ending, the run is lost.

        A lock held by another run is lost. One that is just gone is lost once it stays gone
        for a lock TTL: its owner takes it back after Redis restarted or stalled. Returns
        since when the lock has been gone, for the next check.
        """
        holder = await self.redis.get(self.keys.lock(session_key))
        if holder is not None and cast(bytes, holder).decode() == followed.run_id:
            return None
        if holder is None:
            now = time.monotonic()
            if gone_since is None or now - gone_since < self.lock_ttl_s:
                return now if gone_since is None else gone_since
        before, after = encode_around_seq(RUN_LOST, followed.run_id)
        declared = cast(
            "list[Any]",
            await self._declare_lost(
                keys=[self.keys.log(followed.run_id), self.keys.record(followed.run_id)],
                args=[followed.last_seq, before, after, self._ended_ttl_ms],
            ),
        )
        if int(declared[0]):
            log.warning("run %s was lost with its instance; told its readers", followed.run_id)
            seq, fence, opening = int(declared[0]), bytes(declared[1]), bytes(declared[2])
            task = asyncio.create_task(
                self._salvage(followed, seq, fence, opening),
                name=f"chatstream-salvage-{followed.run_id}",
            )
            self._salvages.add(task)
            task.add_done_callback(self._salvages.discard)
            # This follower's readers get the ending once the session holds the turn (if
            # the store answers soon): a client that reloads the session then finds it.
            await asyncio.wait({task}, timeout=2.0)
        return gone_since

    async def _salvage(self, followed: Log, ending: int, fence: bytes, opening: bytes) -> None:
        """Store what a lost run's readers were sent (its log before ``ending``) as its turn."""
        run_id = followed.run_id
        if self.store is None:
            return
        if not opening:
            log.warning("run %s: Redis kept no opening of its turn; it is not stored", run_id)
            return
        begun = Opening.from_dict(json.loads(opening))
        token = int(fence) if fence else None
        deadline = time.monotonic() + SALVAGE_S
        delay = 0.1
        while True:
            try:
                events = await self._events_before(run_id, ending)
                await self.store.append(
                    followed.session,
                    lost_turn(begun, events),
                    fence=token,
                    replace_from=begun.replace_from,
                )
            except Fenced:
                log.info(
                    "run %s: not stored for it: its owner stored it, or a newer turn wrote "
                    "its session",
                    run_id,
                )
                return
            except (StoreError, RedisError, OSError) as exc:
                if time.monotonic() + delay > deadline:
                    log.warning("run %s: storing its lost turn failed (%s)", run_id, exc)
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            log.warning("run %s: stored what its readers saw as an interrupted answer", run_id)
            return

    async def _events_before(self, run_id: str, ending: int) -> list[Event]:
        """The events of a run's shared log, in order, up to (not with) seq ``ending``."""
        key = self.keys.log(run_id)
        events: list[Event] = []
        start = "-"
        while True:
            entries = cast(
                "list[tuple[bytes, dict[bytes, bytes]]]",
                await self.redis.xrange(key, start, f"{ending - 1}-0", count=BATCH),
            )
            events += (decode_frame(bytes(fields[b"f"])) for _, fields in entries)
            if len(entries) < BATCH:
                return events
            start = "(" + entries[-1][0].decode()

    async def close(self) -> None:
        if self._salvages:
            # A lost turn being stored is given a moment to get there.
            await asyncio.wait(list(self._salvages), timeout=5)
        tasks = [*self._salvages]
        tasks += [m.task for m in self._mirrors.values() if m.task is not None]
        tasks += list(self._followers)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._mirrors.clear()
        await self._local.close()
