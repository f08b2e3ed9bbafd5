"""Runs shared across server instances through Redis.

With a ``redis://`` store, every instance can resume, follow and cancel a run
that another instance executes, and a session is busy everywhere while one of
them runs a turn in it. Keys (``<p>`` is the prefix, ``chatstream``):

* ``<p>:lock:<sessionId>``  the session's busy lock: the running run's id; set
  if absent, with an expiry the owner renews while the run lives. A crashed
  owner's lock expires by itself.
* ``<p>:run:<runId>``       hash: session, owner instance, state, last seq.
* ``<p>:run:<runId>:log``   a Redis Stream of the run's encoded frames, entry id
  ``<seq>-0``, capped with MAXLEN and expiring with the run's TTL.
* ``<p>:cancel``            pub/sub channel: run ids to stop, heard by their owner.

The owner mirrors its run's log into the stream in batches (one pipeline per
wake-up, never one round trip per token); readers on other instances follow
it with ``XREAD BLOCK``. When the owner dies, its lock expires: a follower
that finds the lock gone and no terminal event appends ``error RUN_LOST``
itself, atomically and only once, so every reader sees the same ending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from chatstream.config import Settings
from chatstream.errors import StoreError
from chatstream.runs import TERMINAL_FRAMES, Run, RunState, frame_event

log = logging.getLogger("chatstream.cluster")

# Append ``error RUN_LOST`` after the last frame, unless the log already ended.
# KEYS[1] the log, KEYS[2] the record; ARGV[1] run id, ARGV[2] the seq the caller has seen,
# ARGV[3] data JSON, ARGV[4] how long the ended run stays readable (ms).
_DECLARE_LOST = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local seq = tonumber(ARGV[2])
if last[1] then
  local fields = last[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 't' and (fields[i + 1] == 'done' or fields[i + 1] == 'error') then
      return 0
    end
  end
  seq = tonumber(string.match(last[1][1], '^(%d+)'))
end
seq = seq + 1
local frame = 'id: ' .. ARGV[1] .. ':' .. seq .. '\\nevent: error\\ndata: ' .. ARGV[3] .. '\\n\\n'
redis.call('XADD', KEYS[1], seq .. '-0', 't', 'error', 'f', frame)
redis.call('HSET', KEYS[2], 'state', 'failed', 'last_seq', seq)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return seq
"""

# Delete a lock only while it still names this run.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Extend a lock only while it still names this run, and the run's record and log with it
# (a run may outlive the TTL they were given at its start).
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

RUN_LOST_DATA = orjson.dumps(
    {"code": "RUN_LOST", "message": "The server running this turn stopped before it finished."}
).decode()


