"""The keys chatstream keeps in Redis for runs, and the Lua scripts that change them atomically.

Keys (``<p>`` is the prefix, ``chatstream``):

* ``<p>:lock:<session key>``  the session's busy lock: the running run's id; set if absent,
  with an expiry the owner renews while the run lives. A crashed owner's lock expires.
* ``<p>:fence:<session key>`` the session's fencing counter: each claim takes the next token
  (``INCR``, and never below Redis's clock in microseconds, so that a counter lost in a
  restart starts again above every token it gave); expires with the runs.
* ``<p>:run:<runId>``         hash: session, key, owner_key, instance, state, fence (its
  claim's token), opening (``coordinator.Opening`` as JSON); last_seq once it ended (while
  it runs, its log's last entry says where it is).
* ``<p>:run:<runId>:log``     a Redis Stream of the run's encoded frames (field ``f``) and
  event types (``t``), entry id ``<seq>-0``, capped with MAXLEN, expiring with the run.
* ``<p>:run:<runId>:approvals`` hash: each call waiting for approval (field ``<callId>``, the
  ``Pending`` as JSON) and its answer once it has one (``<callId>:answer``); lives with the run.
* ``<p>:messages``            pub/sub channel: ``<message>:<runId>``, or
  ``answer:<runId>:<answer JSON>`` for an approval's answer, heard by every instance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from chatstream.coordinator import RunState
from chatstream.store.base import SessionRef
from chatstream.store.redis import unavailable


@dataclass(frozen=True, slots=True)
class Keys:
    """Where each thing lives in Redis."""

    prefix: str = "chatstream"

    def lock(self, session_key: str) -> str:
        return f"{self.prefix}:lock:{session_key}"

    def fence(self, session_key: str) -> str:
        return f"{self.prefix}:fence:{session_key}"

    def record(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}"

    def log(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}:log"

    def approvals(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}:approvals"

    @property
    def messages(self) -> str:
        return f"{self.prefix}:messages"


@dataclass(frozen=True, slots=True)
class RunRecord:
    """A run as Redis knows it: its session, state, and the seq its log ends at."""

    session: SessionRef
    state: RunState
    last_seq: int


async def read_run(redis: Redis, keys: Keys, run_id: str) -> RunRecord | None:
    """A run's record; None when Redis knows no such run; ``StoreError`` when it is down.

    The record says ``last_seq`` only once the run ended; while it runs, the log's last
    entry says where it is.
    """
    try:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.record(run_id))
            pipe.xrevrange(keys.log(run_id), count=1)
            meta, last = await pipe.execute()
    except (RedisError, OSError) as exc:
        raise unavailable(f"reading run {run_id}", exc) from exc
    fields = {k.decode(): v.decode() for k, v in cast("dict[bytes, bytes]", meta).items()}
    if not fields:
        return None
    logged = int(last[0][0].split(b"-")[0]) if last else 0
    return RunRecord(
        SessionRef(fields.get("owner_key", ""), fields["session"]),
        RunState(fields["state"]),
        max(logged, int(fields.get("last_seq", 0))),
    )


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

# Claim a session's lock for a run, with the session's next fencing token. KEYS[1] the lock,
# KEYS[2] the session's fencing counter, KEYS[3] the run's record; ARGV[1] the run id,
# ARGV[2] the lock's TTL, ARGV[3] the run's TTL (ms), ARGV[4...] the record's fields and
# values. Returns {1, token} when claimed (a claim re-sent after it was applied gets its
# token back), {0, holder} when another run holds the lock.
CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return {0, holder} end
if holder then
  local fence = redis.call('HGET', KEYS[3], 'fence')
  if fence then return {1, fence} end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local now = redis.call('TIME')
local floor = tonumber(now[1]) * 1000000 + tonumber(now[2])
local fence = redis.call('INCR', KEYS[2])
if fence < floor then
  fence = string.format('%.0f', floor)
  redis.call('SET', KEYS[2], fence)
else
  fence = string.format('%.0f', fence)
end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[3], 'fence', fence, unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[3], ARGV[3])
return {1, fence}
"""

# Append ``error RUN_LOST`` after the last frame, unless the log already ended. The frame's
# bytes come from ``events.encode_around_seq``: the script only puts the seq between them.
# KEYS[1] the log, KEYS[2] the record; ARGV[1] the seq the caller has seen, ARGV[2] the
# frame before its seq, ARGV[3] the frame after it, ARGV[4] how long the run stays (ms).
# Returns {0} when the log had ended already; else {seq of the ending, the run's fencing
# token, its opening} ('' for what the record lacks): the one caller that gets them stores
# what the run's readers saw, so the turn is stored once however many readers notice.
DECLARE_LOST = (
    _LOG_END
    + """
local seq, ended = log_end(KEYS[1])
if ended then return {0} end
-- A log that Redis lost ends before what the caller has seen.
seq = math.max(seq, tonumber(ARGV[1])) + 1
redis.call('XADD', KEYS[1], seq .. '-0', 't', 'error', 'f', ARGV[2] .. seq .. ARGV[3])
redis.call('HSET', KEYS[2], 'state', 'failed', 'last_seq', seq)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
local kept = redis.call('HMGET', KEYS[2], 'fence', 'opening')
return {seq, kept[1] or '', kept[2] or ''}
"""
)

# Delete a lock only while it still names this run.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Extend the lock, and the run's record and log with it (a run may outlive the TTL they were
# given at its start). A lock that is gone (expired in a stall, or lost in a restart) is taken
# back with the run's record, unless the log has ended: a follower declared the run lost.
# KEYS[1] the lock, KEYS[2] the record, KEYS[3] the log, KEYS[4] its approvals; ARGV[1] run
# id, ARGV[2] lock TTL, ARGV[3] run TTL (ms), ARGV[4..8] the record's session, key,
# owner_key, instance and fence (the claim's token: the lock taken back keeps it).
# Returns 1 when the lock was held, 2 when it was taken back, 0 when the run is lost.
RENEW = (
    _LOG_END
    + """
local holder = redis.call('GET', KEYS[1])
local held = 1
if not holder then
  local _, ended = log_end(KEYS[3])
  if ended then return 0 end
  redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
  redis.call('HSET', KEYS[2], 'session', ARGV[4], 'key', ARGV[5], 'owner_key', ARGV[6],
             'instance', ARGV[7], 'fence', ARGV[8], 'state', 'running')
  held = 2
elseif holder ~= ARGV[1] then
  return 0
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
redis.call('PEXPIRE', KEYS[4], ARGV[3])
return held
"""
)

# Append a batch of frames to a run's log so that the log never has a gap: entries it already
# holds are skipped (a retried batch), and nothing is written after a hole (Redis lost the
# entries before the batch) or after the log's ending (a follower declared the run lost).
# KEYS[1] the log; ARGV[1] the first frame's seq, ARGV[2] the cap, then each frame's event
# type and the frame. Returns the seq the log ends at, or -1 when it has ended.
APPEND_LOG = (
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

# Decide a waiting call once, and tell the run's owner. KEYS[1] the run's approvals; ARGV[1]
# the call id, ARGV[2] the answer as JSON, ARGV[3] the messages channel, ARGV[4] the message.
# Returns {2} when this answer decided it, {1, earlier answer} when one already had, {0}
# when no such call waits in that run.
ANSWER = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return {0} end
local earlier = redis.call('HGET', KEYS[1], ARGV[1] .. ':answer')
if earlier then return {1, earlier} end
redis.call('HSET', KEYS[1], ARGV[1] .. ':answer', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return {2}
"""
