"""Where a replica goes: filter the nodes, then score those left (Kubernetes' shape, on our terms).

Filters, in order, each naming why a node is out: the worker role, the node being ready, cordoned,
the placement's node labels, GPU count and model, and memory. Memory is estimated from the aimage's
weight layers (weights x 1.2, for activations and the KV cache, plus the engine's own overhead) and
accounted against the scheduler's own claims, never against what a GPU reports in use at the moment,
so two placements cannot both count the same free bytes. A GPU replica asks that estimate spread over
its GPUs; a CPU replica asks it of the node's memory.

Scores: the share of the aimage's layer bytes already in the node's store first (no pull), then
binpack (the fullest node that fits) or spread (the node with the fewest replicas of the deployment,
then the emptiest).

When nothing fits, a replica may preempt: on a node that fails only for memory, the preemptible
replicas of lower priority are evicted, lowest priority first, until it fits; the node needing the
fewest and least important evictions wins. A must-stay replica is never evicted.
"""
from __future__ import annotations

from dataclasses import dataclass, field

GIB = 1 << 30
WEIGHTS_FACTOR = 1.2
ENGINE_OVERHEAD_BYTES = {"transformers": 1 * GIB, "vllm": 2 * GIB, "tensorrt_llm": 2 * GIB}
DEFAULT_ENGINE_OVERHEAD = 1 * GIB


def memory_estimate(weights_bytes: int, engine: str) -> int:
    return int(weights_bytes * WEIGHTS_FACTOR) + ENGINE_OVERHEAD_BYTES.get(engine, DEFAULT_ENGINE_OVERHEAD)


@dataclass(frozen=True)
class Gpu:
    uuid: str
    model: str
    memory_total: int


@dataclass
class Node:
    name: str
    is_worker: bool
    ready: bool
    cordoned: bool
    labels: dict[str, str]
    memory_total: int
    gpus: list[Gpu]
    layers: set[str] = field(default_factory=set)  # blob digests in the node's store


@dataclass
class Claim:
    """A replica placed (or being placed) on a node, and the memory the scheduler counts for it."""
    replica_id: str
    deployment: str
    node: str
    gpu_memory: dict[str, int]  # GPU uuid -> bytes; empty for a CPU replica
    memory: int                 # host memory bytes of a CPU replica
    priority: int = 0
    preemptible: bool = True
    must_stay: bool = False


@dataclass(frozen=True)
class Request:
    """A replica to place."""
    deployment: str
    memory: int                       # the estimate, whole
    gpu_count: int = 0
    gpu_models: tuple[str, ...] = ()  # any of these; empty: any model
    node_labels: tuple[tuple[str, str], ...] = ()
    layers: tuple[tuple[str, int], ...] = ()  # (digest, bytes) of the aimage's layers
    priority: int = 0


@dataclass
class Placement:
    node: str
    gpu_memory: dict[str, int]
    memory: int
    evict: list[Claim] = field(default_factory=list)


class Unschedulable(Exception):
    """No node can take the replica; the message counts the nodes out for each reason."""


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


