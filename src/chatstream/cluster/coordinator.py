"""``RedisCoordinator``: sessions' locks, runs' records and messages to runs, in Redis.

A session's lock names the run busy in it and expires unless its owner renews it, so a
crashed instance's sessions free themselves. Redis may stall or restart (losing every key)
under a live owner; the lock must not silently vanish then: when renewing finds it gone,
the owner takes it back if nobody else did, and the run log re-sends what Redis lost. When
another run holds it by then, or a follower already declared the run lost, the owner is
told (``on_lost``) and stops its run with ``RUN_LOST``: it must not write over the newer
turn. Renewing retries while Redis is unreachable, and the owner's last writes outlast a
short outage (``store.redis.outlast``).

A write already under way when the lock is lost (its owner cannot be stopped any more) is
fenced: each claim takes the session's next token (``scripts.CLAIM``), the owner's write
names it, and the store refuses it once a newer claim's turn has written the session. The
run's record keeps its token and its ``Opening`` (written when the claim is first kept,
and again when a lock Redis lost is taken back): whoever declares the run lost stores its
turn with them (``cluster.log``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Callable, Sequence
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from chatstream.approvals import Answer, Pending, Taken
from chatstream.cluster.scripts import ANSWER, CLAIM, RELEASE, RENEW, Keys, read_run
from chatstream.config import Settings
from chatstream.coordinator import Handler, Message, Opening, RunState, RunStatus
from chatstream.store.base import SessionRef
from chatstream.store.redis import outlast, unavailable

log = logging.getLogger("chatstream.cluster")


class RedisCoordinator:
    """Claims, records and messages shared by every instance on one Redis."""

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        *,
        keys: Keys | None = None,
        on_reclaimed: Callable[[str], None] | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys or Keys()
        self.instance = secrets.token_hex(4)
        self.lock_ttl_ms = int(settings.streams.lock_ttl_s * 1000)
        # How long a run's record and log live without news from its owner, and after its end.
        self._run_ttl_ms = int(settings.streams.run_ttl_s * 1000) + self.lock_ttl_ms
        self._ended_ttl_ms = int(settings.streams.run_ttl_s * 1000)
        # How long the owner's last writes wait for Redis: as long as its lock would hold.
        self._outage_s = max(settings.streams.lock_ttl_s, 2.0)
        # Told when a lock Redis had lost was taken back: the log may need re-sending.
        self.on_reclaimed = on_reclaimed
        self._claim = redis.register_script(CLAIM)
        self._renew = redis.register_script(RENEW)
        self._release = redis.register_script(RELEASE)
        self._answer = redis.register_script(ANSWER)
        self._kept: dict[str, asyncio.Task[None]] = {}
        self._fences: dict[str, int] = {}
        self._listener: asyncio.Task[None] | None = None

    def _record(self, run_id: str, session: SessionRef) -> dict[str, str]:
        """The fixed fields of a run's shared record."""
        return {
            "session": session.id,
            "key": session.key,
            "owner_key": session.owner,
            "instance": self.instance,
        }

    async def claim(self, run_id: str, session: SessionRef) -> str | None:
        keys = [
            self.keys.lock(session.key),
            self.keys.fence(session.key),
            self.keys.record(run_id),
        ]
        fields = {**self._record(run_id, session), "state": "running"}
        args: list[Any] = [run_id, self.lock_ttl_ms, self._run_ttl_ms]
        for name, value in fields.items():
            args += (name, value)
        try:
            # Safe to repeat: a claim re-sent after it was applied finds the lock its own.
            claimed, value = cast("list[Any]", await self._claim(keys=keys, args=args))
        except (RedisError, OSError) as exc:
            raise unavailable(f"run {run_id}: claiming session {session.key!r}", exc) from exc
        if not int(claimed):
            return cast(bytes, value).decode()
        self._fences[run_id] = int(value)
        return None

    def fence(self, run_id: str) -> int | None:
        return self._fences.get(run_id)

    def keep(
        self,
        run_id: str,
        session: SessionRef,
        on_lost: Callable[[], None],
        *,
        opening: Opening | None = None,
    ) -> None:
        self._kept[run_id] = asyncio.create_task(
            self._keep_alive(run_id, session, on_lost, opening), name=f"chatstream-lock-{run_id}"
        )

    async def _keep_opening(self, run_id: str, opening: Opening | None) -> None:
        """Write the run's opening into its record, for whoever must store the turn."""
        if opening is None:
            return
        body = json.dumps(opening.to_dict(), ensure_ascii=False)
        try:
            await self.redis.hset(self.keys.record(run_id), "opening", body)
        except (RedisError, OSError) as exc:
            # Renewing tries again when it takes the lock back; meanwhile the turn would
            # be stored without its user's message if this instance died.
            log.warning("run %s: keeping its opening in Redis failed (%s)", run_id, exc)

    async def _keep_alive(
        self,
        run_id: str,
        session: SessionRef,
        on_lost: Callable[[], None],
        opening: Opening | None,
    ) -> None:
        keys = [
            self.keys.lock(session.key),
            self.keys.record(run_id),
            self.keys.log(run_id),
            self.keys.approvals(run_id),
        ]
        record = self._record(run_id, session)
        fence = self._fences.get(run_id, 0)
        args: list[Any] = [run_id, self.lock_ttl_ms, self._run_ttl_ms, *record.values(), fence]
        # Beside renewing, never before it: a slow Redis must not hold the renewals back.
        writes = {asyncio.create_task(self._keep_opening(run_id, opening))}
        try:
            await self._renew_while_held(run_id, keys, args, on_lost, opening, writes)
        finally:
            for write in writes:
                write.cancel()

    async def _renew_while_held(
        self,
        run_id: str,
        keys: list[str],
        args: list[Any],
        on_lost: Callable[[], None],
        opening: Opening | None,
        writes: set[asyncio.Task[None]],
    ) -> None:
        interval = self.lock_ttl_ms / 3000
        delay = interval
        while True:
            await asyncio.sleep(delay)
            try:
                held = int(await self._renew(keys=keys, args=args))
            except Exception as exc:
                # Redis unreachable (or anything else): the lock must outlive it, so this
                # task must too. Try again sooner than usual, before the lock expires.
                log.warning("run %s: renewing the session lock failed (%s)", run_id, exc)
                delay = min(interval, 0.1 if delay >= interval else delay * 2)
                continue
            delay = interval
            if held == 2:
                log.warning(
                    "run %s: the session lock was gone (Redis restarted, or stalled past "
                    "the lock TTL); took it back",
                    run_id,
                )
                write = asyncio.create_task(self._keep_opening(run_id, opening))
                writes.add(write)
                write.add_done_callback(writes.discard)
                if self.on_reclaimed is not None:
                    self.on_reclaimed(run_id)
            elif held == 0:
                log.warning("run %s: another run holds its session's lock", run_id)
                on_lost()
                return

    async def release(self, status: RunStatus) -> None:
        self._fences.pop(status.run_id, None)
        kept = self._kept.pop(status.run_id, None)
        if kept is not None:
            kept.cancel()
        record = self.keys.record(status.run_id)

        async def record_end() -> None:
            # Safe to repeat: plain sets, and a release that checks whose lock it is.
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(record, mapping={"state": status.state, "last_seq": status.last_seq})
                pipe.pexpire(self.keys.log(status.run_id), self._ended_ttl_ms)
                pipe.pexpire(self.keys.approvals(status.run_id), self._ended_ttl_ms)
                pipe.pexpire(record, self._ended_ttl_ms)
                await pipe.execute()
            await self._release(keys=[self.keys.lock(status.session.key)], args=[status.run_id])

        what = f"run {status.run_id}: recording its end"
        try:
            await outlast(record_end, within_s=self._outage_s, what=what)
        except (RedisError, OSError) as exc:
            # The lock expires by itself within its TTL.
            log.warning("%s in Redis failed (%s)", what, exc)

    async def holder(self, session: SessionRef) -> str | None:
        try:
            holder = await self.redis.get(self.keys.lock(session.key))
        except (RedisError, OSError) as exc:
            raise unavailable(f"reading the lock of session {session.key!r}", exc) from exc
        return cast(bytes, holder).decode() if holder else None

    async def status(self, run_id: str) -> RunStatus | None:
        """A run's record; ``last_seq`` is where its log ends (a record says it at the end)."""
        record = await read_run(self.redis, self.keys, run_id)
        if record is None:
            return None
        pending: tuple[Pending, ...] = ()
        if record.state is RunState.RUNNING:
            pending = await self._pending(run_id)
        return RunStatus(run_id, record.session, record.state, record.last_seq, pending)

    async def _pending(self, run_id: str) -> tuple[Pending, ...]:
        try:
            fields = cast(
                "dict[bytes, bytes]", await self.redis.hgetall(self.keys.approvals(run_id))
            )
        except (RedisError, OSError) as exc:
            raise unavailable(f"reading the approvals of run {run_id}", exc) from exc
        answered = {k.removesuffix(b":answer") for k in fields if k.endswith(b":answer")}
        calls = [
            Pending.from_dict(json.loads(value))
            for key, value in fields.items()
            if not key.endswith(b":answer") and key not in answered
        ]
        return tuple(sorted(calls, key=lambda call: call.expires_at))

    async def send(self, run_id: str, message: Message | Answer) -> None:
        try:
            await self.redis.publish(self.keys.messages, _payload(run_id, message))
        except (RedisError, OSError) as exc:
            raise unavailable(f"sending {message} to run {run_id}", exc) from exc

    async def ask(self, run_id: str, calls: Sequence[Pending]) -> None:
        key = self.keys.approvals(run_id)
        mapping = {call.call_id: json.dumps(call.to_dict()) for call in calls}
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping=cast("dict[Any, Any]", mapping))
                pipe.pexpire(key, self._run_ttl_ms)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise unavailable(f"run {run_id}: asking for approval", exc) from exc

    async def answer(self, run_id: str, answer: Answer) -> tuple[Taken, Answer | None]:
        keys = [self.keys.approvals(run_id)]
        body = json.dumps(answer.to_dict())
        args = [answer.call_id, body, self.keys.messages, _payload(run_id, answer)]
        try:
            outcome = cast("list[Any]", await self._answer(keys=keys, args=args))
        except (RedisError, OSError) as exc:
            raise unavailable(f"run {run_id}: answering call {answer.call_id}", exc) from exc
        if int(outcome[0]) == 0:
            return Taken.UNKNOWN, None
        if int(outcome[0]) == 1:
            return Taken.ANSWERED, Answer.from_dict(json.loads(outcome[1]))
        return Taken.TAKEN, answer

    def listen(self, handler: Handler) -> None:
        self._listener = asyncio.create_task(self._listen(handler), name="chatstream-messages")

    async def _listen(self, handler: Handler) -> None:
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.keys.messages)
                while True:
                    received = await pubsub.get_message(timeout=1.0)
                    if received is None or received["type"] != "message":
                        continue
                    with contextlib.suppress(ValueError, KeyError):
                        handler(*_parse_payload(bytes(received["data"]).decode()))
            except (RedisError, OSError) as exc:
                log.warning("message listener lost Redis (%s); retrying", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        tasks = [t for t in (self._listener, *self._kept.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._kept.clear()


def _payload(run_id: str, message: Message | Answer) -> str:
    if isinstance(message, Answer):
        return f"answer:{run_id}:{json.dumps(message.to_dict())}"
    return f"{message}:{run_id}"


def _parse_payload(payload: str) -> tuple[str, Message | Answer]:
    """The run and message of a payload; ``ValueError``/``KeyError`` for a foreign one."""
    kind, _, rest = payload.partition(":")
    if kind == "answer":
        run_id, _, body = rest.partition(":")
        return run_id, Answer.from_dict(json.loads(body))
    return rest, Message(kind)
