"""A controller and workers as real clowderd processes on loopback: workers join with the join token, get a
certificate naming their node id and roles, and heartbeat their inventory; silent ones become unreachable,
restarts on either side keep every node's identity, and `clowderctl` administers the nodes through the
admin API. The controller's own process is a node too."""
from __future__ import annotations

import datetime
import json
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from typing import Any

from clowder.v1 import node_pb2, node_pb2_grpc
from clowderd.trust.ca import ClusterCA
from tests.clowderd_proc import ClowderdProcess, deep_merge
from tests.cluster_fixtures import clowderctl, clowderctl_env, start_worker, token_file, wait_for

INTERVAL, GRACE = 0.5, 3.0
MEMBERS = ("NodeJoined", "NodeRegistered")  # w1 and w2 join; the controller's own process registers


def start_controller(clowderd, **extra: Any) -> ClowderdProcess:
    timing = {"heartbeat_interval_seconds": INTERVAL, "heartbeat_grace_seconds": GRACE}
    return clowderd(roles=("controller",), config_extra=deep_merge({"node_name": "ctl", "controller": timing}, extra))


def nodes(controller: ClowderdProcess) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in json.loads(clowderctl(controller, "nodes", "-o", "json").stdout)}


def events(controller: ClowderdProcess) -> list[dict[str, Any]]:
    return json.loads(clowderctl(controller, "events", "-o", "json").stdout)


