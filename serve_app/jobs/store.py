"""Job state in Redis: one hash per job, the waiting jobs in order, each owner's jobs.

Every state change is one Lua script, so an ingress cancelling a job and a consumer finishing it
can never both win. Keys (prefix `serve_app:`): `job:<id>` (hash), `job:<id>:payload` (the
queued `ModelRequest`), `queued` (sorted set, id by submission order: jobs no consumer has taken),
`waiting` (sorted set: jobs the model has not started, taken by a consumer or not) with
`waiting_by_owner` (hash: owner -> how many of those are theirs), `owner:<name>` (sorted set),
`seq` (counter). A finished job expires after `result_ttl_s`; its payload is deleted when it
finishes. Synchronous (redis-py): the ingress calls it on worker threads, the consumer directly.

`jobs.max_queued` bounds `waiting`, not the broker's queue: each consumer replica takes many
tasks off the broker at once (one per Celery thread), and those jobs still wait on the model.
A job stops waiting when its consumer's heartbeat reports progress (its first denoising step
ran), or when it finishes, is cancelled or deleted; a retry makes it wait again.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from serve_app.jobs.record import FIELD, JobRecord, JobStatus, lua

PREFIX = "serve_app:"
# The Lua scripts below are templates (`record.lua`): `$status` is a hash field's name,
# `$QUEUED` a status's value, both from `serve_app.jobs.record`.

# Leaving `waiting` (KEYS: waiting, waiting_by_owner), idempotent: a count moves only with a
# member, so the two always agree.
_UNWAIT = """
local function unwait(waiting, counts, id, owner)
  if redis.call('ZREM', waiting, id) == 1 and owner then
    if redis.call('HINCRBY', counts, owner, -1) <= 0 then redis.call('HDEL', counts, owner) end
  end
end
"""

_SUBMIT = """
if redis.call('ZCARD', KEYS[6]) >= tonumber(ARGV[1]) then return -1 end
local per_key = tonumber(ARGV[4])
if per_key > 0 and tonumber(redis.call('HGET', KEYS[7], ARGV[5]) or '0') >= per_key then
  return -2
end
local seq = redis.call('INCR', KEYS[5])
redis.call('SET', KEYS[3], ARGV[2])
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[2], '$seq', seq)
redis.call('ZADD', KEYS[1], seq, ARGV[3])
redis.call('ZADD', KEYS[4], seq, ARGV[3])
redis.call('ZADD', KEYS[6], seq, ARGV[3])
redis.call('HINCRBY', KEYS[7], ARGV[5], 1)
redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -10001)  -- an owner's newest 10,000 are listed
return redis.call('ZRANK', KEYS[1], ARGV[3])
"""

_START = """
local status = redis.call('HGET', KEYS[1], '$status')
if not status then return 'missing' end
if status == '$COMPLETED' or status == '$FAILED' or status == '$CANCELLED' then return status end
if status == '$IN_PROGRESS' then
  local beat = tonumber(redis.call('HGET', KEYS[1], '$heartbeat') or '0')
  if tonumber(ARGV[2]) - beat < tonumber(ARGV[3]) then return 'busy' end
end
redis.call('HSET', KEYS[1], '$status', '$IN_PROGRESS', '$heartbeat', ARGV[2], '$worker', ARGV[4],
           '$progress', '0')
if not redis.call('HGET', KEYS[1], '$started_at') then
  redis.call('HSET', KEYS[1], '$started_at', ARGV[2])
end
redis.call('HINCRBY', KEYS[1], '$attempts', 1)
redis.call('ZREM', KEYS[2], ARGV[1])
return 'started'
"""

_FINISH = (
    _UNWAIT
    + """
