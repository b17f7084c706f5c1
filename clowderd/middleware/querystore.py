"""Storage of queries and responses, from the aimage configuration's `query_storage`:

    query_storage:
      enabled: true
      store: [query, response, metadata]   # what is kept of each call (the default: all three)
      retention_days: 30                   # without it, rows are kept until deleted
      redact_patterns: ['\\b\\d{13,16}\\b']   # Python regular expressions, replaced by "[redacted]"

Every call of the deployment, answered, refused or failed, becomes one row: its id, deployment, time,
method and status always; the query (the messages or the prompt as the model received them, prompts and
conversation history included), the response (each choice's text as the caller received it) and the
metadata (caller, sampling, usage, finish reasons, replica, seconds, error) as `store` says. The redact
patterns are applied to every text the caller or the model wrote (message contents, prompt, response
texts, the caller's `user` and `metadata` values) before anything is written. A row expires
`retention_days` after its call, as configured when it was written; expired rows are deleted hourly.

The rows go to a SQLite database (WAL, mode 0600) through one writer thread, in batches: a call never
waits for the database. `QueryStore.find` reads them back, newest first.

The factory reads `config["query_storage"]` and calls `shared.query_store()`: the lb's one `QueryStore`
for all deployments, opened on first use (as `shared.conversations()` is) and closed at shutdown.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import re
import sqlite3
import stat
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from clowderd.errors import InvalidInput
from clowderd.middleware.base import Call, Middleware, Outcome
from clowderd.middleware.batches import CLOSE, take_batch
from clowderd.middleware.dropped import Dropped

log = logging.getLogger(__name__)

DEFAULT_STORE = ("query", "response", "metadata")
REDACTED = "[redacted]"
QUEUE_LIMIT = 10_000  # rows waiting for the writer; past this, rows are dropped (and counted)
PURGE_INTERVAL_S = 3600.0
BUSY_TIMEOUT_S = 30.0  # how long a write waits for another writer of the file
DAY_S = 86400.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS queries (
    call_id TEXT NOT NULL, deployment TEXT NOT NULL, time REAL NOT NULL, method TEXT NOT NULL,
    status INTEGER NOT NULL, query TEXT, response TEXT, metadata TEXT, expires REAL);
CREATE INDEX IF NOT EXISTS queries_deployment_time ON queries (deployment, time);
CREATE INDEX IF NOT EXISTS queries_time ON queries (time);
CREATE INDEX IF NOT EXISTS queries_expires ON queries (expires) WHERE expires IS NOT NULL;
"""
COLUMNS = "call_id, deployment, time, method, status, query, response, metadata, expires"



@dataclass
class StoredQuery:
    call_id: str
    deployment: str
    time: float                       # when the call ended, seconds since the epoch
    method: str
    status: int
    query: list[dict] | str | None     # the messages (chat) or the prompt (completion), when kept
    response: list[str] | None         # each choice's text, when kept
    metadata: dict | None
    expires: float | None

    def row(self) -> tuple:
        return (self.call_id, self.deployment, self.time, self.method, self.status, _json(self.query),
                _json(self.response), _json(self.metadata), self.expires)

    @classmethod
    def from_row(cls, row: tuple) -> "StoredQuery":
        *head, query, response, metadata, expires = row
        return cls(*head, _unjson(query), _unjson(response), _unjson(metadata), expires)

    def as_dict(self) -> dict:
        return asdict(self)


def _json(value) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def _unjson(text: str | None):
    return None if text is None else json.loads(text)