@dataclass(slots=True)
class _Owned:
    """What this instance does for a run it executes: mirror its log, renew its lock."""

    run: Run
    closing: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _mirrored(results: list[Any]) -> int:
    """How many of a batch's XADDs, from the first, have their entry in the stream.

    An id the stream already holds counts as written: a retry re-sends a batch whose
    first attempt may have been applied before the connection failed, or that overlaps
    an earlier one.
    """
    for index, result in enumerate(results):
        if isinstance(result, ResponseError) and "equal or smaller" in str(result):
            continue
        if isinstance(result, Exception):
            return index
    return len(results)


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
        self._declare_lost = self.redis.register_script(_DECLARE_LOST)
        self._release = self.redis.register_script(_RELEASE)
        self._renew = self.redis.register_script(_RENEW)

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> Cluster:
        redis = Redis.from_url(url, socket_connect_timeout=2, health_check_interval=10)
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
            if not claimed:
                return cast(bytes, holder).decode() if holder else "unknown"
            ttl = self._run_ttl_ms
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(
                    self._meta(run.id),
                    mapping={
                        "session": run.session_id,
                        "key": run.store_key,
                        "owner_key": run.owner,
                        "instance": self.instance,
                        "state": "running",
                    },
                )
                pipe.pexpire(self._meta(run.id), ttl)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis is unavailable: {exc}") from exc
        return None

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
                frames = run.read(reader)
                if frames:
                    try:
                        # One MULTI/EXEC: a command refused as it is queued (out of memory,
                        # a read-only replica) aborts the whole batch, so no frame in the
                        # middle can go missing while later ones are written.
                        async with self.redis.pipeline(transaction=True) as pipe:
                            for offset, frame in enumerate(frames):
                                pipe.xadd(
                                    key,
                                    {"t": frame_event(frame), "f": frame},
                                    id=f"{first + offset}-0",
                                    maxlen=cap,
                                    approximate=False,
                                )
                            written = _mirrored(await pipe.execute(raise_on_error=False))
                        if written < len(frames):
                            raise RedisError(f"XADD of seq {first + written} failed")
                    except (RedisError, OSError) as exc:
                        # Keep the frames: rewind and try again once Redis answers. Frames
                        # a half-applied attempt did write are skipped by ``_mirrored``.
                        reader.cursor -= len(frames)
                        log.warning("run %s: mirroring to Redis failed (%s)", run.id, exc)
                        await asyncio.sleep(0.5)
                    continue
                if owned.closing:
                    return
                await reader.wake.wait()
        finally:
            run.unfollow(reader)

    async def _keep_alive(self, owned: _Owned) -> None:
        run = owned.run
        lock = self._lock(run.store_key)
        while True:
            await asyncio.sleep(self.lock_ttl_ms / 3000)
            try:
                await self._renew(
                    keys=[lock, self._meta(run.id), self._log(run.id)],
                    args=[run.id, self.lock_ttl_ms, self._run_ttl_ms],
                )
            except (RedisError, OSError) as exc:
                log.warning("run %s: renewing the session lock failed (%s)", run.id, exc)

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
            mirror, keep_alive = owned.tasks
            keep_alive.cancel()
            run.wake_followers()  # the mirror writes what is left, then returns
            try:
                await asyncio.wait_for(mirror, timeout=5)
            except TimeoutError:
                log.warning("run %s: Redis did not take the whole log in time", run.id)
        seq = run.last_seq + 1
        ttl = int(self.settings.run_ttl_s * 1000)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xadd(
                    self._log(run.id), {"t": frame_event(terminal), "f": terminal}, id=f"{seq}-0"
                )
                pipe.hset(self._meta(run.id), mapping={"state": state.value, "last_seq": seq})
                pipe.pexpire(self._log(run.id), ttl)
                pipe.pexpire(self._meta(run.id), ttl)
                await pipe.execute()
            await self._release(keys=[self._lock(run.store_key)], args=[run.id])
        except (RedisError, OSError) as exc:
            log.warning("run %s: could not record its end in Redis (%s)", run.id, exc)

    # -- everyone else's side -----------------------------------------------------------

    async def holder(self, store_key: str) -> str | None:
        """The id of the run that holds the session's lock, if any."""
        try:
            holder = await self.redis.get(self._lock(store_key))
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis is unavailable: {exc}") from exc
        return cast(bytes, holder).decode() if holder else None

    async def info(self, run_id: str) -> dict[str, str] | None:
        """A run's shared metadata: session, key, owner_key, instance, state, last_seq."""
        try:
            meta = await self.redis.hgetall(self._meta(run_id))
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis is unavailable: {exc}") from exc
        pairs = cast("dict[bytes, bytes]", meta)
        return {k.decode(): v.decode() for k, v in pairs.items()} if pairs else None

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
        while True:
            try:
                replies = cast(
                    "list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]",
                    await self.redis.xread({key: f"{run.last_seq}-0"}, count=500, block=block_ms),
                )
                if not replies:
                    await self._check_owner(run, store_key)
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

    async def _check_owner(self, run: Run, store_key: str) -> None:
        """When the owner's lock is gone and the log has no ending, the run is lost."""
        holder = await self.redis.get(self._lock(store_key))
        if holder is not None and cast(bytes, holder).decode() == run.id:
            return
        seq = await self._declare_lost(
            keys=[self._log(run.id), self._meta(run.id)],
            args=[run.id, run.last_seq, RUN_LOST_DATA, int(self.settings.run_ttl_s * 1000)],
        )
        if seq:
            log.warning("run %s was lost with its instance; told its readers", run.id)

    async def request_cancel(self, run_id: str) -> None:
        """Ask whichever instance runs ``run_id`` to stop it."""
        try:
            await self.redis.publish(f"{self.prefix}:cancel", run_id)
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis is unavailable: {exc}") from exc

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