def seconds(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def ready(controller: ClowderdProcess, *names: str) -> dict[str, dict[str, Any]]:
    """The nodes, once all the named ones are ready."""
    return wait_for(f"nodes {', '.join(names)} ready",
                    lambda: (found := nodes(controller)) and all(found.get(n, {}).get("state") == "ready"
                                                                 for n in names) and found)


def test_workers_join_and_report_their_inventory(clowderd):
    controller = start_controller(clowderd)
    first = start_worker(clowderd, controller, "w1", labels={"zone": "rack-1"})
    second = start_worker(clowderd, controller, "w2")
    found = ready(controller, "ctl", "w1", "w2")
    assert set(found) == {"ctl", "w1", "w2"}
    assert found["ctl"]["roles"] == ["controller"]
    for name, worker in (("w1", first), ("w2", second)):
        row = found[name]
        assert row["id"].startswith("node-") and row["roles"] == ["worker"]
        assert row["worker_address"] == worker.addresses["worker"]
        assert row["cpu_count"] > 0 and 0 < row["memory_available"] <= row["memory_total"]
        assert 0 < row["disk_free"] <= row["disk_total"]
        assert row["gpus"] == [] and row["replicas"] == []
        identity = worker.identity()
        assert (identity.node_id, identity.holder.roles, identity.holder.name) == (row["id"], ("worker",), name)
        assert stat.S_IMODE((worker.data_dir / "identity" / "key.pem").stat().st_mode) == 0o600
        assert identity.material.ca == controller.ca()
        info = node_pb2_grpc.NodeStub(worker.channel("worker")).GetInfo(node_pb2.GetInfoRequest(), timeout=5)
        assert info.node_id == row["id"]
    assert found["w1"]["id"] != found["w2"]["id"]
    assert found["w1"]["labels"] == {"zone": "rack-1"}

    clowderctl(controller, "node", "cordon", "w2")
    table = clowderctl(controller, "nodes").stdout.splitlines()
    assert table[0].split()[:2] == ["NAME", "STATUS"]
    assert [line.split()[:2] for line in table[1:] if line.split()[0] in ("w1", "w2")] == [
        ["w1", "ready"], ["w2", "ready,cordoned"]]
    joined = [e for e in events(controller) if e["reason"] == "NodeJoined"]
    assert sorted(e["object"] for e in joined) == ["Node/w1", "Node/w2"]
    registered = [e for e in events(controller) if e["reason"] == "NodeRegistered"]
    assert [e["object"] for e in registered] == ["Node/ctl"]  # the controller's own process: no join
    assert first.stop() == 0 and second.stop() == 0


def test_labels_cordon_and_drain_are_reflected_and_a_node_without_replicas_drains_at_once(clowderd):
    controller = start_controller(clowderd)
    start_worker(clowderd, controller, "w1", labels={"zone": "rack-1"})
    start_worker(clowderd, controller, "w2")
    ready(controller, "ctl", "w1", "w2")
    follower = subprocess.Popen([sys.executable, "-m", "clowderctl.main", "events", "--follow", "-o", "json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=clowderctl_env(controller))
    followed: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [followed.put(line) for line in follower.stdout], daemon=True).start()
    assert json.loads(followed.get(timeout=30))["reason"] in MEMBERS  # the past first, one object a line

    assert clowderctl(controller, "node", "label", "w1", "zone=rack-9", "team=infer").stdout.strip() == \
        "node w1: labels team=infer, zone=rack-9"
    clowderctl(controller, "node", "cordon", "w1")
    clowderctl(controller, "node", "drain", "w2")
    found = wait_for("w2 to finish draining", lambda: (f := nodes(controller))["w2"]["draining"] is False and f)
    assert found["w1"]["labels"] == {"zone": "rack-9", "team": "infer"}
    assert (found["w1"]["cordoned"], found["w1"]["draining"]) == (True, False)
    assert found["w2"]["cordoned"]
    selected = json.loads(clowderctl(controller, "nodes", "-l", "team=infer", "-o", "json").stdout)
    assert [row["name"] for row in selected] == ["w1"]
    describe = clowderctl(controller, "node", "describe", "w2").stdout
    assert "Schedulable:    cordoned" in describe and "GPUs: none" in describe

    clowderctl(controller, "node", "label", "w1", "zone-", "team-")
    clowderctl(controller, "node", "uncordon", "w2")
    found = nodes(controller)
    assert found["w1"]["labels"] == {"zone": "rack-1"}  # the node's own label again
    assert (found["w2"]["cordoned"], found["w2"]["draining"]) == (False, False)
    refused = clowderctl(controller, "node", "label", "w1", "zone-", check=False)
    assert refused.returncode == 1 and "label 'zone' is set by node w1 itself" in refused.stderr
    missing = clowderctl(controller, "node", "cordon", "w9", check=False)
    assert missing.returncode == 1 and "no node named 'w9'" in missing.stderr
    changes = [("NodeLabeled", "Node/w1"), ("NodeCordoned", "Node/w1"), ("NodeDraining", "Node/w2"),
               ("NodeDrained", "Node/w2"), ("NodeLabeled", "Node/w1"), ("NodeUncordoned", "Node/w2")]
    assert [(e["reason"], e["object"]) for e in events(controller) if e["reason"] not in MEMBERS] == changes
    for _ in range(2):
        assert json.loads(followed.get(timeout=30))["reason"] in MEMBERS
    assert [(e["reason"], e["object"]) for e in (json.loads(followed.get(timeout=30)) for _ in changes)] == changes
    follower.send_signal(signal.SIGINT)
    assert follower.wait(30) == 130 and follower.stderr.read().strip() == "interrupted"


def test_a_killed_worker_becomes_unreachable_and_rejoins_as_the_same_node(clowderd):
    controller = start_controller(clowderd)
    worker = start_worker(clowderd, controller, "w1")
    node_id = ready(controller, "w1")["w1"]["id"]
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    killed = time.monotonic()
    wait_for("w1 unreachable", lambda: nodes(controller)["w1"]["state"] == "unreachable", timeout=GRACE + 10)
    seconds = time.monotonic() - killed
    assert seconds < GRACE + 2, f"unreachable after {seconds:.1f}s; grace {GRACE}s"
    warning = [e for e in events(controller) if e["reason"] == "NodeUnreachable"]
    assert [(e["severity"], e["object"]) for e in warning] == [("Warning", "Node/w1")]

    restarted = start_worker(clowderd, controller, "w1", data_dir=str(worker.data_dir))
    row = ready(controller, "w1")["w1"]
    assert row["id"] == node_id and row["worker_address"] == restarted.addresses["worker"]
    assert [e["reason"] for e in events(controller)][-2:] == ["NodeUnreachable", "NodeReady"]
    assert restarted.stop() == 0


def restarted_controller(clowderd, controller: ClowderdProcess) -> ClowderdProcess:
    """A controller on the data dir and the addresses of one that stopped."""
    return start_controller(clowderd, data_dir=str(controller.data_dir),
                            controller={"listen": controller.addresses["controller"],
                                        "cluster_listen": controller.addresses["cluster"]})


def test_a_controller_restart_keeps_the_nodes_and_workers_reconnect(clowderd):
    controller = start_controller(clowderd)
    worker = start_worker(clowderd, controller, "w1")
    node_id = ready(controller, "w1")["w1"]["id"]
    clowderctl(controller, "node", "label", "w1", "zone=a")
    controller.send_signal(signal.SIGKILL)
    controller.wait()
    restarted = restarted_controller(clowderd, controller)
    back = time.time()
    row = wait_for("a heartbeat after the restart",
                   lambda: (r := nodes(restarted).get("w1")) and seconds(r["last_heartbeat"]) > back and r)
    assert (row["id"], row["state"], row["labels"]) == (node_id, "ready", {"zone": "a"})
    time.sleep(GRACE + 1)  # the first sweep after a restart finds the node heartbeating
    assert nodes(restarted)["w1"]["state"] == "ready"
    assert [(e["reason"], e["object"]) for e in events(restarted) if e["object"] == "Node/w1"] == [
        ("NodeJoined", "Node/w1"), ("NodeLabeled", "Node/w1")]
    assert [r["node_id"] for r in restarted.log_records() if r["msg"] == "node registered"
            and r["node"] == "w1"] == [node_id]
    assert worker.identity().node_id == node_id
    assert worker.stop() == 0 and restarted.stop() == 0


def test_a_controller_that_lost_its_database_gets_its_nodes_back_by_their_certificates(clowderd):
    controller = start_controller(clowderd)
    worker = start_worker(clowderd, controller, "w1")
    old_id = ready(controller, "w1")["w1"]["id"]
    assert controller.stop() == 0
    for path in (controller.data_dir / "controller").glob("state.db*"):
        path.unlink()  # the CA and the token files stay
    restarted = restarted_controller(clowderd, controller)
    row = ready(restarted, "w1")["w1"]
    assert row["id"] == old_id
    assert ("NodeRegistered", "Node/w1") in [(e["reason"], e["object"]) for e in events(restarted)]
    assert worker.stop() == 0 and restarted.stop() == 0


def test_join_token_rotation_refuses_the_old_token_with_a_clear_message(clowderd, tmp_path):
    controller = start_controller(clowderd)
    old = clowderctl(controller, "token").stdout.strip()
    assert old == token_file(controller).read_text().strip() and old.startswith("clowder-join-")
    assert old.endswith("::sha256:" + ClusterCA.load_or_create(controller.data_dir / "controller").fingerprint)
    assert old not in controller.stderr_text()  # a secret never goes to the log
    new = clowderctl(controller, "token", "--rotate").stdout.strip()
    assert new != old and token_file(controller).read_text().strip() == new
    stale = tmp_path / "stale-join-token"
    stale.write_text(old + "\n")
    worker = start_worker(clowderd, controller, "late", cluster={"join_token_file": str(stale)}, wait=False)
    assert worker.wait() == 2, worker.stderr_text()
    error = worker.log_records()[-1]
    assert error["level"] == "error"
    assert "join refused: the join token is not this cluster's" in error["msg"] and "clowderctl token" in error["msg"]
    assert "late" not in nodes(controller)
    assert not (worker.data_dir / "identity").exists()
    rotated, refused = [(e["reason"], e["object"]) for e in events(controller) if e["reason"] not in MEMBERS]
    assert (rotated, refused) == (("JoinTokenRotated", "Cluster/join-token"), ("JoinRefused", "Node/late"))


def test_a_join_token_naming_another_ca_sends_no_secret(clowderd, tmp_path):
    controller = start_controller(clowderd)
    secret = token_file(controller).read_text().strip().split("::")[0]
    forged = tmp_path / "forged-join-token"
    forged.write_text(f"{secret}::sha256:{'0' * 64}\n")
    worker = start_worker(clowderd, controller, "w1", cluster={"join_token_file": str(forged)}, wait=False)
    assert worker.wait() == 2, worker.stderr_text()
    assert "does not have the cluster CA the join token names" in worker.stderr_text()
    assert not [e for e in events(controller) if e["object"] == "Node/w1"]  # the controller heard nothing


def test_the_admin_api_refuses_a_wrong_or_missing_admin_token(clowderd, tmp_path):
    controller = start_controller(clowderd)
    admin = (controller.data_dir / "controller" / "admin-token").read_text().strip()
    fingerprint = admin.split("::")[1]
    wrong = clowderctl(controller, "nodes", "--token", f"clowder-admin-wrong::{fingerprint}", check=False)
    assert wrong.returncode == 1
    assert "refused the admin token: the admin token is wrong" in wrong.stderr
    refusal = wait_for("the refusal in the log", lambda: [r for r in controller.log_records()
                                                          if r["msg"] == "call refused"])
    assert refusal[0]["peer"].startswith("ipv4:127.0.0.1:")
    bare = clowderctl(controller, "nodes", "--token", "clowder-admin-wrong", check=False)
    assert bare.returncode == 1 and "needs the whole admin token, which ends in ::sha256:" in bare.stderr
    env_wrong = subprocess.run([sys.executable, "-m", "clowderctl.main", "--data-dir", str(tmp_path), "events"],
                               capture_output=True, text=True, timeout=60,
                               env={**os.environ, "CLOWDER_CONTROLLER": controller.addresses["controller"]})
    assert env_wrong.returncode == 1 and "no admin token: give --token or $CLOWDER_TOKEN" in env_wrong.stderr
    listed = clowderctl(controller, "nodes", "-o", "json", "--token", admin)
    assert [row["name"] for row in json.loads(listed.stdout)] in ([], ["ctl"])


def test_one_process_with_every_role_joins_its_own_controller(clowderd):
    proc = clowderd()
    found = ready(proc, "test-node")
    assert found["test-node"]["roles"] == ["controller", "storage", "worker", "lb"]
    assert found["test-node"]["worker_address"] == proc.addresses["worker"]
    assert proc.stop() == 0
