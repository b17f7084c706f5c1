"""A tamper-evident audit log of the lb's calls: an append-only file of JSON lines, one per call, each
record chained to the one before it by its hash.

    {"call_id":"chatcmpl-...","client":"10.0.0.5:51234","deployment":"smollm2","hash":"...",
     "input_sha256":"...","method":"chat","output_sha256":"...","prev":"...","principal":"alice",
     "seq":7,"status":200,"time":"2025-05-01T12:00:00.123456Z"}

`hash` is the SHA-256 of the record's canonical JSON without `hash` (keys sorted, no spaces, ASCII), and
each line is the canonical JSON of the whole record, so changing any byte of a line breaks that record;
`seq` counts from 1 and `prev` is the hash of the record before (64 zeros for the first), so a removed
or moved line breaks the chain where it was. Records cut off the end leave a valid, shorter chain: keep
the last hash that `clowderctl audit verify` prints somewhere else to detect that.

The texts are not kept, only their digests: `input_sha256` over the canonical JSON of the messages (chat)
or of the prompt (completion) as the model received them (prompts and conversation history included),
`output_sha256` over the canonical JSON list of the choices' texts as the caller received them.

One thread writes the records, in the order the calls ended, so that no call waits for the disk. It
writes what has queued since its last write, flushes it and fsyncs it before it takes more (group
commit): one fsync per record while calls are few, one per batch under load, so that the time of an fsync
(about 0.1 ms on the disk this was measured on, milliseconds on a spinning one) does not cap the lb's
calls per second. A crash loses at most the records still queued, never the chain.
A restart continues the chain from the last record. A last line without its newline (a crash in the
middle of a write) or a last record that does not verify stops the log from opening, with the reason:
the chain is never silently continued from a broken end.

The factory reads `shared.audit_log`: the lb's `AuditLog`, or None when the lb keeps no audit log. The
lb opens it at start (one file for all deployments) and closes it at shutdown.
"""
from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import logging
import os
import queue
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

GENESIS = "0" * 64  # the `prev` of the first record
QUEUE_LIMIT = 100_000  # records waiting for the writer; past this, records are dropped (and counted)
TAIL_BLOCK = 64 * 1024



def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def input_digest(call: Call) -> str:
    return sha256_hex(canonical(call.messages if call.messages is not None else call.prompt))


def output_digest(texts: list[str]) -> str:
    return sha256_hex(canonical(texts))


