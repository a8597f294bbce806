"""Where forecast session states live: one interface, kept in this process's memory by default.

``SessionBackend`` stores ``Record``s by session id and nothing else: no model, no validation (that is
``services/sessions.py``). Every write is a compare-and-set on the record's ``version``, so a step
that read version 7 and computed a new state applies only if no other step (another thread, worker or
replica) applied first; the loser re-reads and tries again. Reads and writes take a list, so the
steps of one batch cost one round trip each way (services/redis_sessions.py: a pipeline and one Lua
script).

``MemoryBackend`` is the embedded default: no dependency, and a restart loses every session, so the
forecast service then runs one worker. ``services/redis_sessions.py`` is the shared one.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from services.schemas.forecast import Bar, DayForecast


class StoreUnavailableError(Exception):
    """The session store did not answer (unreachable, timed out, refused): retryable, a 503."""


@dataclass(frozen=True)
class Record:
    """One session as stored. Never changed in place: a step writes a new record, version + 1."""

    version: int
    model_version: str
    state: torch.Tensor  # (S*layers, 1, H), float32
    last_bar: Bar | None
    bars_seen: int
    next: DayForecast | None


@dataclass(frozen=True)
class Created:
    """The answer to ``create``: the new id (None when the limit is reached) and the open count."""

    session_id: str | None
    open_sessions: int


class SessionBackend(ABC):
    """Sessions by id, with idle expiry after ``ttl_s`` and at most ``max_sessions`` open.

    Every method raises ``StoreUnavailableError`` when the store cannot answer, and then has changed
    nothing or exactly what a success would have (a write is atomic); never half of it.
    """

    def __init__(self, max_sessions: int, ttl_s: float) -> None:
        self.max_sessions, self.ttl_s = max_sessions, ttl_s
        # Called with (sessions that expired just now, sessions still open) whenever idle sessions
        # are dropped, by any call: the owner keeps its metrics with it.
        self.on_purge: Callable[[int, int], None] = lambda expired, open_sessions: None

    @abstractmethod
    def create(self, session_id: str, record: Record) -> Created:
        """Stores a new session unless ``max_sessions`` are open (counted after expiring idle ones)."""

    @abstractmethod
    def read(self, session_ids: Sequence[str], touch: bool = False) -> list[Record | None]:
        """The records of ``session_ids`` (None: unknown or expired), in one round trip; ``touch``
        restarts their idle clocks."""

    @abstractmethod
    def write(self, updates: Sequence[tuple[str, int, Record]]) -> list[bool]:
        """For each (id, version read, new record): stores it and restarts the idle clock only if the
        stored version is still the one read. One round trip; whether each applied."""

    @abstractmethod
    def delete(self, session_id: str) -> tuple[Record | None, int]:
        """Removes a session; (its record or None, sessions still open)."""

    @abstractmethod
    def purge_expired(self) -> tuple[int, int]:
        """Forgets sessions idle longer than the TTL; (how many now, sessions still open)."""

    def expired_recently(self, session_id: str) -> bool:
        """Whether ``session_id`` is known to have expired (for a clearer 404); False when unknown."""
        return False

    @abstractmethod
    def ping(self) -> None:
        """Raises ``StoreUnavailableError`` when the store cannot answer now."""

    def describe(self) -> str:
        """The store, for messages and readiness (never a password)."""
        return "memory"


class MemoryBackend(SessionBackend):
    """This process's memory, least recently used first, behind one lock."""

    def __init__(self, max_sessions: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(max_sessions, ttl_s)
        self.clock = clock
        self.records: OrderedDict[str, tuple[Record, float]] = OrderedDict()  # id -> (record, last used)
        self.expired: OrderedDict[str, None] = OrderedDict()  # recent expiries, for clearer 404s
        self.lock = threading.Lock()

    def _purge(self) -> int:
        now, count = self.clock(), 0
        while self.records:
            session_id, (_, last_used) = next(iter(self.records.items()))
            if now - last_used <= self.ttl_s:
                break
            del self.records[session_id]
            self.expired[session_id] = None
            count += 1
        while len(self.expired) > self.max_sessions:
            self.expired.popitem(last=False)
        if count:
            self.on_purge(count, len(self.records))
        return count

    def _put(self, session_id: str, record: Record) -> None:
        self.records[session_id] = (record, self.clock())
        self.records.move_to_end(session_id)

    def create(self, session_id: str, record: Record) -> Created:
        with self.lock:
            self._purge()
            if len(self.records) >= self.max_sessions:
                return Created(None, len(self.records))
            self._put(session_id, record)
            return Created(session_id, len(self.records))

    def read(self, session_ids: Sequence[str], touch: bool = False) -> list[Record | None]:
        with self.lock:
            self._purge()
            found = []
            for session_id in session_ids:
                entry = self.records.get(session_id)
                found.append(entry[0] if entry else None)
                if entry and touch:
                    self._put(session_id, entry[0])
            return found

    def write(self, updates: Sequence[tuple[str, int, Record]]) -> list[bool]:
        with self.lock:
            applied = []
            for session_id, version, record in updates:
                entry = self.records.get(session_id)
                ok = entry is not None and entry[0].version == version
                if ok:
                    self._put(session_id, record)
                applied.append(ok)
            return applied

    def delete(self, session_id: str) -> tuple[Record | None, int]:
        with self.lock:
            self._purge()
            entry = self.records.pop(session_id, None)
            return (entry[0] if entry else None), len(self.records)

    def purge_expired(self) -> tuple[int, int]:
        with self.lock:
            return self._purge(), len(self.records)

    def expired_recently(self, session_id: str) -> bool:
        with self.lock:
            return session_id in self.expired

    def ping(self) -> None:
        """This process's memory always answers."""
