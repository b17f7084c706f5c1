"""The engine host process: one per deployment replica, so a crash or an out-of-memory kills one replica,
not the worker.

    python -m clowderd.engines.host --socket ipc:///tmp/x/engine.sock --model-dir DIR --engine transformers \
        --params '{"dtype": "bfloat16"}' [--adapter NAME=DIR ...]

The worker binds the socket; the host connects a zmq DEALER to it, loads the model, says `ready` (or sends
an `error` and exits with status 3), then serves the calls of protocol.py, each as its own task, so many
streams run at once and health pings are answered while a long call runs. It exits when told to unload, on
SIGTERM or SIGINT, and on its own within a quarter second when its parent process dies.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import zmq
import zmq.asyncio

from clowderd import eventloop
from clowderd.engines import protocol
from clowderd.engines.base import Engine, GenerateRequest
from clowderd.engines.errors import EngineError
from clowderd.engines.registry import create_engine

log = logging.getLogger("clowderd.engines.host")

PARENT_POLL_S = 0.25


class EngineHost:
    def __init__(self, socket_address: str, engine_name: str):
        self.address = socket_address
        self.engine_name = engine_name
        self.engine: Engine | None = None
        self.streams: dict[str, asyncio.Task] = {}
        self.tasks: set[asyncio.Task] = set()
        self.stopped = asyncio.Event()
        self.handlers = {"generate": self.on_generate, "cancel": self.on_cancel, "health": self.on_health,
                         "metrics": self.on_metrics, "add_adapter": self.on_add_adapter,
                         "remove_adapter": self.on_remove_adapter, "unload": self.on_unload}

    async def run(self, model_dir: Path, adapters: dict[str, Path], params: dict) -> int:
        ctx = zmq.asyncio.Context()
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 2000  # let the last messages (an error, the unload answer) reach the worker
        self.sock.connect(self.address)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopped.set)
        try:
            t0 = time.monotonic()
            try:
                self.engine = create_engine(self.engine_name)
                await asyncio.to_thread(self.engine.load, model_dir, adapters, params)
            except Exception as e:
                log.error("load failed: %s: %s", type(e).__name__, e)
                await self.send(protocol.error_message(None, e))
                return protocol.LOAD_FAILED_STATUS
            log.info("ready in %.2f s", time.monotonic() - t0)
            await self.send({"type": "ready", "engine": self.engine_name, "model_dir": str(model_dir),
                             "adapters": sorted(adapters), "context": getattr(self.engine, "context", None),
                             "pid": os.getpid()})
            receiver = asyncio.create_task(self.receive())
            await self.stopped.wait()
            receiver.cancel()
            for task in list(self.streams.values()):
                task.cancel()
            if self.engine is not None:
                await asyncio.to_thread(self.engine.unload)
            return 0
        finally:
            self.sock.close()
            ctx.term()

    async def send(self, msg: dict) -> None:
        await self.sock.send(protocol.encode(msg))

    async def receive(self) -> None:
        while True:
            frame = await self.sock.recv()
            try:
                msg = protocol.decode(frame)
                handler = self.handlers[msg["type"]]
            except (ValueError, KeyError) as e:
                log.warning("dropped a message the host does not understand: %s (%r)", e, frame[:100])
                continue
            task = asyncio.create_task(self.dispatch(handler, msg))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def dispatch(self, handler, msg: dict) -> None:
        """Run one handler; its error, whatever it is, goes back to the caller as an `error` message."""
        try:
            result = await handler(msg)
            if result is not None:
                await self.send({"type": "result", "id": msg["id"], "value": result})
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if not isinstance(e, EngineError):
                log.exception("%s failed", msg["type"])
            await self.send(protocol.error_message(msg.get("id"), e))

    # one handler per message type; a handler returns the `result` value, or None when it answers itself

    async def on_generate(self, msg: dict) -> None:
        request = GenerateRequest.from_dict(msg["request"])
        self.streams[request.request_id] = asyncio.current_task()
        try:
            async for event in self.engine.generate(request):
                await self.send(protocol.event_message(request.request_id, event))
        finally:
            self.streams.pop(request.request_id, None)

    async def on_cancel(self, msg: dict) -> None:
        self.engine.cancel(msg["id"])

    async def on_health(self, msg: dict) -> dict:
        return self.engine.health()

    async def on_metrics(self, msg: dict) -> dict:
        return self.engine.metrics()

    async def on_add_adapter(self, msg: dict) -> dict:
        await asyncio.to_thread(self.engine.add_adapter, msg["name"], Path(msg["path"]))
        return {"adapters": self.engine.metrics()["adapters"]}

    async def on_remove_adapter(self, msg: dict) -> dict:
        await asyncio.to_thread(self.engine.remove_adapter, msg["name"])
        return {"adapters": self.engine.metrics()["adapters"]}

    async def on_unload(self, msg: dict) -> dict:
        engine, self.engine = self.engine, None
        for task in list(self.streams.values()):
            task.cancel()
        await asyncio.to_thread(engine.unload)
        self.stopped.set()
        return {"unloaded": True}


def watch_parent() -> None:
    """Exit as soon as the process that started us is gone (we were re-parented): never an orphan."""
    parent = os.getppid()

    def poll():
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        log.error("parent process %d is gone; exiting", parent)
        os._exit(1)

    threading.Thread(target=poll, name="parent-watch", daemon=True).start()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m clowderd.engines.host", description=__doc__.splitlines()[0])
    p.add_argument("--socket", required=True, help="zmq address the worker has bound (ipc://...)")
    p.add_argument("--model-dir", required=True, type=Path)
    p.add_argument("--engine", required=True)
    p.add_argument("--params", default="{}", help="engine parameters, a JSON object")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="an EP layer to load")
    args = p.parse_args(argv)
    try:
        args.params = json.loads(args.params)
    except ValueError as e:
        p.error(f"--params is not JSON: {e}")
    if not isinstance(args.params, dict):
        p.error("--params must be a JSON object")
    adapters = {}
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            p.error(f"--adapter {spec!r}: use NAME=DIR")
        adapters[name] = Path(path)
    args.adapter = adapters
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s engine-host[{os.getpid()}] %(levelname)s %(message)s")
    watch_parent()
    host = EngineHost(args.socket, args.engine)
    return eventloop.run(host.run(args.model_dir, args.adapter, args.params))


if __name__ == "__main__":
    sys.exit(main())
