"""Forecast session states in Redis, shared by every worker and replica of the forecast service.

Layout, under the prefix ``rnnserve:<model>:``:

- ``s:<session id>``: a hash ``v`` (version), ``m`` (model version), ``s`` (state, float32 bytes),
  ``b`` (bars seen), ``l`` (last bar, JSON), ``n`` (next-day forecast, JSON), expiring after the idle
  TTL with Redis's own ``PEXPIRE``, restarted by every use;
- ``index``: a sorted set of the session keys scored by their expiry time (Redis's clock, ``TIME``),
  so that the open sessions of every replica are counted in one place and the limit holds across
  replicas.

Each operation is one round trip: reads are one pipeline of ``HMGET``s; creating, touching, writing
and deleting are Lua scripts, which Redis runs atomically, so a state is never half written, and the
write of a batch is one compare-and-set per session on ``v``. Any Redis error (refused, timed out,
loading, read-only) becomes ``StoreUnavailableError``; redis-py's own retries are off, so a dead Redis
costs one timeout, not several.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Sequence

import numpy as np
import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.schemas.forecast import Bar, DayForecast
from services.session_store import Created, Record, SessionBackend, StoreUnavailableError

logger = logging.getLogger(__name__)

FIELDS = ("v", "m", "s", "b", "l", "n")

# KEYS: index, new key. ARGV: ttl_ms, max_sessions, then the record's field/value pairs.
# Returns {created (1) / full (0) / id taken (-1), sessions open, sessions expired just now}.
CREATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local open = redis.call('ZCARD', KEYS[1])
if open >= tonumber(ARGV[2]) then return {0, open, expired} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {-1, open, expired} end
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), KEYS[2])
return {1, open + 1, expired}
"""

# KEYS: index, session keys. ARGV: ttl_ms. Restarts each existing key's idle clock; returns its fields.
TOUCH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 2, #KEYS do
  if redis.call('PEXPIRE', KEYS[i], ARGV[1]) == 1 then
    redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), KEYS[i])
  end
  out[i - 1] = redis.call('HMGET', KEYS[i], 'v', 'm', 's', 'b', 'l', 'n')
end
return out
"""

# KEYS: index, session keys. ARGV: ttl_ms, then per key: version read, new version, s, b, l, n.
# A key is written only if its version is still the one read (a compare-and-set); returns 1/0 each.
WRITE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local out = {}
for i = 2, #KEYS do
  local a = 2 + (i - 2) * 6
  if redis.call('HGET', KEYS[i], 'v') == ARGV[a] then
    redis.call('HSET', KEYS[i], 'v', ARGV[a + 1], 's', ARGV[a + 2], 'b', ARGV[a + 3], 'l', ARGV[a + 4],
               'n', ARGV[a + 5])
    redis.call('PEXPIRE', KEYS[i], ttl)
    redis.call('ZADD', KEYS[1], 'XX', now + ttl, KEYS[i])
    out[i - 1] = 1
  else
    out[i - 1] = 0
  end
end
return out
"""

# KEYS: index, key. Returns {fields (empty when unknown), sessions open}.
DELETE = """
local fields = {}
if redis.call('EXISTS', KEYS[2]) == 1 then
  fields = redis.call('HMGET', KEYS[2], 'v', 'm', 's', 'b', 'l', 'n')
  redis.call('DEL', KEYS[2])
end
redis.call('ZREM', KEYS[1], KEYS[2])
return {fields, redis.call('ZCARD', KEYS[1])}
"""