class QueryStore:
    """The rows in one SQLite file. `add` queues a row for the writer thread (started on first use) and
    returns at once; `find` and `purge` block, so call them off the event loop."""

    def __init__(self, path: Path, queue_limit: int = QUEUE_LIMIT):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))  # SQLite gives its WAL the same mode
        mode = stat.S_IMODE(os.stat(self.path).st_mode)
        if mode & 0o077:
            raise InvalidInput(f"{self.path}: the query store has mode {mode:04o}; it must be readable by "
                               "clowderd alone (chmod 600)")
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                       timeout=BUSY_TIMEOUT_S)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise InvalidInput(f"{self.path}: cannot open the query store: {e}") from None
        self._lock = threading.Lock()  # the connection's
        self._writer_started = threading.Lock()
        self._queue: queue.Queue = queue.Queue(queue_limit)
        self._writer: threading.Thread | None = None
        self._dropped = Dropped(log, "stored queries dropped", path=str(self.path))

    def add(self, make_row: Callable[[], StoredQuery]) -> None:
        """Queue a row; `make_row` runs on the writer thread (so that redaction stays off the event loop)."""
        with self._writer_started:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name=f"query store {self.path.name}",
                                                daemon=True)
                self._writer.start()
        try:
            self._queue.put_nowait(make_row)
        except queue.Full:
            self._dropped.add(reason=f"{self._queue.maxsize} rows are waiting for the database")

    def find(self, deployment: str | None = None, since: float | None = None, until: float | None = None,
             limit: int = 100) -> list[StoredQuery]:
        """The rows of `deployment` (every deployment when None) whose calls ended in [since, until),
        newest first, at most `limit`."""
        where, args = [], []
        for clause, value in (("deployment = ?", deployment), ("time >= ?", since), ("time < ?", until)):
            if value is not None:
                where.append(clause)
                args.append(value)
        sql = (f"SELECT {COLUMNS} FROM queries {'WHERE ' + ' AND '.join(where) if where else ''} "
               "ORDER BY time DESC LIMIT ?")
        with self._lock:
            rows = self._db.execute(sql, (*args, limit)).fetchall()
        return [StoredQuery.from_row(row) for row in rows]

    def purge(self, now: float | None = None) -> int:
        """Delete the rows past their retention; how many went."""
        with self._lock:
            return self._db.execute("DELETE FROM queries WHERE expires < ?",
                                    (time.time() if now is None else now,)).rowcount

    def close(self) -> None:
        """Write what is queued, then close the database."""
        if self._writer is not None:
            self._queue.put(CLOSE)
            self._writer.join()
        self._db.close()

    @property
    def dropped(self) -> int:
        return self._dropped.count

    def _write_loop(self) -> None:
        next_purge = time.monotonic()
        closing = False
        while not closing:
            batch, closing = take_batch(self._queue, max(0.0, next_purge - time.monotonic()))
            rows = [row for make in batch if (row := self._row(make)) is not None]
            if rows:
                self._insert(rows)
            if time.monotonic() >= next_purge:
                next_purge = time.monotonic() + PURGE_INTERVAL_S
                try:
                    purged = self.purge()
                except sqlite3.Error as e:
                    log.error("query store purge failed", extra={"path": str(self.path), "error": str(e)})
                else:
                    if purged:
                        log.info("expired queries deleted", extra={"path": str(self.path), "rows": purged})

    def _row(self, make_row: Callable[[], StoredQuery]) -> tuple | None:
        try:
            return make_row().row()
        except Exception:
            log.exception("stored query could not be made", extra={"path": str(self.path)})
            return None

    def _insert(self, rows: list[tuple]) -> None:
        try:
            with self._lock:
                self._db.execute("BEGIN")
                try:
                    self._db.executemany(f"INSERT INTO queries ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                         rows)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
        except sqlite3.Error as e:
            self._dropped.count += len(rows)
            log.error("stored queries not written", extra={"path": str(self.path), "error": str(e),
                                                           "rows": len(rows), "dropped": self.dropped})


def compile_patterns(patterns: list[str]) -> list[re.Pattern]:
    compiled = []
    for i, pattern in enumerate(patterns):
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise InvalidInput(f"query_storage.redact_patterns[{i}]: {pattern!r} is not a valid regular "
                               f"expression: {e}") from None
    return compiled


class StoreQueries(Middleware):
    name = "query-storage"

    def __init__(self, section: dict, store: QueryStore):
        self.store = store
        self.keep = frozenset(section.get("store", DEFAULT_STORE))
        self.retention_days = section.get("retention_days")
        self.patterns = compile_patterns(section.get("redact_patterns", []))

    async def on_outcome(self, call: Call, outcome: Outcome) -> None:
        ended = time.time()
        self.store.add(lambda: self.stored(call, outcome, ended))

    def stored(self, call: Call, outcome: Outcome, ended: float) -> StoredQuery:
        """The row of a call that ended at `ended`, with what `store` keeps, redacted."""
        query = response = metadata = None
        if "query" in self.keep:
            query = ([{**m, "content": self.redact(m["content"])} for m in call.messages]
                     if call.messages is not None else self.redact(call.prompt or ""))
        if "response" in self.keep:
            response = [self.redact(text) for text in outcome.texts]
        if "metadata" in self.keep:
            metadata = {"principal": call.principal, "user": self.redact(call.user), "client": call.client,
                        "metadata": {k: self.redact(v) for k, v in call.metadata.items()},
                        "sampling": call.sampling, "usage": outcome.usage, "finish_reasons": outcome.finish_reasons,
                        "replica": outcome.replica, "seconds": outcome.seconds, "error": outcome.error}
        expires = ended + self.retention_days * DAY_S if self.retention_days else None
        return StoredQuery(call.id, call.model, ended, call.method, outcome.status, query, response, metadata,
                           expires)

    def redact(self, text: str) -> str:
        for pattern in self.patterns:
            text = pattern.sub(REDACTED, text)
        return text


def create(config: dict, policy, shared) -> Middleware | None:
    section = config.get("query_storage") or {}
    if not section.get("enabled"):
        return None
    return StoreQueries(section, shared.query_store())
