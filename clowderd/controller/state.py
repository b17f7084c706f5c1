"""The controller's desired and observed state: one SQLite database (WAL) in its data directory.

- nodes: who joined (id, name), how to reach them, what they last reported (description, inventory,
  replicas, heartbeat time) and what the admin set (labels, cordon, drain);
- certificates: every certificate the cluster CA issued to a node (serial, node, roles, end), and
  whether it was revoked;
- secrets: digests of the join and admin tokens;
- events: append-only, the newest EVENTS_KEPT kept;
- deployments and replicas: what users asked for, and the replicas placed on nodes with what the
  nodes report back about each. Placing is the scheduler's; `assign`/`unassign` are its writes and
  `assignments` is what a node is told to run. A replica removed from a node is terminating until the
  node no longer reports it (or is unreachable): its row, and the memory it claims, stay until then.

ClusterState is synchronous and not thread-safe: one connection, each method one short
transaction. The controller calls it from one thread (see cluster.py); tests call it directly.
The schema version is SQLite's user_version; MIGRATIONS[n] takes a database from version n to n+1.
"""
from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from google.protobuf import json_format
from google.protobuf.message import Message

from clowder.v1 import common_pb2, controller_pb2
from clowderd.config import LABEL_KEY_RE
from clowderd.controller.images import ResolvedImage
from clowderd.errors import AlreadyExists, Conflict, InvalidInput, NotFound, StoreError

READY, UNREACHABLE = "ready", "unreachable"
NORMAL, WARNING = "Normal", "Warning"
EVENTS_KEPT = 10_000
LABEL_VALUE_MAX = 253

MIGRATIONS: tuple[str, ...] = ("""
CREATE TABLE secrets (
    name       TEXT PRIMARY KEY,          -- 'join', 'admin'
    sha256     TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE nodes (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL UNIQUE,
    credential_sha256 TEXT NOT NULL,
    roles             TEXT NOT NULL,      -- role names, comma-separated
    worker_address    TEXT NOT NULL,      -- '' without the worker role
    info              TEXT NOT NULL,      -- NodeInfo as JSON, as of the last join, without inventory
    inventory         TEXT NOT NULL,      -- ResourceInventory as JSON, from the last heartbeat
    reported_replicas TEXT NOT NULL,      -- JSON array of ReplicaStatus, from the last heartbeat
    labels            TEXT NOT NULL,      -- JSON object: the labels set by the admin
    cordoned          INTEGER NOT NULL DEFAULT 0,
    draining          INTEGER NOT NULL DEFAULT 0,
    state             TEXT NOT NULL CHECK (state IN ('ready', 'unreachable')),
    state_since       REAL NOT NULL,
    joined_at         REAL NOT NULL,
    last_heartbeat    REAL NOT NULL
);
CREATE TABLE events (
    revision    INTEGER PRIMARY KEY AUTOINCREMENT,
    time        REAL NOT NULL,
    severity    TEXT NOT NULL CHECK (severity IN ('Normal', 'Warning')),
    reason      TEXT NOT NULL,
    object_kind TEXT NOT NULL,
    object_name TEXT NOT NULL,
    node_name   TEXT NOT NULL,
    message     TEXT NOT NULL
);
CREATE INDEX events_by_object ON events (object_kind, object_name, revision);
CREATE TABLE deployments (
    name       TEXT PRIMARY KEY,
    spec       TEXT NOT NULL,             -- DeploymentSpec as JSON
    generation INTEGER NOT NULL,          -- bumped by every change of spec
    labels     TEXT NOT NULL,             -- JSON object
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE replicas (
    id                  TEXT PRIMARY KEY,
    deployment          TEXT NOT NULL,
    node_id             TEXT REFERENCES nodes (id),  -- NULL: not placed yet
    spec                TEXT NOT NULL,               -- ReplicaSpec as JSON: what the node runs
    observed_state      TEXT NOT NULL DEFAULT '',    -- ReplicaState name, '' until the node reports it
    observed_message    TEXT NOT NULL DEFAULT '',
    observed_generation INTEGER NOT NULL DEFAULT 0,
    observed_at         REAL NOT NULL DEFAULT 0,
    created_at          REAL NOT NULL
);
CREATE INDEX replicas_by_node ON replicas (node_id);
CREATE INDEX replicas_by_deployment ON replicas (deployment);
""", """
ALTER TABLE nodes ADD COLUMN stored_manifests TEXT NOT NULL DEFAULT '[]';  -- JSON array, from the last heartbeat
ALTER TABLE deployments ADD COLUMN image TEXT NOT NULL DEFAULT '{}';  -- the image as resolved (ResolvedImage)
ALTER TABLE replicas ADD COLUMN memory INTEGER NOT NULL DEFAULT 0;       -- bytes claimed on the node (CPU)
ALTER TABLE replicas ADD COLUMN gpu_memory TEXT NOT NULL DEFAULT '{}';  -- JSON: GPU uuid -> bytes claimed
ALTER TABLE replicas ADD COLUMN pending_reason TEXT NOT NULL DEFAULT '';  -- why it is not placed
ALTER TABLE replicas ADD COLUMN preempted_by TEXT NOT NULL DEFAULT '';   -- what evicted it, until placed again
ALTER TABLE replicas ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;     -- failed starts in a row
ALTER TABLE replicas ADD COLUMN failed_generation INTEGER NOT NULL DEFAULT 0;  -- the last one counted
ALTER TABLE replicas ADD COLUMN restart_at REAL NOT NULL DEFAULT 0;      -- 0: no restart due
""", """
ALTER TABLE replicas ADD COLUMN terminating_since REAL NOT NULL DEFAULT 0;  -- removed, its node still runs it
ALTER TABLE replicas ADD COLUMN terminating_reason TEXT NOT NULL DEFAULT '';
""", """
ALTER TABLE replicas ADD COLUMN terminating_grace REAL NOT NULL DEFAULT 0;  -- seconds to finish calls; 0: default
""", """
CREATE TABLE certificates (
    serial     TEXT PRIMARY KEY,           -- hex
    node_id    TEXT NOT NULL,              -- kept after the node's record is gone (revoked)
    node_name  TEXT NOT NULL,
    roles      TEXT NOT NULL,              -- role names, comma-separated
    issued_at  REAL NOT NULL,
    not_after  REAL NOT NULL,
    revoked_at REAL NOT NULL DEFAULT 0     -- 0: not revoked
);
CREATE INDEX certificates_by_node ON certificates (node_id);
ALTER TABLE nodes DROP COLUMN credential_sha256;  -- nodes are who their certificates say
""")
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass
class NodeRecord:
    id: str
    name: str
    roles: list[str]
    worker_address: str
    info: common_pb2.NodeInfo  # as of its last join, with the inventory of its last heartbeat
    replicas: list[common_pb2.ReplicaStatus]
    labels: dict[str, str]  # set by the admin
    cordoned: bool
    draining: bool
    state: str
    state_since: float
    joined_at: float
    last_heartbeat: float
    stored_manifests: list[str]  # manifest digests in its content store, as of its last heartbeat

    def effective_labels(self) -> dict[str, str]:
        """The node's own labels, overridden by the admin's."""
        return {**self.info.labels, **self.labels}


