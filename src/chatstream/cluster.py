"""Runs shared across server instances through Redis.

With a ``redis://`` store, every instance can resume, follow and cancel a run
that another instance executes, and a session is busy everywhere while one of
them runs a turn in it. Keys (``<p>`` is the prefix, ``chatstream``):

* ``<p>:lock:<sessionId>``  the session's busy lock: the running run's id; set
  if absent, with an expiry the owner renews while the run lives. A crashed
  owner's lock expires by itself.
* ``<p>:run:<runId>``       hash: session, owner instance, state; last seq once it ended
  (while it runs, its log's last entry says where it is).
* ``<p>:run:<runId>:log``   a Redis Stream of the run's encoded frames, entry id
  ``<seq>-0``, capped with MAXLEN and expiring with the run's TTL.
* ``<p>:cancel``            pub/sub channel: run ids to stop, heard by their owner.

The owner mirrors its run's log into the stream in batches (one script call per
wake-up, never one round trip per token); readers on other instances follow
it with ``XREAD BLOCK``. When the owner dies, its lock expires: a follower
that finds the lock gone for a lock TTL (or taken by another run) and no
terminal event appends ``error RUN_LOST`` itself, atomically and only once, so
every reader sees the same ending.

Redis may stall or restart (losing every key) under a live owner. The lock
then must not silently vanish: when renewing finds it gone, the owner takes it
back if nobody else did, with the run's record, and the mirror re-sends the
log from the first entry Redis lost, so the stream never has a gap. When
another run holds the lock by then, or a follower already declared the run
lost, the owner stops its run with ``RUN_LOST``: it must not write over the
newer turn. Renewing retries while Redis is unreachable, and the owner's last
writes outlast a short outage (see ``store.redis.outlast``). This does not
fence a write already under way when the lock is lost; fencing tokens come with
the PostgreSQL store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from chatstream.config import Settings
from chatstream.errors import ErrorCode
from chatstream.runs import TERMINAL_FRAMES, Run, RunState, StopReason, frame_event
from chatstream.store.redis import RECONNECT_ONCE, outlast, unavailable

log = logging.getLogger("chatstream.cluster")

# Where a run's log ends: the seq of its last entry (0 when it has none) and whether that
# entry is the run's ending. The scripts below start with it.
_LOG_END = """
local function log_end(key)
  local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  if not last[1] then return 0, false end
  local seq = tonumber(string.match(last[1][1], '^(%d+)'))
  local fields = last[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 't' and (fields[i + 1] == 'done' or fields[i + 1] == 'error') then
      return seq, true
    end
  end
  return seq, false
end
"""

# Append ``error RUN_LOST`` after the last frame, unless the log already ended.
# KEYS[1] the log, KEYS[2] the record; ARGV[1] run id, ARGV[2] the seq the caller has seen,
# ARGV[3] data JSON, ARGV[4] how long the ended run stays readable (ms).
_DECLARE_LOST = (
    _LOG_END
    + """
local seq, ended = log_end(KEYS[1])
if ended then return 0 end
-- A log that Redis lost ends before what the caller has seen.
seq = math.max(seq, tonumber(ARGV[2])) + 1
local frame = 'id: ' .. ARGV[1] .. ':' .. seq .. '\\nevent: error\\ndata: ' .. ARGV[3] .. '\\n\\n'
redis.call('XADD', KEYS[1], seq .. '-0', 't', 'error', 'f', frame)
redis.call('HSET', KEYS[2], 'state', 'failed', 'last_seq', seq)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return seq
"""
)

# Delete a lock only while it still names this run.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Extend the lock, and the run's record and log with it (a run may outlive the TTL they were
# given at its start). A lock that is gone (expired in a stall, or lost in a restart) is taken
# back with the run's record, unless the log has ended: a follower declared the run lost.
# KEYS[1] the lock, KEYS[2] the record, KEYS[3] the log; ARGV[1] run id, ARGV[2] lock TTL,
# ARGV[3] run TTL (ms), ARGV[4..7] the record's session, key, owner_key and instance.
# Returns 1 when the lock was held, 2 when it was taken back, 0 when the run is lost.
_RENEW = (
    _LOG_END
    + """
local holder = redis.call('GET', KEYS[1])
local held = 1
if not holder then
  local _, ended = log_end(KEYS[3])
  if ended then return 0 end
  redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
  redis.call('HSET', KEYS[2], 'session', ARGV[4], 'key', ARGV[5], 'owner_key', ARGV[6],
             'instance', ARGV[7], 'state', 'running')
  held = 2
elseif holder ~= ARGV[1] then
  return 0
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
return held
"""
)

# Append a batch of frames to a run's log so that the log never has a gap: entries it already
# holds are skipped (a retried batch), and nothing is written after a hole (Redis lost the
# entries before the batch) or after the log's ending (a follower declared the run lost).
# KEYS[1] the log; ARGV[1] the first frame's seq, ARGV[2] the cap, then each frame's event
# type and the frame. Returns the seq the log ends at, or -1 when it has ended.
_APPEND_LOG = (
    _LOG_END
    + """
local have, ended = log_end(KEYS[1])
if ended then return -1 end
local first = tonumber(ARGV[1])
if have < first - 1 then return have end
for i = 3, #ARGV, 2 do
  local seq = first + (i - 3) / 2
  if seq > have then
    redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[2], seq .. '-0', 't', ARGV[i], 'f', ARGV[i + 1])
    have = seq
  end
