"""clowderd starts the servers of its roles, and each answers clowder.v1.Node."""
from __future__ import annotations

import socket

import grpc
import pytest

from clowder.v1 import (common_pb2, node_pb2, node_pb2_grpc, registry_pb2,
                        registry_pb2_grpc)

ROLE = {"controller": common_pb2.ROLE_CONTROLLER, "storage": common_pb2.ROLE_STORAGE,
        "worker": common_pb2.ROLE_WORKER, "lb": common_pb2.ROLE_LB}
LISTENER_ROLE = {**ROLE, "cluster": common_pb2.ROLE_CONTROLLER}


def get_info(proc, role: str) -> node_pb2.GetInfoResponse:
    return node_pb2_grpc.NodeStub(proc.channel(role)).GetInfo(node_pb2.GetInfoRequest(), timeout=5)


def test_every_listener_answers_get_info(clowderd):
    proc = clowderd()
    for listener in ("controller", "cluster", "storage", "worker", "lb"):
        info = get_info(proc, listener)
        assert info.node_name == "test-node"
        assert list(info.roles) == [ROLE[r] for r in ("controller", "storage", "worker", "lb")]
        assert info.serving_role == LISTENER_ROLE[listener]
        assert info.version
        assert "v1" in info.api_versions
        assert info.pid == proc.pid
        assert info.started_at.seconds > 0
        assert info.node_id == proc.identity().node_id
        assert {(l.role, l.address, l.protocol) for l in info.listeners} == {
            (common_pb2.ROLE_CONTROLLER, proc.addresses["controller"], "grpc+tls"),
            (common_pb2.ROLE_CONTROLLER, proc.addresses["cluster"], "grpc+mtls"),
            (common_pb2.ROLE_STORAGE, proc.addresses["storage"], "grpc+mtls"),
            (common_pb2.ROLE_WORKER, proc.addresses["worker"], "grpc+mtls"),
            (common_pb2.ROLE_LB, proc.addresses["lb"], "grpc")}
    serving = [r for r in proc.log_records() if r["msg"] == "serving"]
    assert sorted((r["listener"], r["addr"]) for r in serving) == sorted(proc.addresses.items())
    assert proc.stop() == 0


def test_subset_of_roles_starts_only_those_servers(clowderd):
    proc = clowderd(roles=("storage",))
    info = get_info(proc, "storage")
    assert list(info.roles) == [common_pb2.ROLE_STORAGE]
    assert [l.role for l in info.listeners] == [common_pb2.ROLE_STORAGE]
    # The other roles' configured ports are not listened on.
    for role in ("controller", "worker", "lb"):
        host, port = proc.config[role]["listen"].rsplit(":", 1)
        with socket.socket() as s:
            s.settimeout(1)
            assert s.connect_ex((host, int(port))) != 0, f"{role} port is open"
    assert proc.stop() == 0


@pytest.mark.parametrize("role, call", [
    ("storage", lambda ch: registry_pb2_grpc.RegistryStub(ch).PutBlob(
        iter([registry_pb2.PutBlobRequest(data=b"x")]), timeout=5)),
])
def test_unimplemented_methods_say_so(clowderd, role, call):
    proc = clowderd(roles=(role,))
    with pytest.raises(grpc.RpcError) as ei:
        call(proc.channel(role))
    assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "/clowder.v1." in ei.value.details()
    assert "not implemented" in ei.value.details()
    assert proc.stop() == 0


def test_json_log_lines(clowderd):
    proc = clowderd()
    assert proc.stop() == 0
    records = proc.log_records()  # fails on any non-JSON line
    assert records, "no log lines"
    for r in records:
        assert {"ts", "level", "logger", "msg"} <= r.keys()
        assert r["ts"].endswith("Z") and "T" in r["ts"]
    msgs = [r["msg"] for r in records]
    assert msgs[0] == "starting" and msgs[-1] == "stopped"


def test_text_log_format(clowderd):
    proc = clowderd(roles=("storage",), config_extra={"log": {"format": "text"}})
    assert proc.stop() == 0
    text = proc.stderr_text()
    assert f"serving role=storage listener=storage addr={proc.addresses['storage']}" in text
    assert text.rstrip().endswith("stopped")


def test_sd_notify_ready(clowderd, tmp_path):
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(20)
        proc = clowderd(roles=("storage",), env={"NOTIFY_SOCKET": str(path)})
        first = sock.recv(4096).decode()
        assert first.startswith("READY=1\n")
        assert proc.addresses["storage"] in first
        assert proc.stop() == 0
        assert sock.recv(4096).decode() == "STOPPING=1"
