"""Settings: file, flags, and the one-line errors that stop clowderd before it starts."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from clowderd.config import Address, ConfigError, build_config, parse_address
from tests.clowderd_proc import REPO_ROOT, to_toml

# ---- in-process: parsing and validation ----


def write(tmp_path, text: str):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return str(p)


def test_defaults():
    cfg = build_config(None, {})
    assert cfg.roles == ("controller", "storage", "worker", "lb")
    assert cfg.data_dir == "/var/lib/clowder"
    assert cfg.shutdown_grace_seconds == 10
    assert [str(cfg.role[r].listen) for r in cfg.roles] == [
        "127.0.0.1:7070", "127.0.0.1:7071", "127.0.0.1:7072", "127.0.0.1:7073"]
    assert str(cfg.controller_cluster_listen) == "127.0.0.1:7074"
    assert cfg.cluster_controller is None  # the local controller
    assert not cfg.insecure and cfg.certificate_lifetime_seconds == 30 * 86400
    assert (cfg.log_level, cfg.log_format) == ("info", "json")


def test_flags_override_file(tmp_path):
    path = write(tmp_path, 'roles = ["storage"]\nnode_name = "a"\n[cluster]\ninsecure = true\n'
                           '[storage]\nlisten = "0.0.0.0:9000"\n')
    cfg = build_config(path, {"node_name": "b", "storage.listen": "[::1]:9001"})
    assert cfg.roles == ("storage",)
    assert cfg.node_name == "b"
    assert cfg.role["storage"].listen == Address("::1", 9001)
    assert str(cfg.role["storage"].listen) == "[::1]:9001"


@pytest.mark.parametrize("text, expect", [
    ("bogus = 1\n", "unknown key 'bogus'"),
    ("[storage]\nlisten = \"127.0.0.1:1\"\nport = 3\n", "unknown key 'storage.port'"),
    ("[nope]\n", "unknown key 'nope'"),
    ("storage = 3\n", "storage: expected a table"),
    ("roles = [\"gpu\"]\n", "roles: unknown role 'gpu'"),
    ("roles = \"storage\"\n", "roles"),  # a string is accepted as a comma list
    ("roles = []\n", "roles: no roles"),
    ("shutdown_grace_seconds = \"10\"\n", "shutdown_grace_seconds: expected a number"),
    ("shutdown_grace_seconds = true\n", "shutdown_grace_seconds: expected a number"),
    ("[log]\nlevel = \"loud\"\n", "log.level: 'loud' is not one of"),
    ("[controller]\nlisten = \"localhost\"\n", "controller.listen: 'localhost' is not HOST:PORT"),
    ("[controller]\nlisten = \"1.2.3.4:70000\"\n", "out of range"),
    ("[controller]\nlisten = 7070\n", "controller.listen: expected a string"),
    ("[cluster]\ncontroller = \"h:0\"\n", "cluster.controller: port 0"),
    ("[controller]\ncluster_listen = \"127.0.0.1:7071\"\n", "also the listen address of"),
    ("[cluster]\ninsecure = 1\n", "cluster.insecure: expected true or false"),
    ("[storage]\nlisten = \"127.0.0.1:7070\"\n", "also the listen address of controller"),
    ("node_name = \"bad name\"\n", "node_name: 'bad name' is not a valid node name"),
    ("x = \n", "invalid TOML"),
])
def test_file_errors_name_file_and_key(tmp_path, text, expect):
    path = write(tmp_path, text)
    if text.startswith('roles = "storage"'):
        assert build_config(path, {"cluster.insecure": True}).roles == ("storage",)
        return
    with pytest.raises(ConfigError) as ei:
        build_config(path, {})
    msg = str(ei.value)
    assert msg.startswith(path + ": "), msg
    assert expect in msg
    assert "\n" not in msg


def test_flag_errors_name_the_flag():
    with pytest.raises(ConfigError, match=r"^--lb-listen: 'x' is not HOST:PORT"):
        build_config(None, {"lb.listen": "x"})
    with pytest.raises(ConfigError, match=r"^--roles: unknown role 'db'"):
        build_config(None, {"roles": "storage,db"})


def test_a_node_without_the_controller_role_needs_the_controllers_address(tmp_path):
    path = write(tmp_path, 'roles = ["worker"]\n')
    with pytest.raises(ConfigError, match=r"c.toml: cluster: controller is required"):
        build_config(path, {})
    path2 = write(tmp_path, 'roles = ["worker"]\n[cluster]\ncontroller = "ctl.example:7070"\njoin_token = "t"\n')
    assert build_config(path2, {}).cluster_controller == Address("ctl.example", 7070)
    assert build_config(path, {"cluster.controller": "ctl.example:7070", "cluster.join_token": "t"}
                        ).cluster_controller == Address("ctl.example", 7070)


def test_a_node_of_a_remote_controller_needs_one_join_token(tmp_path):
    path = write(tmp_path, 'roles = ["worker"]\n[cluster]\ncontroller = "ctl.example:7070"\n')
    with pytest.raises(ConfigError, match=r"c.toml: cluster: join_token or join_token_file is required"):
        build_config(path, {})
    path = write(tmp_path, 'roles = ["worker"]\n[cluster]\ncontroller = "ctl.example:7070"\n'
                           'join_token = "t"\njoin_token_file = "/etc/clowder/join-token"\n')
    with pytest.raises(ConfigError, match=r"c.toml: cluster.join_token: set join_token or join_token_file, not both"):
        build_config(path, {})
    path = write(tmp_path, 'roles = ["lb"]\n[cluster]\ncontroller = "ctl.example:7070"\n'
                           'join_token_file = "/etc/clowder/join-token"\n')
    assert build_config(path, {}).join_token_file == "/etc/clowder/join-token"


def test_a_node_beside_the_controller_reads_its_join_token_file(tmp_path):
    cfg = build_config(None, {"data_dir": str(tmp_path)})
    assert cfg.join_token is None
    assert cfg.join_token_file == str(tmp_path / "controller" / "join-token")


@pytest.mark.parametrize("key", ["worker.controller", "worker.join_token", "lb.join_token_file", "lb.controller"])
def test_the_keys_that_moved_to_cluster_say_so(tmp_path, key):
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=rf"c.toml: {key} moved to \[cluster\] {name}"):
        build_config(write(tmp_path, to_toml({section: {name: "x"}})), {})


def test_a_storage_node_or_worker_of_no_cluster_needs_insecure(tmp_path):
    with pytest.raises(ConfigError, match=r"cluster: controller is required.*needs insecure = true"):
        build_config(write(tmp_path, 'roles = ["storage"]\n'), {})
    cfg = build_config(write(tmp_path, 'roles = ["storage", "worker"]\n[cluster]\ninsecure = true\n'), {})
    assert cfg.standalone and cfg.insecure
    with pytest.raises(ConfigError, match=r"cluster: controller is required"):
        build_config(write(tmp_path, 'roles = ["lb"]\n[cluster]\ninsecure = true\n'), {})
    assert not build_config(None, {"data_dir": str(tmp_path)}).standalone


@pytest.mark.parametrize("controller, expect", [
    ({"heartbeat_interval_seconds": 0}, r"controller.heartbeat_interval_seconds: expected a number of seconds "
                                        r"from 0.1 to 300, got 0"),
    ({"heartbeat_grace_seconds": "10"}, r"controller.heartbeat_grace_seconds: expected a number of seconds"),
    ({"heartbeat_interval_seconds": 5, "heartbeat_grace_seconds": 8},
     r"controller.heartbeat_grace_seconds: 8 is less than twice controller.heartbeat_interval_seconds \(5\)"),
    ({"certificate_lifetime_seconds": 5}, r"controller.certificate_lifetime_seconds: expected a number of seconds "
                                          r"from 10 to"),
])
def test_heartbeat_timing_errors_name_the_key(tmp_path, controller, expect):
    with pytest.raises(ConfigError, match=expect):
        build_config(write(tmp_path, to_toml({"controller": controller})), {})


def test_heartbeat_timing_from_the_file(tmp_path):
    cfg = build_config(write(tmp_path, to_toml({"controller": {"heartbeat_interval_seconds": 0.5,
                                                               "heartbeat_grace_seconds": 2}})), {})
    assert (cfg.heartbeat_interval_seconds, cfg.heartbeat_grace_seconds) == (0.5, 2.0)
    assert (build_config(None, {}).heartbeat_interval_seconds, build_config(None, {}).heartbeat_grace_seconds) == \
        (5.0, 15.0)


def test_the_scrub_interval_is_a_day_unless_the_file_says_otherwise_and_0_turns_it_off(tmp_path):
    assert build_config(None, {}).store_scrub_interval_seconds == 86400
    for value in (3600, 0):
        cfg = build_config(write(tmp_path, to_toml({"store": {"scrub_interval_seconds": value}})), {})
        assert cfg.store_scrub_interval_seconds == value
    with pytest.raises(ConfigError, match=r"c.toml: store.scrub_interval_seconds: expected a number of seconds, "
                                          r"or 0 for no scrub, got -1"):
        build_config(write(tmp_path, to_toml({"store": {"scrub_interval_seconds": -1}})), {})
    with pytest.raises(ConfigError, match=r"unknown key 'store.scrub_rate'"):
        build_config(write(tmp_path, to_toml({"store": {"scrub_rate": 1}})), {})


@pytest.mark.parametrize("value, ok", [
    ("0.0.0.0:1", True), ("[::]:7070", True), ("host-1.example.com:80", True),
    ("[::1]:0", True), ("::1:80", False), ("1.2.3:80", False), ("h:", False), ("[x]:1", False),
    (":80", False), ("h:80:1", False),
])
def test_parse_address(value, ok):
    if ok:
        parse_address(value, "k", allow_port_zero=True)
    else:
        with pytest.raises(ConfigError):
            parse_address(value, "k", allow_port_zero=True)


# ---- the real program ----


def run_clowderd(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clowderd.main", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_bad_config_key_exits_2_naming_file_and_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(to_toml({"data_dir": str(tmp_path / "d"), "storage": {"lissen": "x"}}))
    r = run_clowderd("--config", str(path))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(path) in lines[0] and "storage.lissen" in lines[0]
    assert not (tmp_path / "d").exists(), "nothing may be started or created"


def test_bad_flag_exits_2():
    r = run_clowderd("--roles", "storage,gpu")
    assert r.returncode == 2
    assert r.stderr.strip() == ("clowderd: error: --roles: unknown role 'gpu'; choose from "
                                "controller, storage, worker, lb")


def test_port_in_use_exits_2_naming_the_address(clowderd):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = f"127.0.0.1:{s.getsockname()[1]}"
        proc = clowderd(roles=("controller", "storage"), config_extra={"storage": {"listen": busy}},
                        wait=False)
        assert proc.wait() == 2, proc.stderr_text()
    err = proc.stderr_text()
    assert busy in err and "already in use" in err and "storage.listen" in err
    assert not [r for r in proc.log_records() if r["msg"] == "serving"], "nothing may serve"


def test_second_clowderd_on_same_data_dir_exits_2(clowderd):
    first = clowderd(roles=("storage",))
    second = clowderd(roles=("storage",), config_extra={"data_dir": str(first.data_dir)},
                      wait=False)
    assert second.wait() == 2, second.stderr_text()
    err = second.stderr_text()
    assert "in use by another clowderd" in err and f"pid {first.pid}" in err
    assert str(first.data_dir) in err
    assert first.returncode is None  # the first one is unaffected
    assert first.stop() == 0


def test_data_dir_created_0750(clowderd, tmp_path):
    data = tmp_path / "new" / "data"
    proc = clowderd(roles=("storage",), config_extra={"data_dir": str(data)})
    umask = os.umask(0)
    os.umask(umask)
    assert data.stat().st_mode & 0o777 == 0o750 & ~umask
    assert (data / "clowderd.lock").read_text().strip() == str(proc.pid)
    assert proc.stop() == 0


def test_the_controller_flag_sets_the_cluster_controller():
    cfg = build_config(None, {"roles": "worker,lb", "cluster.controller": "c:1", "cluster.join_token": "t"},
                       {"cluster.controller": "--controller"})
    assert cfg.cluster_controller == Address("c", 1)
    with pytest.raises(ConfigError, match=r"^--controller: 'c' is not HOST:PORT"):
        build_config(None, {"cluster.controller": "c"}, {"cluster.controller": "--controller"})


def test_flags_override_the_file_in_the_real_program(clowderd):
    from clowder.v1 import node_pb2, node_pb2_grpc

    proc = clowderd(roles=("storage",), args=("--node-name", "from-flag", "--log-format", "text"))
    info = node_pb2_grpc.NodeStub(proc.channel("storage")).GetInfo(node_pb2.GetInfoRequest(),
                                                                    timeout=5)
    assert info.node_name == "from-flag"
    assert proc.stop() == 0
    assert "serving role=storage" in proc.stderr_text()


def test_an_unreadable_join_token_file_exits_2_naming_the_file(clowderd, tmp_path):
    missing = tmp_path / "no-such-token"
    proc = clowderd(roles=("worker",), config_extra={"cluster": {"controller": "127.0.0.1:1",
                                                                 "join_token_file": str(missing)}}, wait=False)
    assert proc.wait() == 2, proc.stderr_text()
    assert f"cannot read the join token from {missing}" in proc.stderr_text()


def test_controller_storage_strategy_and_deployments_from_the_file(tmp_path):
    path = write(tmp_path, '[controller]\nstorage = "10.0.0.5:7071"\nstrategy = "spread"\n'
                           '[controller.deploy]\nchat = "smollm2:135m-instruct"\n')
    cfg = build_config(path, {})
    assert (cfg.controller_storage, cfg.controller_strategy) == (Address("10.0.0.5", 7071), "spread")
    assert cfg.controller_deploy == {"chat": "smollm2:135m-instruct"}
    assert build_config(None, {}).controller_storage is None  # the storage role of the same process
    with pytest.raises(ConfigError, match=r"c.toml: controller.strategy: 'pack' is not one of binpack, spread"):
        build_config(write(tmp_path, '[controller]\nstrategy = "pack"\n'), {})
    with pytest.raises(ConfigError, match=r"c.toml: controller.deploy: 'Chat' is not a deployment name"):
        build_config(write(tmp_path, '[controller.deploy]\nChat = "x:1"\n'), {})




def test_every_setting_the_example_config_shows_is_one_clowderd_takes(tmp_path):
    """systemd/clowderd.toml shows every setting commented out: uncommented, it must be a valid config
    (the join token given as a file, not also inline)."""
    lines = []
    for line in (REPO_ROOT / "systemd" / "clowderd.toml").read_text().splitlines():
        if line.startswith("#[") or (line.startswith("#") and " = " in line and not line.startswith("# ")):
            if not line.startswith("#join_token = "):
                lines.append(line[1:])
        else:
            lines.append(line)
    path = tmp_path / "clowderd.toml"
    path.write_text("\n".join(lines) + "\n")
    cfg = build_config(str(path), {})
    assert cfg.cluster_controller == Address("controller.example.internal", 7070)
    assert str(cfg.controller_cluster_listen) == "127.0.0.1:7074" and cfg.lb_http.keys_file
    assert cfg.controller_deploy == {"chat": "smollm2:135m-instruct"}
