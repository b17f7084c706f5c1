"""The admin API over gRPC against a controller in the test process: paging, filters, the event watch, and
the admin token on every call."""
from __future__ import annotations

import itertools
import threading
import time

import grpc
import pytest

from clowder.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from tests.controller_fixtures import InProcessController


@pytest.fixture
def controller(tmp_path):
    ctl = InProcessController(tmp_path)
    cluster = ctl.controller.cluster
    for name, labels in (("w1", {"zone": "a"}), ("w2", {"zone": "b"}), ("w3", {"zone": "a"})):
        info = common_pb2.NodeInfo(name=name, roles=[common_pb2.ROLE_WORKER], labels=labels)
        ctl.run(lambda: cluster.call(cluster.state.enroll_node, info, time.time()))
    yield ctl
    ctl.stop()


@pytest.fixture
def admin(controller):
    token = (controller.data_dir / "controller" / "admin-token").read_text().strip()
    with grpc.insecure_channel(controller.address) as channel:
        yield controller_pb2_grpc.ControllerStub(channel), (("authorization", f"Bearer {token}"),)


def test_nodes_are_listed_page_by_page_and_filtered_by_label_and_role(admin):
    stub, auth = admin
    first = stub.ListNodes(controller_pb2.ListNodesRequest(page_size=2), metadata=auth, timeout=10)
    assert [n.info.name for n in first.nodes] == ["w1", "w2"] and first.next_page_token
    rest = stub.ListNodes(controller_pb2.ListNodesRequest(page_size=2, page_token=first.next_page_token),
                          metadata=auth, timeout=10)
    assert [n.info.name for n in rest.nodes] == ["w3"] and rest.next_page_token == ""
    zone_a = stub.ListNodes(controller_pb2.ListNodesRequest(label_selector="zone=a"), metadata=auth, timeout=10)
    assert [n.info.name for n in zone_a.nodes] == ["w1", "w3"]
    lbs = stub.ListNodes(controller_pb2.ListNodesRequest(roles=[common_pb2.ROLE_LB]), metadata=auth, timeout=10)
    assert list(lbs.nodes) == []
    with pytest.raises(grpc.RpcError) as error:
        stub.ListNodes(controller_pb2.ListNodesRequest(label_selector="zone"), metadata=auth, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == "label_selector: 'zone' is not key=value"


def test_events_are_listed_page_by_page_and_watched_as_they_happen(admin):
    stub, auth = admin
    first = stub.ListEvents(controller_pb2.ListEventsRequest(page_size=2), metadata=auth, timeout=10)
    rest = stub.ListEvents(controller_pb2.ListEventsRequest(page_size=2, page_token=first.next_page_token),
                           metadata=auth, timeout=10)
    assert [e.object_name for e in [*first.events, *rest.events]] == ["w1", "w2", "w3"]
    assert rest.next_page_token == ""

    watch = stub.WatchEvents(controller_pb2.WatchEventsRequest(object_kind="Node", object_name="w2"),
                             metadata=auth, timeout=20)
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(itertools.islice(watch, 2)))
    reader.start()
    time.sleep(0.5)  # the watch is open: what follows is new
    stub.CordonNode(controller_pb2.CordonNodeRequest(name="w1"), metadata=auth, timeout=10)
    stub.DrainNode(controller_pb2.DrainNodeRequest(name="w2"), metadata=auth, timeout=10)
    stub.UncordonNode(controller_pb2.UncordonNodeRequest(name="w2"), metadata=auth, timeout=10)
    reader.join(15)
    assert [(e.reason, e.object_name) for e in seen] == [("NodeDraining", "w2"), ("NodeUncordoned", "w2")]
    assert seen[0].revision == rest.events[-1].revision + 2
    watch.cancel()


def test_the_event_watch_ends_when_the_controller_stops(controller, admin):
    stub, auth = admin
    watch = stub.WatchEvents(controller_pb2.WatchEventsRequest(), metadata=auth, timeout=20)
    ended = threading.Event()
    threading.Thread(target=lambda: (list(watch), ended.set())).start()
    time.sleep(0.5)
    controller.stop()
    assert ended.wait(5) and watch.code() == grpc.StatusCode.OK


@pytest.mark.parametrize("metadata, expect", [
    ((), "no admin token was given"),
    ((("authorization", "Bearer clowder-admin-wrong"),), "the admin token is wrong"),
])
def test_every_admin_call_needs_the_admin_token(admin, metadata, expect):
    stub, _ = admin
    for call in (lambda: stub.GetNode(controller_pb2.GetNodeRequest(name="w1"), metadata=metadata, timeout=10),
                 lambda: stub.GetJoinToken(controller_pb2.GetJoinTokenRequest(), metadata=metadata, timeout=10),
                 lambda: next(stub.WatchEvents(controller_pb2.WatchEventsRequest(), metadata=metadata, timeout=10))):
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error.value.details().startswith(expect)
