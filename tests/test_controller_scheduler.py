"""The scheduler's filters, scores and preemption, on nodes and claims given as data."""
from __future__ import annotations

import pytest

from clowderd.controller.scheduler import (GIB, Claim, Gpu, Node, Request, Scheduler, Unschedulable,
                                           memory_estimate)


def gpu_node(name, *gpus, labels=None, layers=(), **kw) -> Node:
    return Node(name, is_worker=kw.pop("is_worker", True), ready=kw.pop("ready", True),
                cordoned=kw.pop("cordoned", False), labels=labels or {}, memory_total=64 * GIB,
                gpus=[Gpu(f"{name}-gpu{i}", model, mem * GIB) for i, (model, mem) in enumerate(gpus)],
                layers=set(layers))


def test_the_memory_estimate_is_weights_times_1_2_plus_the_engines_overhead():
    assert memory_estimate(10 * GIB, "transformers") == 12 * GIB + 1 * GIB
    assert memory_estimate(10 * GIB, "vllm") == 12 * GIB + 2 * GIB


def test_each_filter_names_how_many_nodes_it_kept_out():
    nodes = [gpu_node("lb", is_worker=False), gpu_node("down", ("H100", 80), ready=False),
             gpu_node("fenced", ("H100", 80), cordoned=True), gpu_node("eu", ("H100", 80), labels={"zone": "eu"}),
             gpu_node("small", ("H100", 80), labels={"zone": "us"}),
             gpu_node("a100", ("A100", 80), ("A100", 80), labels={"zone": "us"})]
    request = Request("big", memory=100 * GIB, gpu_count=1, gpu_models=("H100",), node_labels=(("zone", "us"),))
    with pytest.raises(Unschedulable) as e:
        Scheduler().place(request, nodes, [])
    message = str(e.value)
    assert message.startswith("0/6 nodes can take a replica of 'big': ")
    for part in ("1 not a worker", "1 not ready", "1 cordoned", "1 without the labels zone=us",
                 "1 with fewer than 1 GPU(s) of model H100", "1 short of GPU memory (need 100.0 GiB on each of 1"):
        assert part in message


def test_claims_are_counted_so_two_placements_never_share_the_same_free_bytes():
    nodes = [gpu_node("n1", ("H100", 80))]
    scheduler = Scheduler()
    first = scheduler.place(Request("a", memory=50 * GIB, gpu_count=1), nodes, [])
    claims = [Claim("a-0", "a", first.node, first.gpu_memory, 0)]
    with pytest.raises(Unschedulable):
        scheduler.place(Request("b", memory=40 * GIB, gpu_count=1), nodes, claims)
    assert scheduler.place(Request("b", memory=30 * GIB, gpu_count=1), nodes, claims).node == "n1"


def test_a_multi_gpu_replica_gets_its_estimate_spread_over_distinct_gpus():
    nodes = [gpu_node("n1", ("H100", 80), ("H100", 80), ("H100", 80))]
    claims = [Claim("x-0", "x", "n1", {"n1-gpu0": 70 * GIB}, 0)]
    placement = Scheduler().place(Request("tp2", memory=100 * GIB, gpu_count=2), nodes, claims)
    assert placement.gpu_memory == {"n1-gpu1": 50 * GIB, "n1-gpu2": 50 * GIB}


def test_a_cpu_replica_is_placed_by_the_nodes_memory():
    nodes = [gpu_node("n1"), gpu_node("n2")]
    claims = [Claim("c-0", "c", "n1", {}, 60 * GIB)]
    assert Scheduler().place(Request("d", memory=8 * GIB), nodes, claims).node == "n2"


def test_layers_already_on_a_node_win_over_binpack_and_spread():
    nodes = [gpu_node("empty", ("H100", 80)), gpu_node("has", ("H100", 80), layers={"sha256:w"})]
    request = Request("m", memory=10 * GIB, gpu_count=1, layers=(("sha256:w", 9 * GIB), ("sha256:c", 1)))
    for strategy in ("binpack", "spread"):
        assert Scheduler(strategy).place(request, nodes, []).node == "has"


def test_binpack_fills_the_fullest_node_and_spread_the_emptiest():
    nodes = [gpu_node("busy", ("H100", 80)), gpu_node("idle", ("H100", 80))]
    claims = [Claim("o-0", "other", "busy", {"busy-gpu0": 40 * GIB}, 0)]
    request = Request("m", memory=10 * GIB, gpu_count=1)
    assert Scheduler("binpack").place(request, nodes, claims).node == "busy"
    assert Scheduler("spread").place(request, nodes, claims).node == "idle"


def test_spread_keeps_replicas_of_one_deployment_apart():
    nodes = [gpu_node("n1"), gpu_node("n2")]
    claims = [Claim("m-0", "m", "n1", {}, 1 * GIB), Claim("o-0", "other", "n2", {}, 30 * GIB)]
    assert Scheduler("spread").place(Request("m", memory=1 * GIB), nodes, claims).node == "n2"


def test_a_higher_priority_replica_evicts_the_fewest_least_important_preemptible_ones():
    nodes = [gpu_node("n1", ("H100", 80)), gpu_node("n2", ("H100", 80))]
    claims = [Claim("low-0", "low", "n1", {"n1-gpu0": 40 * GIB}, 0, priority=0),
              Claim("low-1", "low", "n1", {"n1-gpu0": 40 * GIB}, 0, priority=0),
              Claim("mid-0", "mid", "n2", {"n2-gpu0": 70 * GIB}, 0, priority=5),
              Claim("pin-0", "pin", "n2", {"n2-gpu0": 10 * GIB}, 0, priority=-1, must_stay=True)]
    placement = Scheduler().place(Request("vip", memory=40 * GIB, gpu_count=1, priority=10), nodes, claims)
    assert placement.node == "n1" and [v.replica_id for v in placement.evict] == ["low-0"]


def test_must_stay_and_non_preemptible_replicas_and_equal_priorities_are_never_evicted():
    nodes = [gpu_node("n1", ("H100", 80))]
    for claim in (Claim("pin-0", "pin", "n1", {"n1-gpu0": 80 * GIB}, 0, priority=0, must_stay=True),
                  Claim("firm-0", "firm", "n1", {"n1-gpu0": 80 * GIB}, 0, priority=0, preemptible=False),
                  Claim("peer-0", "peer", "n1", {"n1-gpu0": 80 * GIB}, 0, priority=10)):
        with pytest.raises(Unschedulable) as e:
            Scheduler().place(Request("vip", memory=40 * GIB, gpu_count=1, priority=10), nodes, [claim])
        assert "short of GPU memory" in str(e.value)
