"""The controller's state database (clowderd/controller/state.py) and its tokens, without a server."""
from __future__ import annotations

import os
import sqlite3
import stat

import pytest

from clowder.v1 import common_pb2
from clowderd.controller import state as state_module
from clowderd.controller import tokens
from clowderd.controller.state import READY, UNREACHABLE, ClusterState
from clowderd.controller.tokens import ClusterTokens
from clowderd.errors import AlreadyExists, InvalidInput, NotFound, StoreError

T0 = 1_800_000_000.0


@pytest.fixture
def db(tmp_path):
    state = ClusterState(tmp_path / "state.db")
    yield state
    state.close()


def node_info(name: str, labels: dict[str, str] | None = None, worker: str = "10.0.0.1:7072") -> common_pb2.NodeInfo:
    info = common_pb2.NodeInfo(name=name, roles=[common_pb2.ROLE_WORKER], labels=labels or {}, version="0.1.0",
                               listeners=[common_pb2.Listener(role=common_pb2.ROLE_WORKER, address=worker)])
    info.inventory.cpu_count = 8
    return info


def join(db: ClusterState, name: str, now: float = T0, **info) -> str:
    """Enroll the node (the join token's way in), then register it as it does once it serves."""
    node, _ = db.enroll_node(node_info(name, **info), now)
    return db.register_node(node.id, node_info(name, **info), "10.0.0.1:7072", now).id


def reasons(db: ClusterState) -> list[str]:
    return [e.reason for e in db.events()]