# KEYS: index. Returns {sessions expired just now, sessions open}.
PURGE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return {expired, redis.call('ZCARD', KEYS[1])}
"""


def _bar(raw: bytes) -> Bar:
    """A bar as this module wrote it. Not validated again: it was when it arrived, and a bar that a
    later schema would refuse (a narrower date range) must still read back."""
    values = json.loads(raw)
    return Bar.model_construct(**{**values, "date": dt.date.fromisoformat(values["date"])})


class RedisBackend(SessionBackend):
    """Sessions in the Redis at ``url``; ``state_shape`` is the model's (S*layers, H)."""

    def __init__(self, url: str, max_sessions: int, ttl_s: float, state_shape: tuple[int, int],
                 timeout_s: float, prefix: str = "rnnserve:forecast:") -> None:
        super().__init__(max_sessions, ttl_s)
        self.state_shape, self.prefix = tuple(state_shape), prefix
        self.ttl_ms = int(ttl_s * 1000)
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False, health_check_interval=0)
        self.index = f"{prefix}index"
        scripts = {"create": CREATE, "touch": TOUCH, "write": WRITE, "delete": DELETE, "purge": PURGE}
        # redis-py sends EVALSHA and loads the script once on NOSCRIPT (a restarted Redis forgets them).
        self.scripts = {name: self.client.register_script(source) for name, source in scripts.items()}
        kwargs = self.client.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        self.where = f"redis {where}/{kwargs.get('db', 0)}"

    def describe(self) -> str:
        return self.where

    def key(self, session_id: str) -> str:
        return f"{self.prefix}s:{session_id}"

    def _call(self, what: str, fn):
        try:
            return fn()
        except redis.RedisError as exc:
            logger.warning("session store %s: %s failed: %s: %s", self.where, what, type(exc).__name__, exc)
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc

    # Encoding ------------------------------------------------------------------------------------

    def _fields(self, record: Record) -> list:
        state = record.state.detach().to("cpu", torch.float32).contiguous().numpy()
        return [record.version, record.model_version, state.tobytes(), record.bars_seen,
                record.last_bar.model_dump_json() if record.last_bar else "",
                record.next.model_dump_json() if record.next else ""]

    def _record(self, values: Sequence[bytes | None]) -> Record | None:
        if not values or values[0] is None:
            return None
        version, model_version, state, bars_seen, last_bar, next_day = values
        array = np.frombuffer(state or b"", dtype=np.float32)
        model_version = model_version.decode()
        layers, hidden = self.state_shape
        if array.size != layers * hidden:  # cannot come from this model: refused as another version
            model_version = f"{model_version} (a state of {array.size} values)"
            array = np.zeros(layers * hidden, dtype=np.float32)
        return Record(version=int(version), model_version=model_version,
                      state=torch.from_numpy(array.copy()).view(layers, 1, hidden),
                      last_bar=_bar(last_bar) if last_bar else None,
                      bars_seen=int(bars_seen),
                      next=DayForecast.model_validate_json(next_day) if next_day else None)

    # Operations ----------------------------------------------------------------------------------

    def create(self, session_id: str, record: Record) -> Created:
        fields = [value for pair in zip(FIELDS, self._fields(record), strict=True) for value in pair]
        status, open_sessions, expired = self._call("create", lambda: self.scripts["create"](
            keys=[self.index, self.key(session_id)], args=[self.ttl_ms, self.max_sessions, *fields]))
        if expired:
            self.on_purge(int(expired), int(open_sessions))
        if status == -1:
            raise StoreUnavailableError(f"session id {session_id} is taken")  # 2^-128: a retry fixes it
        return Created(session_id if status == 1 else None, int(open_sessions))

    def read(self, session_ids: Sequence[str], touch: bool = False) -> list[Record | None]:
        keys = [self.key(s) for s in session_ids]
        if touch:
            rows = self._call("touch", lambda: self.scripts["touch"](keys=[self.index, *keys],
                                                                     args=[self.ttl_ms]))
        else:
            def pipelined():
                pipe = self.client.pipeline(transaction=False)
                for key in keys:
                    pipe.hmget(key, FIELDS)
                return pipe.execute()
            rows = self._call("read", pipelined)
        return [self._record(row) for row in rows]

    def write(self, updates: Sequence[tuple[str, int, Record]]) -> list[bool]:
        if not updates:
            return []
        keys, args = [self.index], [self.ttl_ms]
        for session_id, version, record in updates:
            _, _, state, bars_seen, last_bar, next_day = self._fields(record)
            keys.append(self.key(session_id))
            args += [version, record.version, state, bars_seen, last_bar, next_day]
        applied = self._call("write", lambda: self.scripts["write"](keys=keys, args=args))
        return [bool(a) for a in applied]

    def delete(self, session_id: str) -> tuple[Record | None, int]:
        fields, open_sessions = self._call("delete", lambda: self.scripts["delete"](
            keys=[self.index, self.key(session_id)]))
        return self._record(fields), int(open_sessions)

    def purge_expired(self) -> tuple[int, int]:
        expired, open_sessions = self._call("purge", lambda: self.scripts["purge"](keys=[self.index]))
        if expired:
            self.on_purge(int(expired), int(open_sessions))
        return int(expired), int(open_sessions)

    def ping(self) -> None:
        self._call("ping", self.client.ping)
