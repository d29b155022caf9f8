"""Job state in Redis: one hash per job, the waiting jobs in order, each owner's jobs.

Every state change is one Lua script, so an ingress cancelling a job and a consumer finishing it
can never both win. Keys (prefix `serve_app:`): `job:<id>` (hash), `job:<id>:payload` (the
queued `ImageJob`), `queued` (sorted set, id by submission order), `owner:<name>` (sorted set),
`seq` (counter). A finished job expires after `result_ttl_s`; its payload is deleted when it
finishes. Synchronous (redis-py): the ingress calls it on worker threads, the consumer directly.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

PREFIX = "serve_app:"
FINISHED = ("completed", "failed", "cancelled")
HEARTBEAT_S = 1.0  # consumers touch the jobs they run this often
STALE_S = 6.0  # a running job not touched for this long lost its consumer

_SUBMIT = """
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return -1 end
local seq = redis.call('INCR', KEYS[5])
redis.call('SET', KEYS[3], ARGV[2])
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[2], 'seq', seq)
redis.call('ZADD', KEYS[1], seq, ARGV[3])
redis.call('ZADD', KEYS[4], seq, ARGV[3])
redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -10001)  -- an owner's newest 10,000 are listed
return redis.call('ZRANK', KEYS[1], ARGV[3])
"""

_START = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == 'completed' or status == 'failed' or status == 'cancelled' then return status end
if status == 'in_progress' then
  local beat = tonumber(redis.call('HGET', KEYS[1], 'heartbeat') or '0')
  if tonumber(ARGV[2]) - beat < tonumber(ARGV[3]) then return 'busy' end
end
redis.call('HSET', KEYS[1], 'status', 'in_progress', 'heartbeat', ARGV[2], 'worker', ARGV[4],
           'progress', '0')
if not redis.call('HGET', KEYS[1], 'started_at') then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[2])
end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('ZREM', KEYS[2], ARGV[1])
return 'started'
"""

_FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'in_progress' then return status or 'missing' end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'completed_at', ARGV[2])
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('DEL', KEYS[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 'ok'
"""

_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == 'queued' or status == 'in_progress' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'completed_at', ARGV[2], 'cancel', '1')
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('DEL', KEYS[3])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
return status
"""

_REQUEUE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued', 'progress', '0', 'last_error', ARGV[2])
redis.call('ZADD', KEYS[2], tonumber(redis.call('HGET', KEYS[1], 'seq')), ARGV[1])
return 1
"""


_TOUCH = """
local result = {}
for i, key in ipairs(KEYS) do
  local running = redis.call('HGET', key, 'status') == 'in_progress'
  if running then
    redis.call('HSET', key, 'heartbeat', ARGV[1])
    local progress = tonumber(ARGV[2 * i + 1])
    if progress >= 0 then redis.call('HSET', key, 'progress', ARGV[2 * i + 1]) end
  end
  result[i] = running and 1 or 0
end
return result
"""


class QueueFull(Exception):
    """`max_queued` jobs already wait."""


def new_job_id() -> str:
    return "imgjob_" + secrets.token_hex(12)


class JobStore:
    def __init__(self, redis_url: str, result_ttl_s: int, max_queued: int) -> None:
        import redis

        options = {"socket_connect_timeout": 2, "socket_timeout": 10, "retry_on_timeout": True}
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True, **options)
        self.raw = redis.Redis.from_url(redis_url, **options)  # payload bytes
        self.result_ttl_s = result_ttl_s
        self.max_queued = max_queued
        self._submit = self.redis.register_script(_SUBMIT)
        self._start = self.redis.register_script(_START)
        self._finish = self.redis.register_script(_FINISH)
        self._cancel = self.redis.register_script(_CANCEL)
        self._requeue = self.redis.register_script(_REQUEUE)
        self._touch = self.redis.register_script(_TOUCH)

    # --- keys --------------------------------------------------------------------------------
    @staticmethod
    def _job(job_id: str) -> str:
        return f"{PREFIX}job:{job_id}"

    @staticmethod
    def _payload(job_id: str) -> str:
        return f"{PREFIX}job:{job_id}:payload"

    @staticmethod
    def _owner(owner: str) -> str:
        return f"{PREFIX}owner:{owner}"

    QUEUED = PREFIX + "queued"
    RUNNING = PREFIX + "running"  # id by last heartbeat: where the sweeper looks
    SEQ = PREFIX + "seq"

    # --- ingress -----------------------------------------------------------------------------
    def ping(self) -> None:
        self.redis.ping()

    def submit(self, job_id: str, fields: dict[str, Any], payload: bytes) -> int:
        """Record a queued job and its payload; its queue position. `QueueFull` past the limit."""
        pairs = [item for key, value in fields.items() for item in (key, _text(value))]
        keys = [self.QUEUED, self._job(job_id), self._payload(job_id),
                self._owner(fields["owner"]), self.SEQ]  # fmt: skip
        position = self._submit(keys=keys, args=[self.max_queued, payload, job_id, *pairs])
        if position == -1:
            raise QueueFull()
        return int(position)

    def forget(self, job_id: str, owner: str) -> None:
        """Remove a job entirely (a submission whose task could not be enqueued; a delete)."""
        pipe = self.redis.pipeline()
        pipe.delete(self._job(job_id), self._payload(job_id))
        pipe.zrem(self.QUEUED, job_id)
        pipe.zrem(self.RUNNING, job_id)
        pipe.zrem(self._owner(owner), job_id)
        pipe.execute()

    def get(self, job_id: str) -> dict[str, str] | None:
        record = self.redis.hgetall(self._job(job_id))
        if not record:
            return None
        if record.get("status") == "queued":
            rank = self.redis.zrank(self.QUEUED, job_id)
            record["queue_position"] = "" if rank is None else str(rank)
        return record

    def list(self, owner: str, limit: int, after: str | None) -> tuple[list[dict], bool]:
        """The owner's jobs, newest first, after the job `after`; and whether more exist.
        `KeyError` when `after` names no job of this owner (any more)."""
        key = self._owner(owner)
        high = "+inf"
        if after:
            score = self.redis.zscore(key, after)
            if score is None or not self.redis.exists(self._job(after)):
                raise KeyError(after)
            high = f"({int(score)}"
        records, stale = [], []
        while len(records) <= limit:
            page = self.redis.zrevrangebyscore(key, high, "-inf", start=0, num=limit + 1,
                                               withscores=True)  # fmt: skip
            if not page:
                break
            for job_id, score in page:
                high = f"({int(score)}"  # by score: removing stale ids shifts no page
                record = self.get(job_id)
                if record is None:
                    stale.append(job_id)  # expired or deleted
                else:
                    records.append(record)
        if stale:
            self.redis.zrem(key, *stale)
        return records[:limit], len(records) > limit

    def cancel(self, job_id: str) -> str:
        """Cancel a queued or running job; its status before ('missing' if none)."""
        keys = [self._job(job_id), self.QUEUED, self._payload(job_id)]
        before = self._cancel(keys=keys, args=[job_id, time.time(), self.result_ttl_s])
        self.redis.zrem(self.RUNNING, job_id)
        return before

    def queue_length(self) -> int:
        return int(self.redis.zcard(self.QUEUED))

    # --- consumer ----------------------------------------------------------------------------
    def start(self, job_id: str, worker: str) -> str:
        """'started', or why not: 'missing', 'busy' (another consumer runs it), or its final
        status."""
        keys = [self._job(job_id), self.QUEUED]
        state = self._start(keys=keys, args=[job_id, time.time(), STALE_S, worker])
        if state == "started":
            self.redis.zadd(self.RUNNING, {job_id: time.time()})
        return state

    def payload(self, job_id: str) -> bytes | None:
        return self.raw.get(self._payload(job_id))

    def finish(self, job_id: str, status: str, fields: dict[str, Any]) -> str:
        """Set a final status if the job still runs ('ok'); else its status (e.g. cancelled)."""
        pairs = [item for key, value in fields.items() for item in (key, _text(value))]
        keys = [self._job(job_id), self._payload(job_id)]
        done = self._finish(keys=keys, args=[status, time.time(), self.result_ttl_s, *pairs])
        self.redis.zrem(self.RUNNING, job_id)
        return done

    def requeue(self, job_id: str, reason: str) -> bool:
        """A running job back to queued (before a retry), in its original place."""
        queued = bool(self._requeue(keys=[self._job(job_id), self.QUEUED], args=[job_id, reason]))
        self.redis.zrem(self.RUNNING, job_id)
        return queued

    def touch(self, job_ids: list[str], progress: dict[str, float]) -> dict[str, bool]:
        """Heartbeat the running jobs and store their progress; which are no longer running
        (cancelled or deleted). One script: a deleted job is never recreated."""
        now = time.time()
        args = [now]
        for job_id in job_ids:
            args += [job_id, round(progress.get(job_id, -1), 4)]
        keys = [self._job(job_id) for job_id in job_ids]
        running = self._touch(keys=keys, args=args)
        alive = {job_id: now for job_id, flag in zip(job_ids, running, strict=True) if flag}
        if alive:
            self.redis.zadd(self.RUNNING, alive)
        return {job_id: not flag for job_id, flag in zip(job_ids, running, strict=True)}

    def stale_running(self, older_than_s: float, limit: int = 100) -> list[str]:
        """Jobs still `in_progress` whose heartbeat stopped `older_than_s` ago: their consumer
        died and their task was not handed out again (it was lost). Each is returned once per
        `older_than_s` (claimed by moving its score to now), for a fresh task."""
        now = time.time()
        lost = []
        for job_id in self.redis.zrangebyscore(self.RUNNING, "-inf", now - older_than_s,
                                               start=0, num=limit):  # fmt: skip
            status, beat = self.redis.hmget(self._job(job_id), "status", "heartbeat")
            if status != "in_progress":
                self.redis.zrem(self.RUNNING, job_id)
            elif now - float(beat or 0) >= older_than_s:
                self.redis.zadd(self.RUNNING, {job_id: now})
                lost.append(job_id)
            else:
                self.redis.zadd(self.RUNNING, {job_id: float(beat)})
        return lost

    def mark(self, job_id: str, **fields: Any) -> None:
        self.redis.hset(self._job(job_id), mapping={k: _text(v) for k, v in fields.items()})


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)
