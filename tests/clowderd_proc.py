"""Run the real clowderd program as a subprocess for tests.

The ``clowderd`` fixture is a factory::

    def test_x(clowderd):
        proc = clowderd(roles=("storage",), config_extra={"log": {"level": "debug"}})
        stub = node_pb2_grpc.NodeStub(proc.channel("storage"))
        ...
        assert proc.stop() == 0

It picks free loopback ports, writes a TOML config into a temporary directory, starts
``python -m clowderd.main --config FILE`` (no install needed) and waits until every listener answers
``clowder.v1.Node/GetInfo`` over gRPC. With ``wait=False`` it returns at once, for tests that
expect the program to fail (``proc.wait()`` then gives the exit status). Teardown stops every
process still running (SIGTERM, then SIGKILL).

Channels to a process (``proc.channel(listener)``) speak as the process itself would: mutual TLS with
the certificate in its data dir on the listeners between roles (storage, worker, cluster), TLS checked
against its cluster CA on the controller's public listener. A storage-only process with no controller
given runs as a node of no cluster (`insecure = true`); an lb needs a controller to join (see
tests/cluster_fixtures.py).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import grpc
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
ALL_ROLES = ("controller", "storage", "worker", "lb")
MUTUAL_TLS = ("storage", "worker", "cluster")  # listeners between roles
START_TIMEOUT = 30.0


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the kernel's choice for an ephemeral bind), and not one this
    process handed out before: the kernel may offer a port again once its probe socket is closed, and
    two roles of one config given the same port cannot both start."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # inline table
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def to_toml(data: Mapping[str, Any]) -> str:
    """Enough TOML for clowderd configs: scalars and arrays at the top, then one level of tables."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


class ClowderdProcess:
    """A clowderd subprocess and what a test needs to talk to it."""

    def __init__(self, workdir: Path, config: dict[str, Any], roles: tuple[str, ...],
                 args: Iterable[str] = (), env: Mapping[str, str] | None = None):
        self.workdir = workdir
        self.config = config
        self.roles = roles
        self.config_path = workdir / "clowderd.toml"
        self.data_dir = Path(config.get("data_dir", workdir / "data"))
        self.addresses: dict[str, str] = {
            r: config[r]["listen"] for r in roles if isinstance(config.get(r), dict)
            and "listen" in config[r]}
        if "controller" in roles:
            self.addresses["cluster"] = config["controller"]["cluster_listen"]
        self.stderr_path = workdir / "stderr.log"
        self.stdout_path = workdir / "stdout.log"
        self.config_path.write_text(to_toml(config))
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + ([full_env["PYTHONPATH"]] if full_env.get("PYTHONPATH") else []))
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.pop("NOTIFY_SOCKET", None)
        if env:
            full_env.update(env)
        self.argv = [sys.executable, "-m", "clowderd.main", "--config", str(self.config_path),
                     *args]
        self._stderr = open(self.stderr_path, "wb")
        self._stdout = open(self.stdout_path, "wb")
        self.proc = subprocess.Popen(self.argv, cwd=str(REPO_ROOT), env=full_env,
                                     stdin=subprocess.DEVNULL, stdout=self._stdout,
                                     stderr=self._stderr)
        self._channels: list[grpc.Channel] = []

    # -- inspection

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        """stderr parsed as JSON lines (fails the test on a line that is not JSON)."""
        out = []
        for line in self.stderr_text().splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pytest.fail(f"stderr line is not JSON: {line!r}\n--- stderr ---\n"
                                f"{self.stderr_text()}")
        return out

    @property
    def insecure(self) -> bool:
        return bool(self.config.get("cluster", {}).get("insecure"))

    def identity(self):
        """The process's NodeIdentity (its certificate), None until it has one or with insecure = true."""
        from clowderd.trust.identity import NodeIdentity

        return None if self.insecure else NodeIdentity.load(self.data_dir)

    def ca(self) -> bytes | None:
        """The cluster CA the process trusts (PEM); None with insecure = true or before it has one."""
        identity = self.identity()
        return identity.material.ca if identity is not None else None

    def open_channel(self, listener: str) -> grpc.Channel:
        """A (sync) gRPC channel to a listener ("controller", "cluster", "storage", "worker", "lb") that
        presents the process's own certificate where one is asked; the caller closes it."""
        from clowderd.trust.dial import Dialer, public_channel

        address = self.addresses[listener]
        if listener in MUTUAL_TLS:
            return Dialer(self.identity()).channel(address, "controller" if listener == "cluster" else listener)
        if listener == "controller":
            return public_channel(address, self.ca())
        return grpc.insecure_channel(address)

    def channel(self, listener: str) -> grpc.Channel:
        """open_channel, closed at teardown."""
        return self.adopt(self.open_channel(listener))

    def adopt(self, channel: grpc.Channel) -> grpc.Channel:
        """Close channel at teardown."""
        self._channels.append(channel)
        return channel

    # -- lifecycle

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until every role answers Node.GetInfo; fail with the process's stderr if not."""
        from clowder.v1 import node_pb2, node_pb2_grpc

        deadline = time.monotonic() + timeout
        # An lb with TLS of its own presents a certificate this harness cannot check: its "serving" line is
        # proof enough (see _serving).
        pending = [name for name in self.addresses if not (name == "lb" and self.config["lb"].get("tls_cert"))]
        last_error = ""
        while pending:
            if self.proc.poll() is not None:
                pytest.fail(f"clowderd exited with status {self.proc.returncode} before it was "
                            f"ready ({', '.join(pending)} not answering)\n--- stderr ---\n"
                            f"{self.stderr_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"clowderd not ready after {timeout:.0f}s: {', '.join(pending)} not "
                            f"answering GetInfo ({last_error})\n--- stderr ---\n"
                            f"{self.stderr_text()}")
            role = pending[0]
            if role != "lb" and not self.insecure and self.identity() is None:
                time.sleep(0.05)  # not joined yet: no certificate to call with, no CA to check
                continue
            with self.open_channel(role) as ch:
                try:
                    node_pb2_grpc.NodeStub(ch).GetInfo(node_pb2.GetInfoRequest(), timeout=1.0)
                    pending.pop(0)
                    continue
                except grpc.RpcError as e:
                    last_error = f"{role}: {e.code().name}: {e.details()}"
            time.sleep(0.05)

    def wait(self, timeout: float = START_TIMEOUT) -> int:
        """Wait for the process to exit; fails the test if it does not in time."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"clowderd still running after {timeout:.0f}s\n--- stderr ---\n"
                        f"{self.stderr_text()}")

    def send_signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send sig, wait for exit (SIGKILL after timeout); returns the exit status."""
        self.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.close()
        return rc

    def close(self) -> None:
        for ch in self._channels:
            ch.close()
        self._channels.clear()
        for f in (self._stderr, self._stdout):
            if not f.closed:
                f.close()


