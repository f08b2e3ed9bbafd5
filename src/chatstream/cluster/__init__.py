"""Runs shared across server instances through Redis.

With Redis, every instance can resume, follow and cancel a run that another instance
executes, and a session is busy everywhere while one of them runs a turn in it.
``RedisRunLog`` shares runs' logs (``runlog.RunLog``), ``RedisCoordinator`` their
sessions' locks, records and messages (``coordinator.Coordinator``); ``scripts`` names
the keys and holds the Lua that changes them atomically. ``shared_runs`` makes the pair
on one client, wired to each other.
"""

from __future__ import annotations

from redis.asyncio import Redis

from chatstream.cluster.coordinator import RedisCoordinator
from chatstream.cluster.log import RedisRunLog
from chatstream.cluster.scripts import Keys
from chatstream.config import Settings
from chatstream.store.base import SessionStore

__all__ = ["Keys", "RedisCoordinator", "RedisRunLog", "shared_runs"]


def shared_runs(
    redis: Redis, settings: Settings, *, store: SessionStore | None = None
) -> tuple[RedisRunLog, RedisCoordinator]:
    """The run log and coordinator of every instance on ``redis``.

    When the coordinator takes back a lock that Redis lost (a restart), Redis may have
    lost the run's log too: the log then checks where it ends and re-sends the rest. A
    run whose instance died is stored in ``store`` by the instance that declares it lost.
    """
    log = RedisRunLog(redis, settings, store=store)
    return log, RedisCoordinator(redis, settings, on_reclaimed=log.recheck)