def rfc3339(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(
        timespec="microseconds").replace("+00:00", "Z")


class BadRecord(Exception):
    """A line that is not the next valid record; the message says what is wrong."""

    def __init__(self, problem: str, seq: int | None = None):
        super().__init__(problem)
        self.seq = seq  # the line's seq, when it could be read


def parse_record(line: bytes) -> dict:
    """The record on `line` (with its newline), checked on its own: parsable, hash and canonical form."""
    if not line.endswith(b"\n"):
        raise BadRecord("torn last line: it does not end with a newline (a crash while writing?)")
    try:
        record = json.loads(line)
    except ValueError as e:
        raise BadRecord(f"unparsable line: {e}") from None
    if not isinstance(record, dict):
        raise BadRecord("unparsable line: not a JSON object")
    if type(record.get("seq")) is not int:
        raise BadRecord('field "seq" is missing or not an integer')
    for name in ("prev", "hash"):
        if not isinstance(record.get(name), str):
            raise BadRecord(f"field {name!r} is missing or not a string", record["seq"])
    content = {k: v for k, v in record.items() if k != "hash"}
    if sha256_hex(canonical(content)) != record["hash"]:
        raise BadRecord('hash mismatch: the record\'s content does not hash to its "hash"', record["seq"])
    if canonical(record) + b"\n" != line:
        raise BadRecord("the line is not the record's canonical JSON (bytes outside its values were changed)",
                        record["seq"])
    return record


def next_record(line: bytes, seq: int, prev: str) -> dict:
    """The record on `line`, which must be record `seq`, chained to the record whose hash is `prev`."""
    record = parse_record(line)
    if record["seq"] != seq:
        raise BadRecord(f"gap in seq: expected {seq}, found {record['seq']} (a record is missing or out of "
                        "order)", record["seq"])
    if record["prev"] != prev:
        raise BadRecord(f'broken prev link: "prev" is not the hash of the record before (seq {seq - 1})',
                        record["seq"])
    return record


@dataclass
class VerifyResult:
    ok: bool
    records: int            # records that verified, all of them when ok
    last_hash: str          # the hash of the last record that verified
    line: int | None = None  # the first bad line (1-based), when not ok
    seq: int | None = None   # its seq, when it could be read
    problem: str | None = None

    def describe(self) -> str:
        if self.ok:
            return f"ok: {self.records} records (last hash {self.last_hash})"
        where = f"seq {self.seq}" if self.seq is not None else f"after seq {self.records}"
        return f"tampered: line {self.line} ({where}): {self.problem}"

    def as_dict(self) -> dict:
        return asdict(self)


def verify(path: Path) -> VerifyResult:
    """Check every record and link of the audit log at `path`; name the first one that is wrong."""
    records, prev = 0, GENESIS
    with _open_for_reading(path) as f:
        for number, line in enumerate(f, 1):
            try:
                record = next_record(line, records + 1, prev)
            except BadRecord as e:
                return VerifyResult(False, records, prev, number, e.seq, str(e))
            records, prev = record["seq"], record["hash"]
    return VerifyResult(True, records, prev)


def _open_for_reading(path: Path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise InvalidInput(f"{path}: cannot read the audit log: {e.strerror}") from None


def last_record(path: Path) -> tuple[int, str]:
    """The seq and hash of the file's last record (0 and GENESIS when it has none), which must verify
    on its own. Reads only the end of the file."""
    with _open_for_reading(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return 0, GENESIS
        start, data = size, b""
        while start > 0 and data.rfind(b"\n", 0, len(data) - 1) < 0:  # until the last line's start is in
            start = max(0, start - TAIL_BLOCK)
            f.seek(start)
            data = f.read(size - start)
    try:
        record = parse_record(data[data.rfind(b"\n", 0, len(data) - 1) + 1:])
    except BadRecord as e:
        raise InvalidInput(f"{path}: the last record does not verify ({e}); the chain cannot continue from it. "
                           "`clowderctl audit verify` names the first bad line; move the file aside to start a "
                           "new log, or cut the bad end off") from None
    return record["seq"], record["hash"]


class AuditLog:
    """The hash-chained log file: `append` queues a record for the writer thread and returns at once."""

    def __init__(self, path: Path, queue_limit: int = QUEUE_LIMIT):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "ab")
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
            if mode & 0o077:
                raise InvalidInput(f"{self.path}: the audit log has mode {mode:04o}; it must be readable by "
                                   "clowderd alone (chmod 600)")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InvalidInput(f"{self.path}: another process is writing this audit log") from None
            self._seq, self._prev = last_record(self.path)
        except BaseException:
            self._file.close()
            raise
        self._queue: queue.Queue = queue.Queue(queue_limit)
        self._broken: str | None = None  # why writing stopped
        self._dropped = Dropped(log, "audit records dropped", path=str(self.path))
        self._thread = threading.Thread(target=self._write_loop, name=f"audit {self.path.name}", daemon=True)
        self._thread.start()

    def append(self, make_fields: Callable[[], dict]) -> None:
        """Queue a record; `make_fields` runs on the writer thread (so that hashing texts stays off the
        event loop) and returns the record's fields, less seq, prev and hash."""
        if self._broken is not None:
            self._dropped.add(reason=f"writing stopped: {self._broken}")
            return
        try:
            self._queue.put_nowait(make_fields)
        except queue.Full:
            self._dropped.add(reason=f"{self._queue.maxsize} records are waiting for the disk")

    def close(self) -> None:
        """Write what is queued, then close the file."""
        self._queue.put(CLOSE)
        self._thread.join()
        self._file.close()

    @property
    def dropped(self) -> int:
        return self._dropped.count

    def _write_loop(self) -> None:
        closing = False
        while not closing:
            batch, closing = take_batch(self._queue)
            lines = [line for make in batch if (line := self._record(make)) is not None]
            if self._broken is not None:
                for _ in lines:
                    self._dropped.add(reason=f"writing stopped: {self._broken}")
                continue
            if not lines:
                continue
            try:
                self._file.write(b"".join(lines))
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as e:
                self._broken = f"{self.path}: {e.strerror}"
                self._dropped.count += len(lines)
                log.error("audit log write failed; no more records are written until clowderd restarts",
                          extra={"path": str(self.path), "error": e.strerror, "records": len(lines)})

    def _record(self, make_fields: Callable[[], dict]) -> bytes | None:
        try:
            record = dict(make_fields())
        except Exception:
            log.exception("audit record could not be made", extra={"path": str(self.path)})
            return None
        record.update(seq=self._seq + 1, prev=self._prev)
        record["hash"] = sha256_hex(canonical(record))
        self._seq, self._prev = record["seq"], record["hash"]
        return canonical(record) + b"\n"


def call_record(call: Call, outcome: Outcome, ended: float) -> dict:
    return {"time": rfc3339(ended), "call_id": call.id, "deployment": call.model, "principal": call.principal,
            "client": call.client, "method": call.method, "status": outcome.status,
            "input_sha256": input_digest(call), "output_sha256": output_digest(outcome.texts)}


class Audit(Middleware):
    name = "audit"

    def __init__(self, audit_log: AuditLog):
        self.audit_log = audit_log

    async def on_outcome(self, call: Call, outcome: Outcome) -> None:
        ended = time.time()
        self.audit_log.append(lambda: call_record(call, outcome, ended))


def create(config: dict, policy, shared) -> Middleware | None:
    return Audit(shared.audit_log) if shared.audit_log is not None else None