@dataclass
class EventRecord:
    revision: int
    time: float
    severity: str
    reason: str
    object_kind: str
    object_name: str
    node_name: str
    message: str


@dataclass
class ReplicaRecord:
    id: str
    deployment: str
    node_id: str | None  # None: not placed
    spec: common_pb2.ReplicaSpec
    observed_state: str  # ReplicaState name as the node reports it, '' before it does
    observed_message: str
    observed_generation: int
    observed_at: float
    memory: int  # bytes of node memory claimed (a CPU replica)
    gpu_memory: dict[str, int]  # GPU uuid -> bytes claimed
    pending_reason: str
    preempted_by: str
    failures: int
    failed_generation: int
    restart_at: float
    created_at: float
    terminating_since: float = 0.0  # 0: not removed
    terminating_reason: str = ""

    @property
    def terminating(self) -> bool:
        return bool(self.terminating_since)

    @property
    def ready(self) -> bool:
        return self.node_id is not None and self.observed_state == "READY" \
            and self.observed_generation == self.spec.generation and not self.terminating


@dataclass
class DeploymentRecord:
    name: str
    spec: controller_pb2.DeploymentSpec
    generation: int
    labels: dict[str, str]
    image: ResolvedImage
    created_at: float
    updated_at: float

    @property
    def etag(self) -> str:
        return f"{self.generation}.{int(self.updated_at * 1e6)}"


def _to_json(message: Message) -> str:
    return json.dumps(json_format.MessageToDict(message), separators=(",", ":"), sort_keys=True)


def _from_json(text: str, cls: type) -> Any:
    return json_format.ParseDict(json.loads(text), cls(), ignore_unknown_fields=True)


