"""The reconcile loop: make the replicas of every deployment what its spec asks for.

One pass, on the state's thread (so that nothing changes under it), in this order:

1. Replicas on a node that is not ready (unreachable) are removed; new ones, with new ids, take their
   place in step 3. If the node comes back, its assignment snapshot no longer has them: it stops them.
   A removed replica on a ready node is TERMINATING until the node stops reporting it: it counts
   for nothing here but its claim on the node's memory (and a drain is over only once it is gone).
2. Per deployment, a replica is current when its spec is what the deployment asks for now (image,
   placement, sources) and its node is not draining; the others are outdated. A current replica
   that FAILED is restarted where it is, as a new generation, after a backoff (1 s, doubling, at
   most RESTART_BACKOFF_MAX_S); after MAX_FAILURES in a row it is left FAILED and the deployment
   shows it. Missing current replicas are added (unplaced); extra ones removed, those not serving
   first. Outdated replicas that are not READY go at once; READY ones go one by one as current
   ones become READY, so that a rolling update or a drain keeps as many replicas serving as asked.
   A draining node with no replica left has finished draining.
3. Unplaced replicas are placed, the most important first, by the scheduler on the claims of the
   placed ones; evicted replicas are unplaced again (they are placed in the next pass, if they fit);
   a replica that fits nowhere keeps the scheduler's reason.

The loop runs a pass whenever DEPLOYMENTS moves and every PERIOD_S (restarts fall due on time).
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field

from clowder.v1 import common_pb2
from clowderd.config import STRATEGIES
from clowderd.controller.cluster import DEPLOYMENTS, Cluster, assignments_key
from clowderd.controller.requirements import Requirements, requirements
from clowderd.controller.scheduler import Claim, Gpu, Node, Scheduler, Unschedulable
from clowderd.controller.state import READY, DeploymentRecord, NodeRecord, ReplicaRecord

log = logging.getLogger(__name__)

PERIOD_S = 2.0
MAX_FAILURES = 5
RESTART_BACKOFF_MAX_S = 60.0


def restart_delay(failures: int) -> float:
    return min(RESTART_BACKOFF_MAX_S, 2.0 ** (failures - 1))


def replica_template(deployment: DeploymentRecord, needs: Requirements) -> common_pb2.ReplicaSpec:
    """What every current replica of the deployment runs, less its id, generation and GPUs."""
    return common_pb2.ReplicaSpec(deployment=deployment.name, image=deployment.spec.image,
                                  manifest_digest=deployment.image.manifest_digest, placement=needs.placement,
                                  sources=[deployment.image.source])


def is_current(replica: ReplicaRecord, template: common_pb2.ReplicaSpec, nodes: dict[str, NodeRecord]) -> bool:
    """Whether the replica is what its deployment asks for now, on a node that is not draining."""
    spec = common_pb2.ReplicaSpec()
    spec.CopyFrom(replica.spec)
    for name in ("replica_id", "generation", "gpu_uuids"):
        spec.ClearField(name)
    return spec == template and not (replica.node_id is not None and nodes[replica.node_id].draining)


def scheduler_node(node: NodeRecord, layers_of: dict[str, set[str]]) -> Node:
    inventory = node.info.inventory
    layers: set[str] = set()
    for manifest in node.stored_manifests:
        layers |= layers_of.get(manifest, set())
    return Node(name=node.name, is_worker="worker" in node.roles, ready=node.state == READY, cordoned=node.cordoned,
                labels=node.effective_labels(), memory_total=inventory.memory_total,
                gpus=[Gpu(g.uuid, g.model, g.memory_total) for g in inventory.gpus], layers=layers)


@dataclass
class Outcome:
    assignments: set[str] = field(default_factory=set)  # nodes whose assignments changed
    changed: bool = False


class Reconciler:
    def __init__(self, cluster: Cluster, strategy: str):
        self.cluster = cluster
        self.state = cluster.state
        self.strategy = strategy
        self.schedulers = {name: Scheduler(name) for name in STRATEGIES}

    async def run(self) -> None:
        changes = self.cluster.changes
        while True:
            seen = changes.version(DEPLOYMENTS)
            try:
                outcome = await self.cluster.call(self.reconcile, time.time())
            except Exception:  # the next pass starts from the state as it is; one bad pass stops nothing
                log.exception("reconcile pass failed")
                outcome = Outcome()
            for node_id in outcome.assignments:
                changes.publish(assignments_key(node_id))
            if outcome.changed:
                changes.publish(DEPLOYMENTS)
            try:
                if not await asyncio.wait_for(changes.wait(DEPLOYMENTS, seen), PERIOD_S):
                    return
            except asyncio.TimeoutError:
                pass

    def reconcile(self, now: float) -> Outcome:
        """One pass (see the module's docstring). Runs on the state's thread."""
        out = Outcome()
        nodes = {node.id: node for node in self.state.nodes()}
        deployments = {d.name: d for d in self.state.deployments()}
        needs = {name: requirements(name, d.spec, d.image) for name, d in deployments.items()}
        for replica in self.state.replicas():
            node = nodes.get(replica.node_id) if replica.node_id else None
            if not replica.terminating and node is not None and node.state != READY:
                self._remove(replica, f"node {node.name} is {node.state}; a new replica takes its place", now, out)
        for name, deployment in deployments.items():
            replicas = [r for r in self.state.replicas(name) if not r.terminating]
            self._converge(deployment, needs[name], replicas, nodes, now, out)
        placed_on = {r.node_id for r in self.state.replicas() if r.node_id}
        for node in nodes.values():
            if node.draining and node.id not in placed_on:
                self.state.finish_drain(node.id, now)
                out.changed = True
        self._place(deployments, needs, nodes, now, out)
        return out

    def _remove(self, replica: ReplicaRecord, why: str, now: float, out: Outcome) -> None:
        node_id = self.state.remove_replica(replica.id, why, now)
        if node_id is not None:
            out.assignments.add(node_id)
        out.changed = True

    def _converge(self, deployment: DeploymentRecord, needs: Requirements, replicas: list[ReplicaRecord],
                  nodes: dict[str, NodeRecord], now: float, out: Outcome) -> None:
        template = replica_template(deployment, needs)
        current, outdated = [], []
        for replica in replicas:
            (current if is_current(replica, template, nodes) else outdated).append(replica)
        for replica in current:
            self._restart_if_failed(replica, now, out)
        desired = deployment.spec.replicas
        for _ in range(desired - len(current)):
            spec = common_pb2.ReplicaSpec()
            spec.CopyFrom(template)
            spec.replica_id, spec.generation = f"{deployment.name}-{secrets.token_hex(3)}", 1
            self.state.add_replica(spec, now)
            out.changed = True
        extra = sorted(current, key=lambda r: (r.ready, r.node_id is not None, -r.created_at))
        extra = extra[:max(0, len(current) - desired)]
        for replica in extra:
            self._remove(replica, f"the deployment is scaled to {desired}", now, out)
        serving = sum(r.ready for r in current if r not in extra)
        ready_outdated = [r for r in outdated if r.ready]
        for replica in outdated:
            if not replica.ready:
                self._remove(replica, "replaced (a new image, placement, or its node is draining)", now, out)
        for replica in ready_outdated[:max(0, len(ready_outdated) + serving - desired)]:
            self._remove(replica, "replaced by a READY replica of the deployment as it is now", now, out)

    def _restart_if_failed(self, replica: ReplicaRecord, now: float, out: Outcome) -> None:
        generation = replica.spec.generation
        if replica.node_id is None:
            return
        if replica.observed_state == "FAILED" and replica.observed_generation == generation \
                and replica.failed_generation != generation:
            failures = replica.failures + 1
            self.state.record_failure(replica.id, now + restart_delay(failures) if failures < MAX_FAILURES else 0,
                                      now)
            out.changed = True
        elif replica.restart_at and now >= replica.restart_at:
            spec = common_pb2.ReplicaSpec()
            spec.CopyFrom(replica.spec)
            spec.generation += 1
            self.state.restart_replica(spec, now)
            out.assignments.add(replica.node_id)
            out.changed = True
        elif replica.ready and replica.failures:
            self.state.reset_failures(replica.id)

    def on_paper(self, needs: Requirements) -> str:
        """Where a replica with these needs would be placed now, or why nowhere. Runs on the state's thread."""
        nodes = {node.id: node for node in self.state.nodes()}
        deployments = {d.name: d for d in self.state.deployments()}
        all_needs = {name: requirements(name, d.spec, d.image) for name, d in deployments.items()}
        candidates, claims = self._inputs(deployments, all_needs, nodes, self.state.replicas())
        try:
            placement = self.schedulers[needs.strategy or self.strategy].place(needs.request, candidates, claims)
        except Unschedulable as e:
            return str(e)
        evicting = f", evicting {', '.join(v.replica_id for v in placement.evict)}" if placement.evict else ""
        return f"a replica would be placed on node {placement.node}{evicting}"

    def _inputs(self, deployments: dict[str, DeploymentRecord], needs: dict[str, Requirements],
                nodes: dict[str, NodeRecord], replicas: list[ReplicaRecord]) -> tuple[list[Node], list[Claim]]:
        """The scheduler's nodes and the claims of the placed replicas."""
        layers_of = {d.image.manifest_digest: {digest for digest, _ in d.image.layers} for d in deployments.values()}
        # Nodes without the worker role (the controller's own, storage nodes, lbs) are members too, but no
        # candidates: they would only be counted "not a worker" in every unschedulable message.
        candidates = [scheduler_node(node, layers_of) for node in nodes.values() if "worker" in node.roles]
        claims = [self._claim(r, nodes[r.node_id].name, needs.get(r.deployment)) for r in replicas
                  if r.node_id and (r.terminating or r.deployment in needs)]
        return candidates, claims

    def _place(self, deployments: dict[str, DeploymentRecord], needs: dict[str, Requirements],
               nodes: dict[str, NodeRecord], now: float, out: Outcome) -> None:
        replicas = self.state.replicas()
        unplaced = sorted((r for r in replicas if r.node_id is None), key=lambda r: -needs[r.deployment].priority)
        if not unplaced:
            return
        candidates, claims = self._inputs(deployments, needs, nodes, replicas)
        by_name = {node.name: node for node in nodes.values()}
        for replica in unplaced:
            wants = needs[replica.deployment]
            scheduler = self.schedulers[wants.strategy or self.strategy]
            try:
                placement = scheduler.place(wants.request, candidates, claims)
            except Unschedulable as e:
                if replica.pending_reason != str(e):
                    self.state.set_pending_reason(replica.id, str(e), now)
                    out.changed = True
                continue
            for victim in placement.evict:
                why = f"deployment {replica.deployment!r} (priority {wants.priority})"
                out.assignments.add(self.state.evict_replica(victim.replica_id, why, now))
                claims.remove(victim)
            spec = common_pb2.ReplicaSpec()
            spec.CopyFrom(replica.spec)
            spec.gpu_uuids[:] = sorted(placement.gpu_memory)
            node = by_name[placement.node]
            self.state.place_replica(spec, node.id, placement.memory, placement.gpu_memory, now)
            placed = ReplicaRecord(**{**vars(replica), "node_id": node.id, "memory": placement.memory,
                                      "gpu_memory": placement.gpu_memory})
            claims.append(self._claim(placed, node.name, wants))
            out.assignments.add(node.id)
            out.changed = True
            log.info("replica placed", extra={"replica": replica.id, "node": node.name,
                                              "evicted": [v.replica_id for v in placement.evict]})

    @staticmethod
    def _claim(replica: ReplicaRecord, node_name: str, needs: Requirements | None) -> Claim:
        """The replica's claim; a terminating one (needs None once its deployment is gone) cannot be evicted."""
        claim = Claim(replica_id=replica.id, deployment=replica.deployment, node=node_name,
                      gpu_memory=dict(replica.gpu_memory), memory=replica.memory, preemptible=False, must_stay=True)
        if not replica.terminating:
            claim.priority, claim.preemptible, claim.must_stay = needs.priority, needs.preemptible, needs.must_stay
        return claim
