"""clowderd.server.Process in this test's own event loop: the grace period and shutdown hooks.

The subprocess tests cannot hold a call open on purpose (every RPC but Node.Watch answers at
once), so a test-only service is added here, from the test, to the storage role's server.
"""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

import clowderd.storage.service as storage_service
from clowderd.config import build_config
from clowderd.server import Process, StartupError


def _slow_service(started: asyncio.Event, outcomes: dict[str, str]):
    async def sleep(request: bytes, context) -> bytes:
        seconds = float(request.decode())
        started.set()
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            outcomes[request.decode()] = "cancelled"
            raise
        outcomes[request.decode()] = "finished"
        return b"done"

    return grpc.method_handlers_generic_handler(
        "test.Slow", {"Sleep": grpc.unary_unary_rpc_method_handler(sleep)})


def _config(tmp_path, grace: float):
    cfg = build_config(None, {"roles": "storage", "data_dir": str(tmp_path / "data"),
                              "storage.listen": "127.0.0.1:0", "cluster.insecure": True})
    cfg.shutdown_grace_seconds = grace
    return cfg


def test_grace_period_lets_short_calls_finish_and_cancels_the_rest(tmp_path, monkeypatch):
    outcomes: dict[str, str] = {}
    order: list[str] = []

    async def scenario():
        started = asyncio.Event()
        real_register = storage_service.register

        def register(server, process):
            real_register(server, process)
            server.add_generic_rpc_handlers((_slow_service(started, outcomes),))

        monkeypatch.setattr(storage_service, "register", register)
        process = Process(_config(tmp_path, grace=1.0))

        async def close_first():
            order.append("first")

        async def close_second():
            order.append("second")
            raise RuntimeError("a failing callback does not stop the others")

        process.on_shutdown(close_first)
        process.on_shutdown(close_second)
        await process.start()
        addr = process.listeners["storage"]
        async with grpc.aio.insecure_channel(addr) as ch:
            call = ch.unary_unary("/test.Slow/Sleep")
            short = asyncio.ensure_future(call(b"0.3", timeout=10))
            long = asyncio.ensure_future(call(b"30", timeout=40))
            await started.wait()
            await asyncio.sleep(0.1)
            t0 = time.monotonic()
            process.request_stop("test")
            await process.shutdown()
            elapsed = time.monotonic() - t0
            assert await short == b"done"
            with pytest.raises(grpc.aio.AioRpcError):
                await long
            # New calls are refused once shutdown has begun.
            with pytest.raises(grpc.aio.AioRpcError):
                await call(b"0", timeout=2)
        return elapsed

    elapsed = asyncio.run(scenario())
    assert outcomes == {"0.3": "finished", "30": "cancelled"}
    assert 0.8 <= elapsed < 5, elapsed
    assert order == ["second", "first"]  # newest first


def test_start_fails_before_serving_when_data_dir_is_locked(tmp_path):
    async def scenario():
        a = Process(_config(tmp_path, grace=0))
        await a.start()
        b = Process(_config(tmp_path, grace=0))
        with pytest.raises(StartupError, match="in use by another clowderd"):
            await b.start()
        assert not b.servers
        a.request_stop("test")
        await a.shutdown()

    asyncio.run(scenario())


def test_second_stop_request_cancels_without_waiting_for_grace(tmp_path, monkeypatch):
    outcomes: dict[str, str] = {}

    async def scenario():
        started = asyncio.Event()
        real_register = storage_service.register

        def register(server, process):
            real_register(server, process)
            server.add_generic_rpc_handlers((_slow_service(started, outcomes),))

        monkeypatch.setattr(storage_service, "register", register)
        process = Process(_config(tmp_path, grace=30.0))
        await process.start()
        async with grpc.aio.insecure_channel(process.listeners["storage"]) as ch:
            long = asyncio.ensure_future(ch.unary_unary("/test.Slow/Sleep")(b"60", timeout=90))
            await started.wait()
            t0 = time.monotonic()
            process.request_stop("SIGTERM")
            shutdown = asyncio.ensure_future(process.shutdown())
            await asyncio.sleep(0.3)
            process.request_stop("SIGTERM")  # the operator insists
            await shutdown
            with pytest.raises(grpc.aio.AioRpcError):
                await long
        return time.monotonic() - t0

    assert asyncio.run(scenario()) < 5
    assert outcomes == {"60": "cancelled"}