def _default_config(workdir: Path, roles: tuple[str, ...]) -> dict[str, Any]:
    ports = {r: free_port() for r in ALL_ROLES}
    cfg: dict[str, Any] = {
        "data_dir": str(workdir / "data"),
        "node_name": "test-node",
        "roles": list(roles),
        "shutdown_grace_seconds": 5,
        "log": {"level": "info", "format": "json"},
    }
    for r in ALL_ROLES:
        cfg[r] = {"listen": f"127.0.0.1:{ports[r]}"}
    cfg["controller"]["cluster_listen"] = f"127.0.0.1:{free_port()}"
    cfg["storage"]["http_listen"] = f"127.0.0.1:{free_port()}"  # not the fixed default 5000
    cfg["lb"]["http_listen"] = f"127.0.0.1:{free_port()}"  # nor 7080
    if "controller" not in roles and set(roles) <= {"storage", "worker"}:
        # A node of no cluster (a registry, a worker driven by hand); tests of a cluster give its controller.
        cfg["cluster"] = {"insecure": True}
    return cfg


@pytest.fixture
def clowderd(tmp_path_factory: pytest.TempPathFactory):
    """Factory: ``clowderd(roles=..., config_extra=None, *, wait=True, args=(), env=None)``."""
    started: list[ClowderdProcess] = []

    def start(roles: Iterable[str] = ALL_ROLES, config_extra: Mapping[str, Any] | None = None,
              *, wait: bool = True, args: Iterable[str] = (),
              env: Mapping[str, str] | None = None) -> ClowderdProcess:
        roles = tuple(roles)
        pinned = bool(config_extra) and any(
            isinstance(v, Mapping) and "listen" in v for v in config_extra.values())
        for attempt in range(3):
            workdir = tmp_path_factory.mktemp("clowderd")
            cfg = deep_merge(_default_config(workdir, roles), config_extra or {})
            proc = ClowderdProcess(workdir, cfg, roles, args=args, env=env)
            started.append(proc)
            if not wait:
                return proc
            # Ports were free when picked; another test on this machine may take one first.
            # Retry with new ports then, unless the test chose the addresses itself.
            if not pinned:
                deadline = time.monotonic() + START_TIMEOUT
                while proc.proc.poll() is None and not _serving(proc) and \
                        time.monotonic() < deadline:
                    time.sleep(0.05)
                if proc.proc.poll() is not None and "already in use" in proc.stderr_text() \
                        and attempt < 2:
                    proc.close()
                    continue
            proc.wait_ready()
            return proc
        raise AssertionError("unreachable")

    yield start
    for p in started:
        if p.proc.poll() is None:
            p.stop(signal.SIGTERM, timeout=15)
        p.close()


def _serving(proc: ClowderdProcess) -> bool:
    """Whether the process has logged its last "serving" line (cheap check before gRPC polls)."""
    text = proc.stderr_text()
    return text.count('"serving"') + text.count(" serving ") >= len(proc.addresses)