class Scheduler:
    def __init__(self, strategy: str = "binpack"):
        if strategy not in ("binpack", "spread"):
            raise ValueError(f"scheduling strategy {strategy!r}: use binpack or spread")
        self.strategy = strategy

    def place(self, request: Request, nodes: list[Node], claims: list[Claim]) -> Placement:
        """The best placement, evicting lower-priority replicas if nothing fits otherwise."""
        reasons: dict[str, int] = {}
        fits: list[Placement] = []
        short_of_memory: list[Node] = []
        for node in nodes:
            reason = self._static_reason(request, node)
            if reason is None:
                placement, reason = self._fit(request, node, [c for c in claims if c.node == node.name])
                if placement is not None:
                    fits.append(placement)
                    continue
                short_of_memory.append(node)
            reasons[reason] = reasons.get(reason, 0) + 1
        if fits:
            by_name = {n.name: n for n in nodes}
            return max(fits, key=lambda p: self._score(request, by_name[p.node], p, claims))
        preempting = self._preempt(request, short_of_memory, claims)
        if preempting is not None:
            return preempting
        detail = "; ".join(f"{count} {reason}" for reason, count in sorted(reasons.items(), key=lambda r: -r[1]))
        raise Unschedulable(f"0/{len(nodes)} nodes can take a replica of {request.deployment!r}"
                            + (f": {detail}" if detail else ""))

    # -- filters ------------------------------------------------------------------------------------

    @staticmethod
    def _static_reason(request: Request, node: Node) -> str | None:
        """Why the node can never take the request, whatever it runs; None when it could."""
        if not node.is_worker:
            return "not a worker"
        if not node.ready:
            return "not ready"
        if node.cordoned:
            return "cordoned"
        missing = [f"{k}={v}" for k, v in request.node_labels if node.labels.get(k) != v]
        if missing:
            return f"without the labels {', '.join(missing)}"
        if request.gpu_count:
            gpus = [g for g in node.gpus if not request.gpu_models or g.model in request.gpu_models]
            if len(gpus) < request.gpu_count:
                models = f" of model {' or '.join(request.gpu_models)}" if request.gpu_models else ""
                return f"with fewer than {request.gpu_count} GPU(s){models}"
        return None

    def _fit(self, request: Request, node: Node, claims: list[Claim]) -> tuple[Placement | None, str]:
        if not request.gpu_count:
            used = sum(c.memory for c in claims)
            free = node.memory_total - used
            if free >= request.memory:
                return Placement(node.name, {}, request.memory), ""
            return None, f"short of memory (need {_gib(request.memory)})"
        per_gpu = -(-request.memory // request.gpu_count)
        claimed: dict[str, int] = {}
        for c in claims:
            for uuid, n in c.gpu_memory.items():
                claimed[uuid] = claimed.get(uuid, 0) + n
        candidates = [g for g in node.gpus if not request.gpu_models or g.model in request.gpu_models]
        free = sorted(((g.memory_total - claimed.get(g.uuid, 0), g.uuid) for g in candidates),
                      reverse=self.strategy == "spread")
        chosen = [uuid for room, uuid in free if room >= per_gpu][:request.gpu_count]
        if len(chosen) < request.gpu_count:
            return None, f"short of GPU memory (need {_gib(per_gpu)} on each of {request.gpu_count} GPU(s))"
        return Placement(node.name, {uuid: per_gpu for uuid in chosen}, 0), ""

    # -- scores -------------------------------------------------------------------------------------

    def _score(self, request: Request, node: Node, placement: Placement, claims: list[Claim]) -> tuple:
        total = sum(size for _, size in request.layers)
        local = sum(size for digest, size in request.layers if digest in node.layers)
        locality = local / total if total else 0.0
        mine = [c for c in claims if c.node == node.name]
        if request.gpu_count:
            capacity = sum(g.memory_total for g in node.gpus)
            used = sum(sum(c.gpu_memory.values()) for c in mine) + sum(placement.gpu_memory.values())
        else:
            capacity = node.memory_total
            used = sum(c.memory for c in mine) + placement.memory
        fullness = used / capacity if capacity else 1.0
        if self.strategy == "binpack":
            return (locality, fullness, node.name)
        siblings = sum(1 for c in mine if c.deployment == request.deployment)
        return (locality, -siblings, -fullness, node.name)

    # -- preemption ---------------------------------------------------------------------------------

    def _preempt(self, request: Request, nodes: list[Node], claims: list[Claim]) -> Placement | None:
        best: tuple[tuple, Placement] | None = None
        for node in nodes:
            on_node = [c for c in claims if c.node == node.name]
            victims_pool = sorted((c for c in on_node if c.preemptible and not c.must_stay
                                   and c.priority < request.priority),
                                  key=lambda c: (c.priority, -(c.memory + sum(c.gpu_memory.values()))))
            evicted: list[Claim] = []
            for victim in victims_pool:
                evicted.append(victim)
                kept = [c for c in on_node if c not in evicted]
                placement, _ = self._fit(request, node, kept)
                if placement is not None:
                    placement.evict = list(evicted)
                    cost = (len(evicted), sum(v.priority for v in evicted), node.name)
                    if best is None or cost < best[0]:
                        best = (cost, placement)
                    break
        return None if best is None else best[1]
