"""clowderd stops cleanly on SIGTERM and SIGINT."""
from __future__ import annotations

import signal
import threading
import time

import grpc

from clowder.v1 import node_pb2, node_pb2_grpc


def test_sigterm_while_idle_exits_0_quickly(clowderd):
    proc = clowderd()
    t0 = time.monotonic()
    assert proc.stop(signal.SIGTERM) == 0
    assert time.monotonic() - t0 < 5
    msgs = [r["msg"] for r in proc.log_records()]
    assert "stopping" in msgs and msgs[-1] == "stopped"


def test_sigint_exits_0(clowderd):
    proc = clowderd(roles=("storage",))
    assert proc.stop(signal.SIGINT) == 0
    stopping = [r for r in proc.log_records() if r["msg"] == "stopping"]
    assert stopping and stopping[0]["reason"] == "SIGINT"


def test_open_stream_ends_cleanly_on_sigterm(clowderd):
    """A Node.Watch stream open during SIGTERM gets STOPPING and a clean end (status OK),
    not a reset; new calls are refused meanwhile; the process exits 0."""
    proc = clowderd(config_extra={"shutdown_grace_seconds": 5})
    stream = node_pb2_grpc.NodeStub(proc.channel("worker")).Watch(node_pb2.WatchRequest(),
                                                                   timeout=20)
    first = next(stream)
    assert first.state == node_pb2.SERVING_STATE_SERVING
    received = []
    done = threading.Event()

    def read_rest():
        try:
            received.extend(stream)
        finally:
            done.set()

    threading.Thread(target=read_rest, daemon=True).start()
    time.sleep(0.2)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert done.wait(10), "stream did not end"
    assert [m.state for m in received] == [node_pb2.SERVING_STATE_STOPPING]
    assert stream.code() == grpc.StatusCode.OK
    assert proc.wait(10) == 0
    # The stream ended itself: shutdown did not have to wait out the 5 s grace period.
    assert time.monotonic() - t0 < 4
    assert proc.log_records()[-1]["msg"] == "stopped"
