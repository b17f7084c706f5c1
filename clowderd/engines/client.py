"""The worker's side of an engine host: start the process, wait until it is ready, stream generations,
cancel, ping, change adapters, unload, and notice when it dies.

    client = EngineClient("transformers", model_dir, params={...}, adapters={"fr": view / "adapters/fr"})
    await client.start()
    async for event in client.generate(GenerateRequest(messages=[...])):
        ...
    await client.unload()

The client binds a zmq DEALER on ipc:// in a private temporary directory and the host connects to it.
Calls and streams are told apart by id, so any number run at once. Leaving a stream early (break, an
exception, the task cancelled because the HTTP caller went away) sends `cancel`, and the engine stops
generating for it. When the host exits unexpectedly, every open call and stream fails at once with
EngineCrashed, which carries the exit status and the last lines of the host's stderr.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import uuid
from pathlib import Path
from typing import AsyncIterator

import zmq
import zmq.asyncio

import clowderd
from clowderd.engines import protocol
from clowderd.engines.base import Event, Finished, GenerateRequest, TextDelta
from clowderd.engines.errors import EngineCrashed, EngineError
from clowderd.engines.registry import check_engine

log = logging.getLogger(__name__)

STDERR_LINES = 20
MAX_FRAMES_AT_ONCE = 256  # messages taken off the socket before other tasks get a turn


class EngineClient:
    def __init__(self, engine: str, model_dir, *, params: dict | None = None,
                 adapters: dict[str, Path] | None = None, python: str = sys.executable, env: dict | None = None):
        self.engine = engine
        self.model_dir = Path(model_dir)
        self.params = params or {}
        self.adapters = {name: Path(p) for name, p in (adapters or {}).items()}
        self.python = python
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.ready_info: dict | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self._calls: dict[str, asyncio.Queue] = {}
        self._ready: asyncio.Future | None = None
        self._closing = False
        self._crash: EngineCrashed | None = None
        self._tasks: list[asyncio.Task] = []

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    async def __aenter__(self) -> "EngineClient":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.unload()

    # ---------------------------------------------------------------------------------------- lifecycle

    async def start(self, timeout: float = 600.0) -> dict:
        """Start the host and wait until the model is loaded. Raises EngineUnavailable, ModelLoadError,
        AdapterError (as the host reports them) or EngineCrashed."""
        check_engine(self.engine, self.params)
        self._dir = Path(tempfile.mkdtemp(prefix="clowder-engine-"))
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        address = f"ipc://{self._dir}/engine.sock"
        self._sock.bind(address)
        self._ready = asyncio.get_running_loop().create_future()
        args = ["-m", "clowderd.engines.host", "--socket", address, "--model-dir", str(self.model_dir),
                "--engine", self.engine, "--params", json.dumps(self.params)]
        for name, path in self.adapters.items():
            args += ["--adapter", f"{name}={path}"]
        self.proc = await asyncio.create_subprocess_exec(
            self.python, *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=self._host_env())
        self._tasks = [asyncio.create_task(self._read_messages()), asyncio.create_task(self._read_stderr()),
                       asyncio.create_task(self._watch_exit())]
        try:
            self.ready_info = await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except asyncio.TimeoutError:
            await self.kill()
            raise EngineError(f"engine host {self.engine} did not load {self.model_dir} within {timeout:g} s") from None
        except BaseException:
            await self._wait_exit(5.0)
            await self._cleanup()
            raise
        return self.ready_info

    def _host_env(self) -> dict:
        """The environment given, with this clowderd importable by the host however it was installed."""
        env = dict(os.environ if self.env is None else self.env)
        root = str(Path(clowderd.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        return env

    async def unload(self, timeout: float = 30.0) -> int | None:
        """Ask the host to free the model and exit; kill it if it does not within `timeout`. Returns the
        exit status."""
        if self.proc is None:
            return None
        self._closing = True
        if self.returncode is None and self.ready_info is not None:
            with contextlib.suppress(EngineError, asyncio.TimeoutError):
                await self._call("unload", timeout=timeout)
        if not await self._wait_exit(timeout):
            await self.kill()
        await self._cleanup()
        return self.returncode

    async def kill(self) -> None:
        self._closing = True
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()
        await self._cleanup()

    async def _wait_exit(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _cleanup(self) -> None:
        if self._ready is not None and not self._ready.done():  # a start() still waiting: wake it
            self._ready.set_exception(EngineError(f"engine host {self.engine} was stopped before it had loaded"))
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._tasks = []
        # The exit watcher may have been cancelled above before it told the open calls: tell them here,
        # or a call still streaming when its replica was unloaded would wait for ever.
        self._fail_calls(self._crash or EngineError(f"engine host {self.engine} was unloaded"))
        if not self._sock.closed:
            self._sock.close()
            self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    # ---------------------------------------------------------------------------------------- calls

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Event]:
        """Stream a generation. Raises InvalidRequest (and the other EngineErrors) as the host reports them,
        EngineCrashed when the host dies mid-stream. Text that arrived while the caller was busy comes as
        one delta: a slow reader gets fewer, longer pieces rather than falling behind."""
        queue = self._open(request.request_id)
        finished = False
        try:
            await self._send({"type": "generate", "id": request.request_id, "request": request.to_dict()})
            held = None  # a message taken off the queue while joining text, not yet given out
            while True:
                msg, held = (held, None) if held is not None else (await self._next(queue), None)
                event = protocol.message_event(msg)
                if isinstance(event, TextDelta) and not queue.empty():
                    texts = [event.text]
                    while not queue.empty():
                        msg = self._check(queue.get_nowait())
                        more = protocol.message_event(msg)
                        if not isinstance(more, TextDelta):
                            held = msg
                            break
                        texts.append(more.text)
                    event = TextDelta("".join(texts))
                finished = isinstance(event, Finished)
                yield event
                if finished:
                    return
        finally:
            self._calls.pop(request.request_id, None)
            if not finished and self.returncode is None and not self._sock.closed:
                self._sock.send(protocol.encode({"type": "cancel", "id": request.request_id}))

    async def cancel(self, request_id: str) -> None:
        await self._send({"type": "cancel", "id": request_id})

    async def health(self, timeout: float = 5.0) -> dict:
        """{"status": "ok"|"loading"|"failed"|"exited"|"unresponsive", ...}; never raises."""
        if self.returncode is not None:
            return {"status": "exited", "exit_status": self.returncode}
        if self.ready_info is None:
            return {"status": "loading"}
        try:
            return await self._call("health", timeout=timeout)
        except asyncio.TimeoutError:
            return {"status": "unresponsive", "detail": f"no answer within {timeout:g} s"}
        except EngineError as e:
            return {"status": "failed", "detail": str(e)}

    async def metrics(self, timeout: float = 5.0) -> dict:
        return await self._call("metrics", timeout=timeout)

    async def add_adapter(self, name: str, path) -> dict:
        return await self._call("add_adapter", name=name, path=str(path))

    async def remove_adapter(self, name: str) -> dict:
        return await self._call("remove_adapter", name=name)

    async def _call(self, kind: str, timeout: float | None = None, **fields):
        call_id = uuid.uuid4().hex
        queue = self._open(call_id)
        try:
            await self._send({"type": kind, "id": call_id, **fields})
            msg = await asyncio.wait_for(self._next(queue), timeout)
            return msg["value"]
        finally:
            self._calls.pop(call_id, None)

    def _open(self, call_id: str) -> asyncio.Queue:
        if self._crash is not None:
            raise self._crash
        if self.ready_info is None or self.returncode is not None:
            raise EngineError(f"engine host {self.engine} is not running")
        if call_id in self._calls:
            raise EngineError(f"id {call_id!r} is already in use")
        queue = self._calls[call_id] = asyncio.Queue()
        return queue

    async def _send(self, msg: dict) -> None:
        await self._sock.send(protocol.encode(msg))

    @classmethod
    async def _next(cls, queue: asyncio.Queue) -> dict:
        return cls._check(await queue.get())

    @staticmethod
    def _check(item) -> dict:
        """A message from the host, or raise the error it is or carries."""
        if isinstance(item, BaseException):
            raise item
        if item["type"] == "error":
            raise protocol.message_error(item)
        return item

    # ---------------------------------------------------------------------------------------- background

    async def _read_messages(self) -> None:
        while True:
            frames = [await self._sock.recv()]
            # Take what else has arrived before yielding to the loop: a reader that runs next then finds
            # several messages queued and joins their text (see generate).
            while len(frames) < MAX_FRAMES_AT_ONCE:
                try:
                    frames.append(await self._sock.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
            for frame in frames:
                self._deliver(protocol.decode(frame))

    def _deliver(self, msg: dict) -> None:
        if msg["type"] == "ready":
            if not self._ready.done():
                self._ready.set_result(msg)
        elif msg.get("id") is None and msg["type"] == "error":
            if not self._ready.done():
                self._ready.set_exception(protocol.message_error(msg))
        elif msg["id"] in self._calls:
            self._calls[msg["id"]].put_nowait(msg)

    async def _read_stderr(self) -> None:
        async for line in self.proc.stderr:
            text = line.decode(errors="replace").rstrip()
            self.stderr_tail.append(text)
            log.debug("engine host %s: %s", self.proc.pid, text)

    async def _watch_exit(self) -> None:
        status = await self.proc.wait()
        await asyncio.sleep(0.1)  # let the reader deliver what the host sent before it went
        if self._closing:
            error = EngineError(f"engine host {self.engine} was unloaded")
        else:
            with contextlib.suppress(asyncio.TimeoutError):  # the last stderr lines
                await asyncio.wait_for(self._tasks[1], 1.0)
            error = self._crash = EngineCrashed(
                f"engine host {self.engine} (pid {self.proc.pid}) exited with {describe_status(status)}"
                + ("; last stderr lines:\n" + "\n".join(self.stderr_tail) if self.stderr_tail else ""),
                exit_status=status, stderr_tail="\n".join(self.stderr_tail))
            log.error("%s", error)
        if not self._ready.done():
            self._ready.set_exception(error)
        self._fail_calls(error)

    def _fail_calls(self, error: EngineError) -> None:
        """End every open call with error (a call stops at the first error it reads; a second is never read)."""
        for queue in self._calls.values():
            queue.put_nowait(error)


def describe_status(status: int) -> str:
    if status < 0:
        try:
            return f"status {status} (killed by {signal.Signals(-status).name})"
        except ValueError:
            return f"status {status} (killed by signal {-status})"
    if status == protocol.LOAD_FAILED_STATUS:
        return f"status {status} (the model could not be loaded)"
    return f"status {status}"
