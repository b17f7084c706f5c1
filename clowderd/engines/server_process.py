"""A server program run as a child of the engine host: in its own process group, its output in our log,
stopped with everything it started, and never outliving the host.

The child leads a new process group, so stopping it signals the group: the worker processes a server
starts (vLLM's engine core, TensorRT-LLM's MPI workers) go with it. On Linux the child also gets SIGKILL
when the thread that started it ends (prctl PR_SET_PDEATHSIG), so a host killed with SIGKILL, or one that
exits at once because its worker died, takes its server with it; the thread that starts servers must
therefore live as long as they should.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger(__name__)

TAIL_LINES = 40
KILL_WAIT_S = 5.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent_thread():
    """preexec_fn for Popen: prepared before the fork, so the child only makes one system call."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def describe_exit(status: int) -> str:
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


class ServerProcess:
    """One run of a server program. `name` prefixes its lines in the log (e.g. "vllm")."""

    def __init__(self, argv: list[str], env: dict[str, str], name: str):
        self.argv = argv
        self.env = env
        self.name = name
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._proc: subprocess.Popen | None = None
        self._pump: threading.Thread | None = None
        self._stopped = False

    def start(self) -> "ServerProcess":
        self._proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      preexec_fn=_die_with_parent_thread())
        self._pump = threading.Thread(target=self._read_output, name=f"{self.name}-output", daemon=True)
        self._pump.start()
        log.info("started %s (pid %d): %s", self.name, self.pid, " ".join(self.argv))
        return self

    @property
    def pid(self) -> int:
        return self._proc.pid

    def poll(self) -> int | None:
        """The exit status once the server has exited, else None."""
        return self._proc.poll()

    def exit_reason(self) -> str:
        """'the vllm server (pid N) exited with status 1' (once it has exited)."""
        return f"the {self.name} server (pid {self.pid}) {describe_exit(self._proc.returncode)}"

    def exit_summary(self) -> str:
        """exit_reason, and when it exited on its own with an error status, the last line it printed (a
        Python error's own line). A signal is its own reason."""
        last = next((line for line in reversed(self.tail) if line.strip()), "")
        reason = self.exit_reason()
        return f"{reason}: {last}" if last and self._proc.returncode > 0 else reason

    def last_lines(self, n: int = 15) -> str:
        """'; its last lines:' and up to `n` lines, to end an error message."""
        lines = list(self.tail)[-n:]
        return "; its last lines:\n" + "\n".join(lines) if lines else "; it printed nothing"

    def stop(self, timeout: float) -> int:
        """SIGTERM to the whole group, SIGKILL to what is left after `timeout` seconds; returns the exit
        status. Once stopped, it is never signalled again: its pid may name another process by then."""
        if self._stopped:
            return self._proc.returncode
        self._signal_group(signal.SIGTERM)
        if not self._wait_group(timeout):
            log.warning("%s (pid %d) still running %g s after SIGTERM; sending SIGKILL", self.name, self.pid,
                        timeout)
            self._signal_group(signal.SIGKILL)
            if not self._wait_group(KILL_WAIT_S):
                log.error("%s (pid %d): processes of its group are still listed %g s after SIGKILL (zombies "
                          "nobody reaps?)", self.name, self.pid, KILL_WAIT_S)
        status = self._proc.wait()
        self._pump.join(timeout=KILL_WAIT_S)
        self._stopped = True
        return status

    def _wait_group(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._group_alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def _group_alive(self) -> bool:
        """Whether any process is left in the group (the leader counts until it is reaped)."""
        self._proc.poll()
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # a member that changed its user: still there
            return True
        return True

    def _read_output(self) -> None:
        for raw in self._proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            log.info("%s[%d] %s", self.name, self.pid, line)
        self._proc.stdout.close()