end
return have
"""
)

RUN_LOST_DATA = orjson.dumps(
    {
        "code": ErrorCode.RUN_LOST,
        "message": "The server running this turn stopped before it finished.",
    }
).decode()

# The owner's side of a lost lock: another turn took the session while Redis was out of reach.
LOCK_LOST = StopReason(
    ErrorCode.RUN_LOST,
    "This server could not reach the session store for longer than a turn holds its session, "
    "and the turn was given up for lost; it was stopped.",
)

# Frames per mirror call: after an outage the backlog goes in pieces, so Redis stays responsive.
_BATCH = 1000


@dataclass(slots=True)
class _Owned:
    """What this instance does for a run it executes: mirror its log, renew its lock."""

    run: Run
    closing: bool = False
    # Set when Redis may have lost the log (the lock was gone): the mirror checks where
    # the log ends even with nothing new to send.
    recheck: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class Cluster:
    """Redis-backed coordination of runs between instances."""

    def __init__(self, redis: Redis, settings: Settings, *, prefix: str = "chatstream") -> None:
        self.redis = redis
        self.settings = settings
        self.prefix = prefix
        self.instance = secrets.token_hex(4)
        self.lock_ttl_ms = int(settings.lock_ttl_s * 1000)
        # How long a run's record and log live without news from its owner.
        self._run_ttl_ms = int(settings.run_ttl_s * 1000) + self.lock_ttl_ms
        self._owned: dict[str, _Owned] = {}
        self._listener: asyncio.Task[None] | None = None
        # How long the owner's last writes wait for Redis: as long as its lock would hold.
        self._outage_s = max(settings.lock_ttl_s, 2.0)
        self._declare_lost = self.redis.register_script(_DECLARE_LOST)
        self._release = self.redis.register_script(_RELEASE)
        self._renew = self.redis.register_script(_RENEW)
        self._append_log = self.redis.register_script(_APPEND_LOG)

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> Cluster:
        # A stalled Redis must not hang a call forever (XREAD blocks for at most 1 s).
        redis = Redis.from_url(
            url,
            socket_connect_timeout=2,
            socket_timeout=5,
            health_check_interval=10,
            retry=RECONNECT_ONCE,
        )
        return cls(redis, settings)

    # -- keys ---------------------------------------------------------------------------

    def _lock(self, store_key: str) -> str:
        return f"{self.prefix}:lock:{store_key}"

    def _meta(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}"

    def _log(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}:log"

    # -- the owner's side ---------------------------------------------------------------

    def listen_for_cancels(self, cancel_local: Any) -> None:
        """Stop local runs when any instance publishes their id on the cancel channel."""
        self._listener = asyncio.create_task(self._listen(cancel_local))

    async def _listen(self, cancel_local: Any) -> None:
        channel = f"{self.prefix}:cancel"
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message["type"] == "message":
                        cancel_local(message["data"].decode())
            except (RedisError, OSError) as exc:
                log.warning("cancel listener lost Redis (%s); retrying", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def claim(self, run: Run) -> str | None:
        """Take the session's lock for ``run``; the id of the run holding it when busy."""
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(self._lock(run.store_key), run.id, nx=True, px=self.lock_ttl_ms)
                pipe.get(self._lock(run.store_key))
                claimed, holder = await pipe.execute()
            holder_id = cast(bytes, holder).decode() if holder else "unknown"
            # A reconnection may re-send the SET after it was applied: the lock is ours then.
            if not claimed and holder_id != run.id:
                return holder_id
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(self._meta(run.id), mapping={**self._record(run), "state": "running"})
                pipe.pexpire(self._meta(run.id), self._run_ttl_ms)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise unavailable(f"run {run.id}: claiming session {run.store_key!r}", exc) from exc
        return None

    def _record(self, run: Run) -> dict[Any, Any]:
        """The fixed fields of a run's shared record."""
        return {
            "session": run.session_id,
            "key": run.store_key,
            "owner_key": run.owner,
            "instance": self.instance,
        }

    def attach(self, run: Run) -> None:
        """Mirror the run's log into Redis and keep its lock alive while it runs."""
        owned = _Owned(run)
        owned.tasks = [
            asyncio.create_task(self._mirror(owned)),
            asyncio.create_task(self._keep_alive(owned)),
        ]
        self._owned[run.id] = owned

    async def _mirror(self, owned: _Owned) -> None:
        run = owned.run
        reader = run.follow()
        key = self._log(run.id)
        cap = self.settings.run_log_max_events
        try:
            while True:
                reader.wake.clear()
                first = run.seq_of(reader) + 1
                unread = run.read(reader)
                frames = unread[:_BATCH]
                reader.cursor -= len(unread) - len(frames)
                if frames or owned.recheck:
                    owned.recheck = False
                    args: list[Any] = [first, cap]
                    for frame in frames:
                        args += (frame_event(frame), frame)
                    try:
                        ends = int(await self._append_log(keys=[key], args=args))
                    except (RedisError, OSError) as exc:
                        # Keep the frames: rewind and try again once Redis answers. Frames
                        # a half-applied attempt did write are skipped by the script.
                        reader.cursor -= len(frames)
                        owned.recheck = True
                        log.warning("run %s: mirroring to Redis failed (%s)", run.id, exc)
                        await asyncio.sleep(0.5)
                        continue
                    if ends < 0:
                        self._lose(run, "the log in Redis says it was lost")
                        return
                    if ends < first - 1:
                        # Redis lost entries (a restart): re-send the log from the first one.
                        log.warning(
                            "run %s: Redis lost its log after seq %d; re-sending", run.id, ends
                        )
                        reader.cursor -= run.seq_of(reader) - ends
                    continue
                if owned.closing:
                    return
                await reader.wake.wait()
        finally:
            run.unfollow(reader)

    async def _keep_alive(self, owned: _Owned) -> None:
        run = owned.run
        keys = [self._lock(run.store_key), self._meta(run.id), self._log(run.id)]
        args: list[Any] = [run.id, self.lock_ttl_ms, self._run_ttl_ms, *self._record(run).values()]
        interval = self.lock_ttl_ms / 3000
        delay = interval
        while True:
            await asyncio.sleep(delay)
            try:
                held = int(await self._renew(keys=keys, args=args))
            except Exception as exc:
                # Redis unreachable (or anything else): the lock must outlive it, so this
                # task must too. Try again sooner than usual, before the lock expires.
                log.warning("run %s: renewing the session lock failed (%s)", run.id, exc)
                delay = min(interval, 0.1 if delay >= interval else delay * 2)
                continue
            delay = interval
            if held == 2:
                log.warning(
                    "run %s: the session lock was gone (Redis restarted, or stalled past "
                    "the lock TTL); took it back",
                    run.id,
                )
                owned.recheck = True
                run.wake_followers()
            elif held == 0:
                self._lose(run, "another run holds its session's lock")
                return

    def _lose(self, run: Run, why: str) -> None:
        """Stop a run that lost its session: its readers get ``RUN_LOST``."""
        if run.cancel(LOCK_LOST):
            log.warning("run %s: stopped, %s", run.id, why)

    async def release(self, run: Run) -> None:
        """Free the session's lock if ``run`` holds it: a turn that claimed it but never started."""
        try:
            await self._release(keys=[self._lock(run.store_key)], args=[run.id])
            await self.redis.delete(self._meta(run.id))
        except (RedisError, OSError) as exc:
            # It expires by itself within the lock TTL.
            log.warning("run %s: could not release the session lock (%s)", run.id, exc)

    async def finish(self, run: Run, terminal: bytes, state: RunState) -> None:
        """Flush the log, write the terminal frame, release the lock, set the expiry."""
        owned = self._owned.pop(run.id, None)
        if owned is not None:
            owned.closing = True
            owned.recheck = True  # a restart since the last renewal may have emptied the log
            mirror, keep_alive = owned.tasks
            keep_alive.cancel()
            run.wake_followers()  # the mirror writes what is left, then returns
            try:
                await asyncio.wait_for(mirror, timeout=5)
            except TimeoutError:
                log.warning("run %s: Redis did not take the whole log in time", run.id)
        seq = run.last_seq + 1
        ttl = int(self.settings.run_ttl_s * 1000)

        async def record_end() -> None:
            # Safe to repeat: the entry's id is fixed, the rest are plain sets.
            ends = int(
                await self._append_log(
                    keys=[self._log(run.id)],
                    args=[seq, self.settings.run_log_max_events, frame_event(terminal), terminal],
                )
            )
            async with self.redis.pipeline(transaction=True) as pipe:
                if ends == seq:
                    pipe.hset(self._meta(run.id), mapping={"state": state.value, "last_seq": seq})
                else:
                    # The log has another ending (RUN_LOST), or a hole: the record follows it.
                    log.warning("run %s: its log in Redis ends otherwise (at %d)", run.id, ends)
                pipe.pexpire(self._log(run.id), ttl)
                pipe.pexpire(self._meta(run.id), ttl)
                await pipe.execute()
            await self._release(keys=[self._lock(run.store_key)], args=[run.id])

        what = f"run {run.id}: recording its end"
        try:
            await outlast(record_end, within_s=self._outage_s, what=what)
        except (RedisError, OSError) as exc:
            log.warning("%s in Redis failed (%s)", what, exc)

    # -- everyone else's side -----------------------------------------------------------

    async def holder(self, store_key: str) -> str | None:
        """The id of the run that holds the session's lock, if any."""
        try:
            holder = await self.redis.get(self._lock(store_key))
        except (RedisError, OSError) as exc:
            raise unavailable(f"reading the lock of session {store_key!r}", exc) from exc
        return cast(bytes, holder).decode() if holder else None

    async def info(self, run_id: str) -> dict[str, str] | None:
        """A run's shared metadata: session, key, owner_key, instance, state, last_seq.

        ``last_seq`` is where its log ends: the record says it only once the run is over.
        """
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(self._meta(run_id))
                pipe.xrevrange(self._log(run_id), count=1)
                meta, last = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise unavailable(f"reading run {run_id}", exc) from exc
        pairs = cast("dict[bytes, bytes]", meta)
        if not pairs:
            return None
        info = {k.decode(): v.decode() for k, v in pairs.items()}
        logged = int(last[0][0].split(b"-")[0]) if last else 0
        info["last_seq"] = str(max(logged, int(info.get("last_seq", 0))))
        return info

    async def replica(self, run_id: str, after_seq: int) -> Run | None:
        """A local copy of another instance's run, fed from Redis from ``after_seq`` on."""
        meta = await self.info(run_id)
        if meta is None:
            return None
        if meta["state"] != "running" and after_seq >= int(meta.get("last_seq", 0)):
            return None
        run = Run(
            run_id,
            meta["session"],
            max_events=self.settings.run_log_max_events,
            resume_grace_s=0,
            first_seq=after_seq,
            owner=meta.get("owner_key", ""),
        )
        # Cancelling a replica (its last reader left) only stops reading: RunManager.cancel
        # never reaches it, because replicas are not among the manager's own runs.
        run.task = asyncio.create_task(self._follow(run, meta["key"]))
        return run

    async def _follow(self, run: Run, store_key: str) -> None:
        key = self._log(run.id)
        block_ms = max(100, min(1000, self.lock_ttl_ms // 4))
        lock_gone_since: float | None = None
        while True:
            try:
                replies = cast(
                    "list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]",
                    await self.redis.xread({key: f"{run.last_seq}-0"}, count=500, block=block_ms),
                )
                if not replies:
                    lock_gone_since = await self._check_owner(run, store_key, lock_gone_since)
                    continue
                for _, entries in replies:
                    for _, fields in entries:
                        frame = fields[b"f"]
                        run.append_frame(frame)
                        if fields[b"t"] in TERMINAL_FRAMES:
                            state = RunState.DONE if fields[b"t"] == b"done" else RunState.FAILED
                            run.mark_finished(state)
                            return
            except (RedisError, OSError) as exc:
                log.warning("run %s: following it in Redis failed (%s)", run.id, exc)
                await asyncio.sleep(0.5)

    async def _check_owner(
        self, run: Run, store_key: str, gone_since: float | None
    ) -> float | None:
        """When the owner's lock is lost and the log has no ending, the run is lost.

        A lock held by another run is lost. One that is just gone is lost once it stays gone
        for a lock TTL: its owner takes it back after Redis restarted or stalled. Returns
        since when the lock has been gone, for the next check.
        """
        holder = await self.redis.get(self._lock(store_key))
        if holder is not None and cast(bytes, holder).decode() == run.id:
            return None
        if holder is None:
            now = time.monotonic()
            if gone_since is None or now - gone_since < self.settings.lock_ttl_s:
                return now if gone_since is None else gone_since
        seq = await self._declare_lost(
            keys=[self._log(run.id), self._meta(run.id)],
            args=[run.id, run.last_seq, RUN_LOST_DATA, int(self.settings.run_ttl_s * 1000)],
        )
        if seq:
            log.warning("run %s was lost with its instance; told its readers", run.id)
        return gone_since

    async def request_cancel(self, run_id: str) -> None:
        """Ask whichever instance runs ``run_id`` to stop it."""
        try:
            await self.redis.publish(f"{self.prefix}:cancel", run_id)
        except (RedisError, OSError) as exc:
            raise unavailable(f"asking for run {run_id} to stop", exc) from exc

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self.redis.aclose()
