"""What each replica of a deployment asks for: its spec's fields where they are set, else the aimage
configuration's (`priority`, `preemption`, `placement`, `engine.name`), else the defaults.

Placement overrides field by field: a zero value (0, empty) in the spec keeps the configuration's;
node labels are merged, the spec's winning. Memory is the configuration's `placement.memory_gib` for a
CPU replica, `min_gpu_memory_gib` (or the spec's gpu_memory) per GPU for a GPU replica, else the
scheduler's estimate from the layer sizes and the engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clowder.v1 import common_pb2, controller_pb2
from clowderd.controller.images import ResolvedImage
from clowderd.controller.scheduler import GIB, Request, memory_estimate

DEFAULT_ENGINE = "transformers"
STRATEGY_NAMES = {common_pb2.Placement.STRATEGY_BINPACK: "binpack", common_pb2.Placement.STRATEGY_SPREAD: "spread"}


@dataclass(frozen=True)
class Requirements:
    priority: int
    preemptible: bool
    must_stay: bool
    placement: common_pb2.Placement  # as the replicas' specs carry it
    strategy: str | None  # None: the cluster's
    request: Request


def _section(config: dict[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key)
    return value if isinstance(value, dict) else {}


def requirements(name: str, spec: controller_pb2.DeploymentSpec, image: ResolvedImage) -> Requirements:
    config = image.config
    preemption = _section(config, "preemption")
    configured = _section(config, "placement")
    priority = spec.priority if spec.HasField("priority") else int(config.get("priority", 0))
    preemptible = spec.preemptible if spec.HasField("preemptible") else bool(preemption.get("preemptible", True))
    must_stay = spec.must_stay if spec.HasField("must_stay") else bool(preemption.get("must_stay", False))
    override = spec.placement
    gpu_count = override.gpu_count or int(configured.get("gpu_count", 0))
    gpu_models = list(override.gpu_models) or list(configured.get("gpu_models", []))
    node_labels = {**configured.get("node_labels", {}), **override.node_selector}
    engine = override.engine or _section(config, "engine").get("name") or DEFAULT_ENGINE
    estimate = memory_estimate(image.weights_bytes, engine)
    if gpu_count:
        per_gpu = override.gpu_memory or int(float(configured.get("min_gpu_memory_gib", 0)) * GIB) \
            or -(-estimate // gpu_count)
        memory = per_gpu * gpu_count
    else:
        per_gpu = 0
        memory = int(float(configured.get("memory_gib", 0)) * GIB) or estimate
    placement = common_pb2.Placement(gpu_count=gpu_count, gpu_models=gpu_models, gpu_memory=per_gpu,
                                     node_selector=node_labels, engine=engine, strategy=override.strategy)
    request = Request(deployment=name, memory=memory, gpu_count=gpu_count, gpu_models=tuple(gpu_models),
                      node_labels=tuple(sorted(node_labels.items())), layers=image.layers, priority=priority)
    return Requirements(priority, preemptible, must_stay, placement, STRATEGY_NAMES.get(override.strategy), request)