local status = redis.call('HGET', KEYS[1], '$status')
if status ~= '$IN_PROGRESS' then return status or 'missing' end
unwait(KEYS[3], KEYS[4], ARGV[4], redis.call('HGET', KEYS[1], '$owner'))
redis.call('HSET', KEYS[1], '$status', ARGV[1], '$completed_at', ARGV[2])
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('DEL', KEYS[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 'ok'
"""
)

# The status before and the record after, in one step: concurrent deletes of one job each see
# a state it really had (the first cancels it; a later one finds it cancelled, or gone).
_CANCEL = (
    _UNWAIT
    + """
local status = redis.call('HGET', KEYS[1], '$status')
if not status then return {'missing', {}} end
if status == '$QUEUED' or status == '$IN_PROGRESS' then
  unwait(KEYS[4], KEYS[5], ARGV[1], redis.call('HGET', KEYS[1], '$owner'))
  redis.call('HSET', KEYS[1], '$status', '$CANCELLED', '$completed_at', ARGV[2], '$cancel', '1')
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('DEL', KEYS[3])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
return {status, redis.call('HGETALL', KEYS[1])}
"""
)

_REQUEUE = """
if redis.call('HGET', KEYS[1], '$status') ~= '$IN_PROGRESS' then return 0 end
redis.call('HSET', KEYS[1], '$status', '$QUEUED', '$progress', '0', '$last_error', ARGV[2])
local seq = tonumber(redis.call('HGET', KEYS[1], '$seq'))
redis.call('ZADD', KEYS[2], seq, ARGV[1])
if redis.call('ZADD', KEYS[3], 'NX', seq, ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[4], redis.call('HGET', KEYS[1], '$owner'), 1)
end
return 1
"""

_FORGET = (
    _UNWAIT
    + """
unwait(KEYS[6], KEYS[7], ARGV[1], ARGV[2])
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
"""
)

# Waiting jobs that no longer exist or are final (only after outside interference, e.g. a key
# deleted by hand) leave `waiting`, and the per-owner counts are recounted from it.
_RECOUNT = """
redis.call('DEL', KEYS[2])
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local record = redis.call('HMGET', ARGV[1] .. id, '$status', '$owner')
  local status = record[1]
  if status == '$QUEUED' or status == '$IN_PROGRESS' then
    redis.call('HINCRBY', KEYS[2], record[2] or '', 1)
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
"""


# KEYS: waiting, waiting_by_owner, then the jobs; progress above 0 means the model runs the job.
_TOUCH = (
    _UNWAIT
    + """
local result = {}
for i = 1, #KEYS - 2 do
  local key = KEYS[i + 2]
  local running = redis.call('HGET', key, '$status') == '$IN_PROGRESS'
  if running then
    redis.call('HSET', key, '$heartbeat', ARGV[1])
    local progress = tonumber(ARGV[2 * i + 1])
    if progress >= 0 then redis.call('HSET', key, '$progress', ARGV[2 * i + 1]) end
    if progress > 0 then
      unwait(KEYS[1], KEYS[2], ARGV[2 * i], redis.call('HGET', key, '$owner'))
    end
  end
  result[i] = running and 1 or 0
end
return result
"""
)


class QueueFull(Exception):
    """`limit` jobs already wait for the model: of all keys, or (`per_key`) of this key."""

    def __init__(self, limit: int, per_key: bool = False) -> None:
        super().__init__(limit, per_key)
        self.limit = limit
        self.per_key = per_key


def new_job_id() -> str:
    return "imgjob_" + secrets.token_hex(12)


class JobStore:
    def __init__(
        self,
        redis_url: str,
        result_ttl_s: int,
        max_queued: int,
        max_queued_per_key: int | None = None,
        stale_s: float = 6.0,
    ) -> None:
        """`stale_s`: a running job whose heartbeat is this old lost its consumer."""
        import redis

        options: dict[str, Any] = {
            "socket_connect_timeout": 2,
            "socket_timeout": 10,
            "retry_on_timeout": True,
        }
        # `Any`: redis-py's types cannot say that `decode_responses=True` returns `str`.
        self.redis: Any = redis.Redis.from_url(redis_url, decode_responses=True, **options)
        self.raw: Any = redis.Redis.from_url(redis_url, **options)  # payload bytes
        self.result_ttl_s = result_ttl_s
        self.max_queued = max_queued
        self.max_queued_per_key = max_queued_per_key
        self.stale_s = stale_s
        register = self.redis.register_script
        self._submit = register(lua(_SUBMIT))
        self._start = register(lua(_START))
        self._finish = register(lua(_FINISH))
        self._cancel = register(lua(_CANCEL))
        self._requeue = register(lua(_REQUEUE))
        self._forget = register(lua(_FORGET))
        self._recount = register(lua(_RECOUNT))
        self._touch = register(lua(_TOUCH))

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
    WAITING = PREFIX + "waiting"  # what `max_queued` bounds: jobs the model has not started
    WAITING_BY_OWNER = PREFIX + "waiting_by_owner"
    SEQ = PREFIX + "seq"

    # --- ingress -----------------------------------------------------------------------------
    def ping(self) -> None:
        """Raises when Redis cannot be reached (the ingress's `/health`)."""
        self.redis.ping()

    def submit(self, record: JobRecord, payload: bytes) -> int:
        """Record a queued job and its payload; its queue position. `QueueFull` when
        `max_queued` jobs (or `max_queued_per_key` of this owner's) wait for the model."""
        job_id, owner = record.id, record.owner
        pairs = [item for pair in record.to_hash().items() for item in pair]
        keys = [self.QUEUED, self._job(job_id), self._payload(job_id), self._owner(owner),
                self.SEQ, self.WAITING, self.WAITING_BY_OWNER]  # fmt: skip
        per_key = self.max_queued_per_key or 0
        args: list[Any] = [self.max_queued, payload, job_id, per_key, owner, *pairs]
        position = self._submit(keys=keys, args=args)
        if position == -1:
            raise QueueFull(self.max_queued)
        if position == -2:
            raise QueueFull(per_key, per_key=True)
        return int(position)

    def forget(self, job_id: str, owner: str) -> None:
        """Remove a job entirely (a submission whose task could not be enqueued; a delete)."""
        keys = [self._job(job_id), self._payload(job_id), self.QUEUED, self.RUNNING,
                self._owner(owner), self.WAITING, self.WAITING_BY_OWNER]  # fmt: skip
        self._forget(keys=keys, args=[job_id, owner])

    def get(self, job_id: str) -> JobRecord | None:
        fields = self.redis.hgetall(self._job(job_id))
        if not fields:
            return None
        position = None
        if fields.get(FIELD["status"]) == JobStatus.QUEUED:
            position = self.redis.zrank(self.QUEUED, job_id)
        return JobRecord.from_hash(fields, queue_position=position)

    def list_owned(self, owner: str, limit: int, after: str | None) -> tuple[list[JobRecord], bool]:
        """The owner's jobs, newest first, after the job `after`; and whether more exist.
        `KeyError` when `after` names no job of this owner (any more)."""
        key = self._owner(owner)
        high = "+inf"
        if after:
            score = self.redis.zscore(key, after)
            if score is None or not self.redis.exists(self._job(after)):
                raise KeyError(after)
            high = f"({int(score)}"
        records: list[JobRecord] = []
        stale = []
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
        return self.cancel_and_get(job_id)[0]

    def cancel_and_get(self, job_id: str) -> tuple[str, JobRecord | None]:
        """Cancel a queued or running job. Its status before ('missing' if none) and, read in
        the same step, its record after (None: gone, e.g. deleted by a concurrent delete)."""
        keys = [self._job(job_id), self.QUEUED, self._payload(job_id), self.WAITING,
                self.WAITING_BY_OWNER]  # fmt: skip
        before, flat = self._cancel(keys=keys, args=[job_id, time.time(), self.result_ttl_s])
        self.redis.zrem(self.RUNNING, job_id)
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        return before, JobRecord.from_hash(fields) if fields else None

    def queue_length(self) -> int:
        """Jobs no consumer has taken yet (the broker's backlog)."""
        return int(self.redis.zcard(self.QUEUED))

    def waiting(self, owner: str | None = None) -> int:
        """Jobs the model has not started (what `max_queued` bounds); of one owner if given."""
        if owner is None:
            return int(self.redis.zcard(self.WAITING))
        return int(self.redis.hget(self.WAITING_BY_OWNER, owner) or 0)

    # --- consumer ----------------------------------------------------------------------------
    def start(self, job_id: str, worker: str) -> str:
        """'started', or why not: 'missing', 'busy' (another consumer runs it), or its final
        status."""
        keys = [self._job(job_id), self.QUEUED]
        state = self._start(keys=keys, args=[job_id, time.time(), self.stale_s, worker])
        if state == "started":
            self.redis.zadd(self.RUNNING, {job_id: time.time()})
        return state

    def payload(self, job_id: str) -> bytes | None:
        return self.raw.get(self._payload(job_id))

    def finish(self, job_id: str, status: JobStatus, **values: Any) -> str:
        """Set a final status and the `JobRecord` fields given if the job still runs ('ok');
        else its status (e.g. cancelled)."""
        pairs = [item for pair in JobRecord.hash_fields(**values).items() for item in pair]
        keys = [self._job(job_id), self._payload(job_id), self.WAITING, self.WAITING_BY_OWNER]
        args = [JobStatus(status).value, time.time(), self.result_ttl_s, job_id, *pairs]
        done = self._finish(keys=keys, args=args)
        self.redis.zrem(self.RUNNING, job_id)
        return done

    def requeue(self, job_id: str, reason: str) -> bool:
        """A running job back to queued (before a retry), in its original place."""
        keys = [self._job(job_id), self.QUEUED, self.WAITING, self.WAITING_BY_OWNER]
        queued = bool(self._requeue(keys=keys, args=[job_id, reason]))
        self.redis.zrem(self.RUNNING, job_id)
        return queued

    def touch(self, job_ids: list[str], progress: dict[str, float]) -> dict[str, bool]:
        """Heartbeat the running jobs and store their progress; which are no longer running
        (cancelled or deleted). A job with progress above 0 has started on the model: it no
        longer counts against `max_queued`. One script: a deleted job is never recreated."""
        now = time.time()
        args: list[Any] = [now]
        for job_id in job_ids:
            args += [job_id, round(progress.get(job_id, -1), 4)]
        keys = [self.WAITING, self.WAITING_BY_OWNER, *(self._job(job_id) for job_id in job_ids)]
        running = self._touch(keys=keys, args=args)
        alive = {job_id: now for job_id, flag in zip(job_ids, running, strict=True) if flag}
        if alive:
            self.redis.zadd(self.RUNNING, alive)
        return {job_id: not flag for job_id, flag in zip(job_ids, running, strict=True)}

    def stale_running(self, older_than_s: float, limit: int = 100) -> list[str]:
        """Jobs still `in_progress` whose heartbeat stopped `older_than_s` ago: their consumer
        died and their task was not handed out again (it was lost). Each is returned once per
        `older_than_s` (claimed by moving its score to now), for a fresh task. Also recounts
        the jobs waiting for the model (`recount_waiting`)."""
        self.recount_waiting()
        now = time.time()
        lost = []
        for job_id in self.redis.zrangebyscore(self.RUNNING, "-inf", now - older_than_s,
                                               start=0, num=limit):  # fmt: skip
            status, beat = self.redis.hmget(self._job(job_id), FIELD["status"], FIELD["heartbeat"])
            if status != JobStatus.IN_PROGRESS:
                self.redis.zrem(self.RUNNING, job_id)
            elif now - float(beat or 0) >= older_than_s:
                self.redis.zadd(self.RUNNING, {job_id: now})
                lost.append(job_id)
            else:
                self.redis.zadd(self.RUNNING, {job_id: float(beat)})
        return lost

    def recount_waiting(self) -> None:
        """Drop waiting jobs that are gone or final and recount each owner's (one script)."""
        self._recount(keys=[self.WAITING, self.WAITING_BY_OWNER], args=[self._job("")])

    def mark(self, job_id: str, **values: Any) -> None:
        """Set `JobRecord` fields by name (tests and repairs; state changes use the scripts)."""
        self.redis.hset(self._job(job_id), mapping=JobRecord.hash_fields(**values))