class ClusterState:
    def __init__(self, path: Path):
        self.path = path
        self._conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._migrate()
        row = self._conn.execute("SELECT MAX(revision) FROM events").fetchone()
        self.last_event_revision: int = row[0] or 0
        self._pending_revision = self.last_event_revision

    def close(self) -> None:
        self._conn.close()

    def _migrate(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path}: controller database schema version {version}, this clowderd "
                             f"reads versions up to {SCHEMA_VERSION}")
        for n in range(version, SCHEMA_VERSION):
            try:
                self._conn.executescript(f"BEGIN IMMEDIATE; {MIGRATIONS[n]}; PRAGMA user_version = {n + 1}; COMMIT;")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            self._pending_revision = self.last_event_revision
            raise
        self._conn.execute("COMMIT")
        self.last_event_revision = self._pending_revision

    # -- secrets ----------------------------------------------------------------------------------

    def secret(self, name: str) -> tuple[str, float] | None:
        """The SHA-256 digest of secret `name` ('join', 'admin') and when it was set."""
        row = self._conn.execute("SELECT sha256, created_at FROM secrets WHERE name = ?", (name,)).fetchone()
        return None if row is None else (row["sha256"], row["created_at"])

    def set_secret(self, name: str, sha256: str, now: float) -> None:
        with self._write() as db:
            db.execute("INSERT INTO secrets (name, sha256, created_at) VALUES (?, ?, ?) ON CONFLICT (name) "
                       "DO UPDATE SET sha256 = excluded.sha256, created_at = excluded.created_at",
                       (name, sha256, now))

    # -- events -----------------------------------------------------------------------------------

    def add_event(self, severity: str, reason: str, object_kind: str, object_name: str, message: str,
                  now: float, node_name: str = "") -> None:
        with self._write():
            self._event(severity, reason, object_kind, object_name, message, now, node_name)

    def _event(self, severity: str, reason: str, object_kind: str, object_name: str, message: str,
               now: float, node_name: str = "") -> None:
        cur = self._conn.execute(
            "INSERT INTO events (time, severity, reason, object_kind, object_name, node_name, message) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)", (now, severity, reason, object_kind, object_name, node_name, message))
        self._pending_revision = cur.lastrowid
        self._conn.execute("DELETE FROM events WHERE revision <= ?", (cur.lastrowid - EVENTS_KEPT,))

    def events(self, after_revision: int = 0, *, object_kind: str = "", object_name: str = "",
               since: float = 0.0, limit: int = 1000) -> list[EventRecord]:
        """Events after a revision, oldest first, only those about the object when one is named."""
        sql = "SELECT * FROM events WHERE revision > ? AND time >= ?"
        args: list[Any] = [after_revision, since]
        if object_kind:
            sql += " AND object_kind = ?"
            args.append(object_kind)
        if object_name:
            sql += " AND object_name = ?"
            args.append(object_name)
        rows = self._conn.execute(sql + " ORDER BY revision LIMIT ?", (*args, limit)).fetchall()
        return [EventRecord(**dict(row)) for row in rows]

    # -- nodes: membership ------------------------------------------------------------------------

    def enroll_node(self, info: common_pb2.NodeInfo, now: float) -> tuple[NodeRecord, list[str]]:
        """A node that joined with the join token, and the serials of certificates this revoked. A new node,
        unless an unreachable node has its name: then that node (a reinstalled machine keeps its id,
        labels and cordon), whose earlier certificates are revoked (their key is gone with the machine, or
        in other hands). AlreadyExists when a ready node has the name."""
        with self._write() as db:
            row = db.execute("SELECT id, state FROM nodes WHERE name = ?", (info.name,)).fetchone()
            if row is not None and row["state"] == READY:
                raise AlreadyExists(f"node name {info.name!r} is taken by node {row['id']}, which is heartbeating; "
                                    "give this node another name (node_name in its clowderd.toml)")
            columns = self._reported_columns(info, "")
            revoked: list[str] = []
            if row is None:
                node_id = f"node-{secrets.token_hex(6)}"
                db.execute(
                    "INSERT INTO nodes (id, name, roles, worker_address, info, inventory, reported_replicas, "
                    "labels, state, state_since, joined_at, last_heartbeat) "
                    "VALUES (?, ?, ?, ?, ?, ?, '[]', '{}', ?, ?, ?, ?)",
                    (node_id, info.name, *columns, READY, now, now, now))
                message = f"node {info.name} joined as {node_id}"
            else:
                node_id = row["id"]
                db.execute("UPDATE nodes SET roles = ?, worker_address = ?, info = ?, inventory = ?, "
                           "reported_replicas = '[]', state = ?, state_since = ?, joined_at = ?, last_heartbeat = ? "
                           "WHERE id = ?", (*columns, READY, now, now, now, node_id))
                revoked = self._revoke_certificates(node_id, now)
                message = (f"node {info.name} joined with the join token and took over node {node_id}, which was "
                           f"unreachable ({len(revoked)} earlier certificate(s) revoked)")
            self._event(NORMAL, "NodeJoined", "Node", info.name, message, now, info.name)
        return self.node(node_id), revoked

    def register_node(self, node_id: str, info: common_pb2.NodeInfo, worker_address: str, now: float) -> NodeRecord:
        """A member (re)announced itself after a start or a broken session: its description is updated and it
        is ready. A member whose record is gone (the controller's state was reset) gets one again.
        AlreadyExists when another node has the name."""
        with self._write() as db:
            row = db.execute("SELECT name, state FROM nodes WHERE id = ?", (node_id,)).fetchone()
            other = db.execute("SELECT id FROM nodes WHERE name = ? AND id != ?", (info.name, node_id)).fetchone()
            if other is not None:
                raise AlreadyExists(f"node {node_id} cannot take the name {info.name!r}: node {other['id']} has it")
            columns = self._reported_columns(info, worker_address)
            if row is None:
                db.execute(
                    "INSERT INTO nodes (id, name, roles, worker_address, info, inventory, reported_replicas, "
                    "labels, state, state_since, joined_at, last_heartbeat) "
                    "VALUES (?, ?, ?, ?, ?, ?, '[]', '{}', ?, ?, ?, ?)",
                    (node_id, info.name, *columns, READY, now, now, now))
                self._event(NORMAL, "NodeRegistered", "Node", info.name,
                            f"node {info.name} ({node_id}) registered with its certificate", now, info.name)
                return self.node(node_id)
            db.execute("UPDATE nodes SET name = ?, roles = ?, worker_address = ?, info = ?, inventory = ?, "
                       "last_heartbeat = ? WHERE id = ?", (info.name, *columns, now, node_id))
            if row["state"] != READY:
                self._set_ready(node_id, info.name, now)
        return self.node(node_id)

    # -- certificates -----------------------------------------------------------------------------

    def record_certificate(self, serial: str, node_id: str, node_name: str, roles: Sequence[str], not_after: float,
                           now: float) -> None:
        with self._write() as db:
            db.execute("INSERT INTO certificates (serial, node_id, node_name, roles, issued_at, not_after) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (serial, node_id, node_name, ",".join(roles), now, not_after))

    def certificate_roles(self, node_id: str, now: float) -> set[str]:
        """The roles of the node's certificates that are neither revoked nor expired."""
        rows = self._conn.execute("SELECT roles FROM certificates WHERE node_id = ? AND revoked_at = 0 AND "
                                  "not_after > ?", (node_id, now))
        return {role for row in rows for role in row[0].split(",") if role}

    def revoked_serials(self, now: float) -> list[str]:
        """Serials of the revoked certificates that have not expired (an expired one is refused anyway)."""
        rows = self._conn.execute("SELECT serial FROM certificates WHERE revoked_at > 0 AND not_after > ? "
                                  "ORDER BY serial", (now,))
        return [row[0] for row in rows]

    def _revoke_certificates(self, node_id: str, now: float) -> list[str]:
        rows = self._conn.execute("SELECT serial FROM certificates WHERE node_id = ? AND revoked_at = 0 AND "
                                  "not_after > ?", (node_id, now)).fetchall()
        self._conn.execute("UPDATE certificates SET revoked_at = ? WHERE node_id = ? AND revoked_at = 0",
                           (now, node_id))
        return [row[0] for row in rows]

    def revoke_node(self, name: str, now: float) -> tuple[NodeRecord, list[str]]:
        """End a node's membership: revoke its certificates, put its replicas back to be placed elsewhere
        (those terminating there are gone), remove its record. The node as it was, and the serials revoked."""
        with self._write() as db:
            node = self.node_by_name(name)
            serials = self._revoke_certificates(node.id, now)
            db.execute("DELETE FROM replicas WHERE node_id = ? AND terminating_since > 0", (node.id,))
            db.execute("UPDATE replicas SET node_id = NULL, memory = 0, gpu_memory = '{}', observed_state = '', "
                       "observed_message = '', observed_generation = 0 WHERE node_id = ?", (node.id,))
            db.execute("DELETE FROM nodes WHERE id = ?", (node.id,))
            self._event(WARNING, "NodeRevoked", "Node", name,
                        f"node {name} ({node.id}) was revoked: {len(serials)} certificate(s) refused from now on, its "
                        "replicas go elsewhere; it can come back only by joining with the join token", now, name)
        return node, serials

    @staticmethod
    def _reported_columns(info: common_pb2.NodeInfo, worker_address: str) -> tuple[str, str, str, str]:
        described = common_pb2.NodeInfo()
        described.CopyFrom(info)
        described.ClearField("inventory")
        roles = ",".join(common_pb2.Role.Name(r).removeprefix("ROLE_").lower() for r in info.roles)
        return roles, worker_address, _to_json(described), _to_json(info.inventory)

    def _set_ready(self, node_id: str, name: str, now: float) -> None:
        self._conn.execute("UPDATE nodes SET state = ?, state_since = ? WHERE id = ?", (READY, now, node_id))
        self._event(NORMAL, "NodeReady", "Node", name, f"node {name} is heartbeating again", now, name)

    def record_heartbeat(self, node_id: str, inventory: common_pb2.ResourceInventory,
                         replicas: Sequence[common_pb2.ReplicaStatus], now: float,
                         stored_manifests: Sequence[str] = ()) -> bool | None:
        """Store what the node reported; an unreachable node is ready again. None for an unknown node, else
        whether the scheduler has news: a replica's state, message or generation changed, or the node is
        back. A replica of the node that became READY or FAILED gets an event. One reported STOPPED while
        still assigned (nobody the controller knows of asked) is FAILED, with a ReplicaLost event."""
        with self._write() as db:
            row = db.execute("SELECT name, state, reported_replicas FROM nodes WHERE id = ?", (node_id,)).fetchone()
            if row is None:
                return None
            before = {r["replicaId"]: r for r in json.loads(row["reported_replicas"])}
            reported = [json_format.MessageToDict(r) for r in replicas]
            db.execute("UPDATE nodes SET inventory = ?, reported_replicas = ?, stored_manifests = ?, "
                       "last_heartbeat = ? WHERE id = ?",
                       (_to_json(inventory), json.dumps(reported, separators=(",", ":")),
                        json.dumps(sorted(stored_manifests)), now, node_id))
            placed = {r["id"]: r for r in db.execute(
                "SELECT id, deployment, observed_state, observed_generation, terminating_since FROM replicas "
                "WHERE node_id = ?", (node_id,))}
            news = False
            for status, as_dict in zip(replicas, reported):
                seen = before.get(status.replica_id, {})
                news |= any(seen.get(k) != as_dict.get(k) for k in ("state", "message", "observedGeneration"))
                old = placed.get(status.replica_id)
                if old is None:
                    continue
                state = common_pb2.ReplicaState.Name(status.state).removeprefix("REPLICA_STATE_")
                message = status.message
                lost = state == "STOPPED" and not old["terminating_since"]
                if lost:
                    # Still assigned, yet stopped: nobody the controller knows of asked. A failure to heal
                    # like any other (reconcile.py restarts it).
                    state, message = "FAILED", (f"stopped on node {row['name']} without the controller asking"
                                                + (f" ({status.message})" if status.message else ""))
                db.execute("UPDATE replicas SET observed_state = ?, observed_message = ?, observed_generation = ?, "
                           "observed_at = ? WHERE id = ?",
                           (state, message, status.observed_generation, now, status.replica_id))
                if (old["observed_state"], old["observed_generation"]) == (state, status.observed_generation):
                    continue
                if lost:
                    self._event(WARNING, "ReplicaLost", "Deployment", old["deployment"],
                                f"replica {status.replica_id}: {message}; it is started again", now, row["name"])
                elif state in ("READY", "FAILED"):
                    self._event(NORMAL if state == "READY" else WARNING, f"Replica{state.title()}", "Deployment",
                                old["deployment"], f"replica {status.replica_id} is {state} on node {row['name']}"
                                + (f": {message}" if message else ""), now, row["name"])
            news |= len(before) != len(reported)
            gone = db.execute(f"DELETE FROM replicas WHERE node_id = ? AND terminating_since > 0 AND id NOT IN "
                              f"({','.join('?' * len(replicas))})", (node_id, *(r.replica_id for r in replicas)))
            news |= gone.rowcount > 0
            if row["state"] != READY:
                self._set_ready(node_id, row["name"], now)
                news = True
        return news

    def unassigned_replicas(self, node_id: str, reported: Sequence[str]) -> list[str]:
        """Which of the replicas a node reported are not assigned to it (no row places them there)."""
        if not reported:
            return []
        marks = ",".join("?" * len(reported))
        placed = {row[0] for row in self._conn.execute(
            f"SELECT id FROM replicas WHERE node_id = ? AND id IN ({marks})", (node_id, *reported))}
        return sorted(set(reported) - placed)

    def mark_unreachable(self, silent_since: float, now: float, grace: float) -> list[str]:
        """Mark unreachable every ready node with no heartbeat since `silent_since`; their names."""
        with self._write() as db:
            rows = db.execute("SELECT id, name, last_heartbeat FROM nodes WHERE state = ? AND last_heartbeat < ?",
                              (READY, silent_since)).fetchall()
            for row in rows:
                db.execute("UPDATE nodes SET state = ?, state_since = ? WHERE id = ?", (UNREACHABLE, now, row["id"]))
                db.execute("DELETE FROM replicas WHERE node_id = ? AND terminating_since > 0", (row["id"],))
                self._event(WARNING, "NodeUnreachable", "Node", row["name"],
                            f"node {row['name']} sent no heartbeat for {now - row['last_heartbeat']:.1f}s "
                            f"(grace {grace:g}s)", now, row["name"])
        return [row["name"] for row in rows]

    # -- nodes: queries and admin -----------------------------------------------------------------

    def node(self, node_id: str) -> NodeRecord:
        row = self._conn.execute("SELECT * FROM nodes WHERE id = ?", (node_id,)).fetchone()
        if row is None:
            raise NotFound(f"node {node_id} is not a member of this cluster")
        return self._node(row)

    def node_by_name(self, name: str) -> NodeRecord:
        row = self._conn.execute("SELECT * FROM nodes WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no node named {name!r}")
        return self._node(row)

    def nodes(self) -> list[NodeRecord]:
        return [self._node(row) for row in self._conn.execute("SELECT * FROM nodes ORDER BY name")]

    @staticmethod
    def _node(row: sqlite3.Row) -> NodeRecord:
        info = _from_json(row["info"], common_pb2.NodeInfo)
        info.node_id = row["id"]
        info.inventory.CopyFrom(_from_json(row["inventory"], common_pb2.ResourceInventory))
        replicas = [json_format.ParseDict(r, common_pb2.ReplicaStatus(), ignore_unknown_fields=True)
                    for r in json.loads(row["reported_replicas"])]
        return NodeRecord(
            id=row["id"], name=row["name"], roles=[r for r in row["roles"].split(",") if r],
            worker_address=row["worker_address"], info=info, replicas=replicas, labels=json.loads(row["labels"]),
            cordoned=bool(row["cordoned"]), draining=bool(row["draining"]), state=row["state"],
            state_since=row["state_since"], joined_at=row["joined_at"], last_heartbeat=row["last_heartbeat"],
            stored_manifests=json.loads(row["stored_manifests"]))

    def label_node(self, name: str, set_labels: Mapping[str, str], remove: Sequence[str], now: float) -> NodeRecord:
        """Set and remove admin labels. Removing a key the node sets itself only ends an admin override of it;
        with no override it is refused (the node's own config says it)."""
        for key, value in set_labels.items():
            if not LABEL_KEY_RE.match(key):
                raise InvalidInput(f"set: {key!r} is not a label key (letters, digits, '.', '_', '/', '-'; starts "
                                   "and ends with a letter or digit)")
            if len(value) > LABEL_VALUE_MAX or not value.isprintable():
                raise InvalidInput(f"set: the value of {key!r} must be printable and at most {LABEL_VALUE_MAX} "
                                   "characters")
        with self._write() as db:
            node = self.node_by_name(name)
            for key in remove:
                if key in node.info.labels and key not in node.labels:
                    raise InvalidInput(f"remove: label {key!r} is set by node {name} itself ([labels] in its "
                                       "clowderd.toml); change it there")
            labels = {k: v for k, v in node.labels.items() if k not in remove}
            labels.update(set_labels)
            if labels != node.labels:
                db.execute("UPDATE nodes SET labels = ? WHERE id = ?", (json.dumps(labels, sort_keys=True), node.id))
                change = [f"{k}={v}" for k, v in sorted(labels.items()) if node.labels.get(k) != v]
                change += [f"{k}-" for k in sorted(node.labels.keys() - labels.keys())]
                self._event(NORMAL, "NodeLabeled", "Node", name, f"labels of node {name}: {' '.join(change)}",
                            now, name)
        return self.node(node.id)

    def set_schedulable(self, name: str, *, cordoned: bool, draining: bool, now: float) -> NodeRecord:
        """Cordon (cordoned), drain (cordoned and draining) or uncordon (neither) a node."""
        reason = "NodeDraining" if draining else "NodeCordoned" if cordoned else "NodeUncordoned"
        message = {"NodeDraining": "is cordoned and draining", "NodeCordoned": "is cordoned",
                   "NodeUncordoned": "is schedulable"}[reason]
        with self._write() as db:
            node = self.node_by_name(name)
            if (node.cordoned, node.draining) != (cordoned, draining):
                db.execute("UPDATE nodes SET cordoned = ?, draining = ? WHERE id = ?",
                           (int(cordoned), int(draining), node.id))
                self._event(NORMAL, reason, "Node", name, f"node {name} {message}", now, name)
        return self.node(node.id)

    def finish_drain(self, node_id: str, now: float) -> None:
        """The draining node has no replica left: the drain is over; the node stays cordoned."""
        with self._write() as db:
            node = self.node(node_id)
            db.execute("UPDATE nodes SET draining = 0 WHERE id = ?", (node_id,))
            self._event(NORMAL, "NodeDrained", "Node", node.name, f"node {node.name} is drained: its replicas "
                        "run elsewhere; it stays cordoned until `clowderctl node uncordon`", now, node.name)

    # -- deployments ------------------------------------------------------------------------------

    def create_deployment(self, name: str, spec: controller_pb2.DeploymentSpec, labels: Mapping[str, str],
                          image: ResolvedImage, now: float) -> DeploymentRecord:
        with self._write() as db:
            self.deployment_absent(name)
            db.execute("INSERT INTO deployments (name, spec, generation, labels, image, created_at, updated_at) "
                       "VALUES (?, ?, 1, ?, ?, ?, ?)",
                       (name, _to_json(spec), json.dumps(dict(labels), sort_keys=True),
                        json.dumps(image.as_dict(), sort_keys=True), now, now))
            self._event(NORMAL, "DeploymentCreated", "Deployment", name,
                        f"deployment {name}: {spec.replicas} replica(s) of {spec.image} ({image.manifest_digest})", now)
        return self.deployment(name)

    def update_deployment(self, name: str, spec: controller_pb2.DeploymentSpec, labels: Mapping[str, str],
                          image: ResolvedImage, etag: str, reason: str, message: str, now: float) -> DeploymentRecord:
        """Replace the spec (a new generation when it changed), the labels and the resolved image. Conflict
        when etag is given and is not the deployment's."""
        with self._write() as db:
            current = self.deployment(name)
            if etag and etag != current.etag:
                raise Conflict(f"deployment {name!r} changed since etag {etag!r} (now {current.etag!r}); read it "
                               "again and retry")
            generation = current.generation + (spec != current.spec or image != current.image)
            db.execute("UPDATE deployments SET spec = ?, generation = ?, labels = ?, image = ?, updated_at = ? "
                       "WHERE name = ?", (_to_json(spec), generation, json.dumps(dict(labels), sort_keys=True),
                                          json.dumps(image.as_dict(), sort_keys=True), now, name))
            self._event(NORMAL, reason, "Deployment", name, message, now)
        return self.deployment(name)

    def delete_deployment(self, name: str, etag: str, now: float, grace: float = 0.0) -> list[str]:
        """Remove the deployment; its replicas terminate (see _terminate), each given `grace` seconds to
        finish its calls (0: the worker's default). The nodes they were on (to be told)."""
        with self._write() as db:
            current = self.deployment(name)
            if etag and etag != current.etag:
                raise Conflict(f"deployment {name!r} changed since etag {etag!r} (now {current.etag!r})")
            live = db.execute("SELECT id FROM replicas WHERE deployment = ? AND terminating_since = 0",
                              (name,)).fetchall()
            nodes = {self._terminate(replica_id, "its deployment is deleted", now, grace) for (replica_id,) in live}
            db.execute("DELETE FROM deployments WHERE name = ?", (name,))
            self._event(NORMAL, "DeploymentDeleted", "Deployment", name, f"deployment {name} deleted", now)
        return sorted(nodes - {None})

    def deployment_absent(self, name: str) -> None:
        """AlreadyExists when a deployment has the name."""
        if self._conn.execute("SELECT 1 FROM deployments WHERE name = ?", (name,)).fetchone() is not None:
            raise AlreadyExists(f"deployment {name!r} exists; `clowderctl update` changes its image, "
                                "`clowderctl scale` its replicas")

    def deployment(self, name: str) -> DeploymentRecord:
        row = self._conn.execute("SELECT * FROM deployments WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no deployment named {name!r}; `clowderctl deployments` lists them")
        return self._deployment(row)

    def deployments(self) -> list[DeploymentRecord]:
        return [self._deployment(row) for row in self._conn.execute("SELECT * FROM deployments ORDER BY name")]

    @staticmethod
    def _deployment(row: sqlite3.Row) -> DeploymentRecord:
        return DeploymentRecord(
            name=row["name"], spec=_from_json(row["spec"], controller_pb2.DeploymentSpec),
            generation=row["generation"], labels=json.loads(row["labels"]),
            image=ResolvedImage.from_dict(json.loads(row["image"])), created_at=row["created_at"],
            updated_at=row["updated_at"])

    # -- replicas ---------------------------------------------------------------------------------

    def assign(self, spec: common_pb2.ReplicaSpec, node_id: str, now: float) -> str | None:
        """Place a replica on a node (a new one, or one moved or changed): the node is told to run spec.
        Returns the node the replica was on before, if any."""
        if not spec.replica_id or not spec.deployment:
            raise InvalidInput("replica spec: replica_id and deployment are required")
        with self._write() as db:
            self.node(node_id)
            row = db.execute("SELECT node_id FROM replicas WHERE id = ?", (spec.replica_id,)).fetchone()
            db.execute("INSERT INTO replicas (id, deployment, node_id, spec, created_at) VALUES (?, ?, ?, ?, ?) "
                       "ON CONFLICT (id) DO UPDATE SET deployment = excluded.deployment, node_id = excluded.node_id, "
                       "spec = excluded.spec, terminating_since = 0, terminating_reason = ''",
                       (spec.replica_id, spec.deployment, node_id, _to_json(spec), now))
        return None if row is None else row[0]

    def unassign(self, replica_id: str, now: float) -> str | None:
        """Remove a replica; the node it was on (None when it was on none) stops it."""
        with self._write():
            return self._terminate(replica_id, "unassigned", now)

    def _terminate(self, replica_id: str, why: str, now: float, grace: float = 0.0) -> str | None:
        """A replica on a ready node is terminating until the node stops reporting it; any other is deleted.
        The node it was on. NotFound when there is no such replica or it is already terminating."""
        row = self._conn.execute("SELECT replicas.node_id, nodes.state FROM replicas LEFT JOIN nodes "
                                 "ON nodes.id = replicas.node_id WHERE replicas.id = ? AND terminating_since = 0",
                                 (replica_id,)).fetchone()
        if row is None:
            raise NotFound(f"no replica {replica_id!r}")
        if row["state"] == READY:
            self._conn.execute("UPDATE replicas SET terminating_since = ?, terminating_reason = ?, "
                               "terminating_grace = ? WHERE id = ?", (now, why, grace, replica_id))
        else:
            self._conn.execute("DELETE FROM replicas WHERE id = ?", (replica_id,))
        return row["node_id"]

    def assignments(self, node_id: str) -> list[common_pb2.ReplicaSpec]:
        """What the node must run."""
        rows = self._conn.execute("SELECT spec FROM replicas WHERE node_id = ? AND terminating_since = 0 ORDER BY id",
                                  (node_id,))
        return [_from_json(row[0], common_pb2.ReplicaSpec) for row in rows]

    def termination_graces(self, replica_ids: list[str]) -> dict[str, float]:
        """The grace each of these terminating replicas was given, where one was (seconds)."""
        marks = ",".join("?" * len(replica_ids))
        rows = self._conn.execute(f"SELECT id, terminating_grace FROM replicas WHERE id IN ({marks}) "
                                  "AND terminating_grace > 0", replica_ids) if replica_ids else ()
        return {row[0]: row[1] for row in rows}

    def replica(self, replica_id: str) -> ReplicaRecord:
        row = self._conn.execute("SELECT * FROM replicas WHERE id = ?", (replica_id,)).fetchone()
        if row is None:
            raise NotFound(f"no replica {replica_id!r}")
        return self._replica(row)

    def replicas(self, deployment: str = "") -> list[ReplicaRecord]:
        """Every replica (of the deployment, when one is named), oldest first."""
        sql, args = "SELECT * FROM replicas", ()
        if deployment:
            sql, args = sql + " WHERE deployment = ?", (deployment,)
        return [self._replica(row) for row in self._conn.execute(sql + " ORDER BY created_at, id", args)]

    @staticmethod
    def _replica(row: sqlite3.Row) -> ReplicaRecord:
        return ReplicaRecord(
            id=row["id"], deployment=row["deployment"], node_id=row["node_id"],
            spec=_from_json(row["spec"], common_pb2.ReplicaSpec), observed_state=row["observed_state"],
            observed_message=row["observed_message"], observed_generation=row["observed_generation"],
            observed_at=row["observed_at"], memory=row["memory"], gpu_memory=json.loads(row["gpu_memory"]),
            pending_reason=row["pending_reason"], preempted_by=row["preempted_by"], failures=row["failures"],
            failed_generation=row["failed_generation"], restart_at=row["restart_at"], created_at=row["created_at"],
            terminating_since=row["terminating_since"], terminating_reason=row["terminating_reason"])

    def add_replica(self, spec: common_pb2.ReplicaSpec, now: float) -> None:
        """A new replica, not placed yet."""
        with self._write() as db:
            db.execute("INSERT INTO replicas (id, deployment, spec, created_at) VALUES (?, ?, ?, ?)",
                       (spec.replica_id, spec.deployment, _to_json(spec), now))

    def place_replica(self, spec: common_pb2.ReplicaSpec, node_id: str, memory: int, gpu_memory: Mapping[str, int],
                      now: float) -> None:
        """Put an unplaced replica on a node, with the memory the scheduler claimed for it there."""
        with self._write() as db:
            node = self.node(node_id)
            db.execute("UPDATE replicas SET node_id = ?, spec = ?, memory = ?, gpu_memory = ?, pending_reason = '', "
                       "preempted_by = '', observed_state = '', observed_message = '', observed_generation = 0 "
                       "WHERE id = ?", (node_id, _to_json(spec), memory, json.dumps(dict(gpu_memory)),
                                        spec.replica_id))
            self._event(NORMAL, "ReplicaScheduled", "Deployment", spec.deployment,
                        f"replica {spec.replica_id} placed on node {node.name}", now, node.name)

    def evict_replica(self, replica_id: str, preempted_by: str, now: float) -> str:
        """Take a replica off its node to make room (it is PENDING again); the node it was on."""
        with self._write() as db:
            replica = self.replica(replica_id)
            node = self.node(replica.node_id)
            db.execute("UPDATE replicas SET node_id = NULL, memory = 0, gpu_memory = '{}', preempted_by = ?, "
                       "observed_state = '', observed_message = '', observed_generation = 0 WHERE id = ?",
                       (preempted_by, replica_id))
            self._event(WARNING, "Preempted", "Deployment", replica.deployment,
                        f"replica {replica_id} was evicted from node {node.name}: preempted by {preempted_by}", now,
                        node.name)
        return node.id

    def set_pending_reason(self, replica_id: str, reason: str, now: float) -> None:
        """Why the replica cannot be placed; a new reason is also an Unschedulable event."""
        with self._write() as db:
            replica = self.replica(replica_id)
            if replica.pending_reason != reason:
                db.execute("UPDATE replicas SET pending_reason = ? WHERE id = ?", (reason, replica_id))
                self._event(WARNING, "Unschedulable", "Deployment", replica.deployment,
                            f"replica {replica_id}: {reason}", now)

    def record_failure(self, replica_id: str, restart_at: float, now: float) -> int:
        """Count the failure of the replica's current generation; restart it at restart_at (0: never). The
        failures in a row."""
        with self._write() as db:
            replica = self.replica(replica_id)
            failures = replica.failures + 1
            db.execute("UPDATE replicas SET failures = ?, failed_generation = ?, restart_at = ? WHERE id = ?",
                       (failures, replica.spec.generation, restart_at, replica_id))
            if not restart_at:
                self._event(WARNING, "DeploymentFailed", "Deployment", replica.deployment,
                            f"replica {replica_id} failed {failures} times in a row, the last: "
                            f"{replica.observed_message}", now)
        return failures

    def restart_replica(self, spec: common_pb2.ReplicaSpec, now: float) -> None:
        """Run the replica again where it is, as a new generation of its spec."""
        with self._write() as db:
            replica = self.replica(spec.replica_id)
            db.execute("UPDATE replicas SET spec = ?, restart_at = 0 WHERE id = ?", (_to_json(spec), spec.replica_id))
            self._event(NORMAL, "ReplicaRestarted", "Deployment", replica.deployment,
                        f"replica {spec.replica_id}: start {replica.failures + 1} (generation {spec.generation})",
                        now)

    def reset_failures(self, replica_id: str) -> None:
        with self._write() as db:
            db.execute("UPDATE replicas SET failures = 0 WHERE id = ?", (replica_id,))

    def remove_replica(self, replica_id: str, why: str, now: float) -> str | None:
        """Remove a replica (see _terminate), saying why in an event; the node it was on, if any."""
        with self._write():
            replica = self.replica(replica_id)
            node_id = self._terminate(replica_id, why, now)
            self._event(NORMAL, "ReplicaRemoved", "Deployment", replica.deployment, f"replica {replica_id}: {why}",
                        now)
        return node_id