def test_schema_version_is_recorded_and_a_newer_database_is_refused(tmp_path):
    ClusterState(tmp_path / "state.db").close()
    with sqlite3.connect(tmp_path / "state.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == state_module.SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute(f"PRAGMA user_version = {state_module.SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match=rf"state.db: controller database schema version "
                                         rf"{state_module.SCHEMA_VERSION + 1}, this clowderd reads versions up to"):
        ClusterState(tmp_path / "state.db")


def test_nodes_labels_and_events_survive_a_reopen(tmp_path):
    db = ClusterState(tmp_path / "state.db")
    node_id = join(db, "w1")
    db.label_node("w1", {"zone": "a"}, [], T0 + 1)
    db.set_schedulable("w1", cordoned=True, draining=False, now=T0 + 2)
    db.close()
    db = ClusterState(tmp_path / "state.db")
    node = db.node_by_name("w1")
    assert (node.id, node.labels, node.cordoned, node.info.inventory.cpu_count) == (node_id, {"zone": "a"}, True, 8)
    assert reasons(db) == ["NodeJoined", "NodeLabeled", "NodeCordoned"]
    assert db.last_event_revision == 3
    db.close()


def test_a_heartbeating_node_keeps_its_name(db):
    node_id = join(db, "w1")
    with pytest.raises(AlreadyExists, match=rf"node name 'w1' is taken by node {node_id}, which is heartbeating"):
        join(db, "w1")


def test_a_new_join_takes_over_an_unreachable_node_of_its_name_and_revokes_its_certificates(db):
    node_id = join(db, "w1")
    db.record_certificate("aa01", node_id, "w1", ["worker"], T0 + 1000, T0)
    db.label_node("w1", {"zone": "a"}, [], T0)
    assert db.mark_unreachable(T0 + 10, T0 + 20, 15) == ["w1"]
    node, revoked = db.enroll_node(node_info("w1"), T0 + 30)
    assert (node.id, node.state, node.labels, revoked) == (node_id, READY, {"zone": "a"}, ["aa01"])
    assert db.revoked_serials(T0 + 30) == ["aa01"]
    assert db.revoked_serials(T0 + 1000) == []  # expired: refused anyway, no longer listed


def test_register_updates_the_description_refuses_a_taken_name_and_records_a_lost_node(db):
    node_id = join(db, "w1")
    join(db, "w2")
    node = db.register_node(node_id, node_info("w1", worker="10.0.0.9:7072"), "10.0.0.9:7072", T0 + 5)
    assert (node.worker_address, node.last_heartbeat) == ("10.0.0.9:7072", T0 + 5)
    with pytest.raises(AlreadyExists, match=rf"node {node_id} cannot take the name 'w2'"):
        db.register_node(node_id, node_info("w2"), "", T0 + 6)
    lost = db.register_node("node-lost", node_info("w3"), "10.0.0.3:7072", T0 + 7)
    assert (lost.id, lost.state, reasons(db)[-1]) == ("node-lost", READY, "NodeRegistered")


def test_a_revoked_node_is_gone_its_certificates_listed_and_its_replicas_placed_elsewhere(db):
    node_id = join(db, "w1")
    db.record_certificate("bb02", node_id, "w1", ["worker"], T0 + 1000, T0)
    db.record_certificate("bb03", node_id, "w1", ["worker", "lb"], T0 + 2000, T0)
    spec = common_pb2.ReplicaSpec(replica_id="r1", deployment="d", generation=1)
    db.assign(spec, node_id, T0)
    node, serials = db.revoke_node("w1", T0 + 1)
    assert (node.id, sorted(serials)) == (node_id, ["bb02", "bb03"])
    assert db.revoked_serials(T0 + 1) == ["bb02", "bb03"]
    with pytest.raises(NotFound):
        db.node(node_id)
    assert db.replica("r1").node_id is None
    assert reasons(db)[-1] == "NodeRevoked"
    assert db.certificate_roles(node_id, T0 + 1) == set()


def test_heartbeats_record_inventory_and_replicas_of_known_nodes_only(db):
    node_id = join(db, "w1")
    inventory = common_pb2.ResourceInventory(cpu_count=4, memory_total=1 << 34, memory_available=1 << 33, gpus=[
        common_pb2.GpuInfo(index=0, uuid="GPU-1", model="NVIDIA H100", memory_total=80 << 30, memory_used=1 << 30)])
    replicas = [common_pb2.ReplicaStatus(replica_id="r1", deployment="d", state=common_pb2.REPLICA_STATE_READY)]
    assert db.record_heartbeat(node_id, inventory, replicas, T0 + 1)
    assert not db.record_heartbeat("node-unknown", inventory, replicas, T0 + 1)
    node = db.node(node_id)
    assert node.info.inventory == inventory and node.replicas == replicas and node.last_heartbeat == T0 + 1


def test_silent_nodes_become_unreachable_and_ready_again_when_they_heartbeat(db):
    quiet, busy = join(db, "quiet"), join(db, "busy")
    db.record_heartbeat(busy, common_pb2.ResourceInventory(), [], T0 + 10)
    assert db.mark_unreachable(T0 + 5, T0 + 20, 15) == ["quiet"]
    assert db.mark_unreachable(T0 + 5, T0 + 21, 15) == []  # already marked: one event
    assert (db.node(quiet).state, db.node(quiet).state_since, db.node(busy).state) == (UNREACHABLE, T0 + 20, READY)
    warning = db.events()[-1]
    assert (warning.severity, warning.reason, warning.object_name) == ("Warning", "NodeUnreachable", "quiet")
    assert "no heartbeat for 20.0s (grace 15s)" in warning.message
    db.record_heartbeat(quiet, common_pb2.ResourceInventory(), [], T0 + 30)
    assert db.node(quiet).state == READY
    assert reasons(db)[-2:] == ["NodeUnreachable", "NodeReady"]


def test_labels_set_and_removed_by_the_admin_override_the_nodes_own(db):
    join(db, "w1", labels={"zone": "a", "gpu": "h100"})
    node = db.label_node("w1", {"zone": "b", "team": "x"}, ["absent"], T0)
    assert node.labels == {"zone": "b", "team": "x"}
    assert node.effective_labels() == {"zone": "b", "gpu": "h100", "team": "x"}
    assert db.events()[-1].message == "labels of node w1: team=x zone=b"
    node = db.label_node("w1", {}, ["team", "zone"], T0)
    assert node.effective_labels() == {"zone": "a", "gpu": "h100"}
    db.label_node("w1", {}, ["team"], T0)  # nothing changes: no event
    assert reasons(db).count("NodeLabeled") == 2
    with pytest.raises(InvalidInput, match=r"remove: label 'gpu' is set by node w1 itself"):
        db.label_node("w1", {}, ["gpu"], T0)
    with pytest.raises(InvalidInput, match=r"set: 'bad key' is not a label key"):
        db.label_node("w1", {"bad key": "v"}, [], T0)
    with pytest.raises(NotFound, match=r"no node named 'w9'"):
        db.label_node("w9", {"a": "b"}, [], T0)


def test_cordon_drain_and_uncordon(db):
    join(db, "w1")
    assert db.set_schedulable("w1", cordoned=True, draining=False, now=T0).cordoned
    node = db.set_schedulable("w1", cordoned=True, draining=True, now=T0)
    assert (node.cordoned, node.draining) == (True, True)
    node = db.set_schedulable("w1", cordoned=False, draining=False, now=T0)
    assert (node.cordoned, node.draining) == (False, False)
    db.set_schedulable("w1", cordoned=False, draining=False, now=T0)
    assert reasons(db) == ["NodeJoined", "NodeCordoned", "NodeDraining", "NodeUncordoned"]


def test_events_are_filtered_paged_and_pruned(db, monkeypatch):
    monkeypatch.setattr(state_module, "EVENTS_KEPT", 5)
    for i in range(8):
        db.add_event("Normal", "Tick", "Node", f"n{i % 2}", f"tick {i}", T0 + i)
    assert [e.message for e in db.events()] == [f"tick {i}" for i in range(3, 8)]
    assert [e.message for e in db.events(object_kind="Node", object_name="n1")] == ["tick 3", "tick 5", "tick 7"]
    assert [e.message for e in db.events(5, limit=2)] == ["tick 5", "tick 6"]
    assert [e.message for e in db.events(since=T0 + 6)] == ["tick 6", "tick 7"]


def test_assignments_follow_the_replicas_placed_on_each_node(db):
    w1, w2 = join(db, "w1"), join(db, "w2")
    spec = common_pb2.ReplicaSpec(replica_id="d-1", deployment="d", image="tiny:v1", generation=1)
    assert db.assign(spec, w1, T0) is None
    assert db.assignments(w1) == [spec] and db.assignments(w2) == []
    db.record_heartbeat(w2, common_pb2.ResourceInventory(), [common_pb2.ReplicaStatus(
        replica_id="d-1", state=common_pb2.REPLICA_STATE_READY)], T0 + 1)
    assert db.replica("d-1").observed_state == ""  # reported by a node it is not placed on
    db.record_heartbeat(w1, common_pb2.ResourceInventory(), [common_pb2.ReplicaStatus(
        replica_id="d-1", state=common_pb2.REPLICA_STATE_FAILED, message="boom", observed_generation=1)], T0 + 2)
    observed = db.replica("d-1")
    assert (observed.observed_state, observed.observed_message, observed.observed_at) == ("FAILED", "boom", T0 + 2)
    assert db.assign(spec, w2, T0 + 3) == w1
    assert db.assignments(w1) == [] and db.assignments(w2) == [spec]
    assert db.unassign("d-1", T0 + 4) == w2 and db.assignments(w2) == []
    with pytest.raises(NotFound):
        db.unassign("d-1", T0 + 5)
    with pytest.raises(NotFound):
        db.assign(spec, "node-unknown", T0)


FINGERPRINT = "ab" * 32


def test_tokens_are_created_once_in_0600_files_with_the_ca_fingerprint_and_an_edited_file_wins(db, tmp_path):
    join_path, admin_path = tmp_path / "join-token", tmp_path / "admin-token"
    first = ClusterTokens.load(db, join_path, admin_path, FINGERPRINT, T0)
    assert first.join.startswith(tokens.JOIN_PREFIX) and join_path.read_text().strip() == first.join
    assert first.join.endswith("::sha256:" + FINGERPRINT)
    assert admin_path.read_text().startswith(tokens.ADMIN_PREFIX)
    assert stat.S_IMODE(os.stat(join_path).st_mode) == stat.S_IMODE(os.stat(admin_path).st_mode) == 0o600
    secret = first.join.split("::")[0]
    assert db.secret("join") == (tokens.digest(secret), T0)
    assert first.admits(first.join) and first.admits(secret) and not first.admits(secret + "x")
    assert tokens.matches(admin_path.read_text().strip(), first.admin_digest)

    again = ClusterTokens.load(db, join_path, admin_path, FINGERPRINT, T0 + 10)
    assert (again.join, again.join_created_at, again.admin_digest) == (first.join, T0, first.admin_digest)

    join_path.write_text("chosen-by-the-operator\n")
    admin_path.unlink()
    third = ClusterTokens.load(db, join_path, admin_path, FINGERPRINT, T0 + 20)
    assert third.join == "chosen-by-the-operator::sha256:" + FINGERPRINT == join_path.read_text().strip()
    assert db.secret("join") == (tokens.digest("chosen-by-the-operator"), T0 + 20)
    assert third.admin_digest != first.admin_digest
    assert tokens.matches(admin_path.read_text().strip(), third.admin_digest)


def test_tokens_of_a_cluster_without_a_ca_are_bare_secrets(db, tmp_path):
    loaded = ClusterTokens.load(db, tmp_path / "join-token", tmp_path / "admin-token", None, T0)
    assert "::" not in loaded.join and "::" not in (tmp_path / "admin-token").read_text()


def test_bearer_and_matches():
    assert tokens.bearer([("x", "y"), ("authorization", "Bearer abc ")]) == "abc"
    assert tokens.bearer([("authorization", "Basic abc")]) == tokens.bearer(None) == ""
    assert tokens.matches("abc", tokens.digest("abc"))
    assert not tokens.matches("", tokens.digest("")) and not tokens.matches("abc", None)
