"""Helpers for tests of a cluster of real clowderd processes: workers joining a controller process,
clowderctl run against it, waiting for what the cluster reports."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from tests.clowderd_proc import ClowderdProcess, deep_merge


def token_file(controller: ClowderdProcess) -> Path:
    return controller.data_dir / "controller" / "join-token"


def joining(controller: ClowderdProcess) -> dict[str, Any]:
    """The [cluster] section of a node that joins controller."""
    return {"controller": controller.addresses["controller"], "join_token_file": str(token_file(controller)),
            "insecure": controller.insecure}


def start_node(clowderd, controller: ClowderdProcess, name: str, roles: tuple[str, ...], *, wait: bool = True,
               **extra: Any) -> ClowderdProcess:
    """A clowderd of the roles given that joins controller; extra is merged into its configuration."""
    return clowderd(roles=roles, config_extra=deep_merge({"node_name": name, "cluster": joining(controller)}, extra),
                    wait=wait)


def start_worker(clowderd, controller: ClowderdProcess, name: str, *, wait: bool = True,
                 **extra: Any) -> ClowderdProcess:
    return start_node(clowderd, controller, name, ("worker",), wait=wait, **extra)


def clowderctl_env(controller: ClowderdProcess) -> dict[str, str]:
    env = {**os.environ, "CLOWDER_CONTROLLER": controller.addresses["controller"],
           "CLOWDER_DATA_DIR": str(controller.data_dir), "COLUMNS": "200"}  # tables as wide as they need
    env.pop("CLOWDER_TOKEN", None)
    return env


def clowderctl(controller: ClowderdProcess, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "clowderctl.main", *args], capture_output=True, text=True,
                            timeout=60, env=clowderctl_env(controller))
    assert not check or result.returncode == 0, result.stderr
    return result


def wait_for(what: str, condition: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.1)
