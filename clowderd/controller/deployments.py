"""The deployment methods of the admin API: create, list, get, scale, update and delete, and the
status each answer carries (replicas with their state and reason, the deployment's state).

Writes change the desired state only; the reconcile loop (reconcile.py) acts on it, woken by
DEPLOYMENTS. The image reference is resolved at create and at every update of spec.image (a tag
that moved is followed then, never in between).
"""
from __future__ import annotations

import time
from typing import Callable

from clowder.v1 import common_pb2, controller_pb2
from clowderd.config import DEPLOYMENT_NAME_RE, LABEL_KEY_RE
from clowderd.controller import images
from clowderd.controller.cluster import DEPLOYMENTS, Cluster, assignments_key
from clowderd.controller.reconcile import MAX_FAILURES, Reconciler, is_current, replica_template
from clowderd.controller.requirements import requirements
from clowderd.controller.state import DeploymentRecord, NodeRecord, ReplicaRecord
from clowderd.controller.timestamps import timestamp
from clowderd.errors import InvalidInput
from clowderd.trust.dial import Dialer

MAX_REPLICAS = 1000
S = controller_pb2.DeploymentState
SPEC_FIELDS = ("image", "replicas", "priority", "preemptible", "must_stay", "placement")
PLACEMENT_FIELDS = tuple(f.name for f in common_pb2.Placement.DESCRIPTOR.fields)


def check_deployment(deployment: controller_pb2.Deployment) -> None:
    """InvalidInput naming the field that is not acceptable."""
    if not DEPLOYMENT_NAME_RE.match(deployment.name):
        raise InvalidInput(f"deployment.name: {deployment.name!r} is not a deployment name (lowercase letters, "
                           "digits and '-', at most 63 characters, starting and ending with a letter or digit)")
    spec = deployment.spec
    if not spec.image:
        raise InvalidInput("deployment.spec.image: required (an aimage reference, e.g. smollm2:135m-instruct)")
    if spec.replicas > MAX_REPLICAS:
        raise InvalidInput(f"deployment.spec.replicas: {spec.replicas} is more than {MAX_REPLICAS}")
    for key in deployment.labels:
        if not LABEL_KEY_RE.match(key):
            raise InvalidInput(f"deployment.labels: {key!r} is not a label key")


def replica_status(replica: ReplicaRecord, nodes: dict[str, NodeRecord]) -> common_pb2.ReplicaStatus:
    """The replica as the controller sees it: unplaced (why), placed and not started yet, removed and still
    run by its node (why), or as its node last reported it."""
    status = common_pb2.ReplicaStatus(replica_id=replica.id, deployment=replica.deployment,
                                      observed_generation=replica.observed_generation)
    if replica.node_id is None:
        why = [f"preempted by {replica.preempted_by}" if replica.preempted_by else "",
               replica.pending_reason or "waiting to be placed"]
        status.state, status.message = common_pb2.REPLICA_STATE_PENDING, "; ".join(filter(None, why))
        return status
    status.node_name = nodes[replica.node_id].name
    if replica.terminating:
        status.state, status.message = common_pb2.REPLICA_STATE_TERMINATING, replica.terminating_reason
        status.state_since.CopyFrom(timestamp(replica.terminating_since))
        return status
    if replica.restart_at:
        status.state = common_pb2.REPLICA_STATE_FAILED
        status.message = f"failed {replica.failures} time(s), restarting: {replica.observed_message}"
    elif not replica.observed_state or replica.observed_generation != replica.spec.generation:
        status.state = common_pb2.REPLICA_STATE_SCHEDULED
        status.message = f"placed on node {status.node_name}, which has not started it yet"
    else:
        status.state = common_pb2.ReplicaState.Value("REPLICA_STATE_" + replica.observed_state)
        status.message = replica.observed_message
    if replica.observed_at:
        status.state_since.CopyFrom(timestamp(replica.observed_at))
    return status


def deployment_message(record: DeploymentRecord, replicas: list[ReplicaRecord],
                       nodes: dict[str, NodeRecord]) -> controller_pb2.Deployment:
    template = replica_template(record, requirements(record.name, record.spec, record.image))
    live = [r for r in replicas if not r.terminating]
    current = [r for r in live if is_current(r, template, nodes)]
    ready = sum(r.ready for r in current)
    desired = record.spec.replicas
    failed = next((r for r in current if r.failures >= MAX_FAILURES and not r.restart_at), None)
    unplaced = next((r for r in current if r.node_id is None and r.pending_reason), None)
    if failed is not None:
        state, message = S.DEPLOYMENT_STATE_FAILED, (f"replica {failed.id} failed {failed.failures} times in a row: "
                                                    f"{failed.observed_message}")
    elif unplaced is not None:
        state, message = S.DEPLOYMENT_STATE_UNSCHEDULABLE, unplaced.pending_reason
    elif ready == desired and len(current) == len(live):
        state, message = S.DEPLOYMENT_STATE_READY, ""
    else:
        replacing = len(live) - len(current)
        state = S.DEPLOYMENT_STATE_PROGRESSING
        message = f"{ready}/{desired} replicas ready" + (f", {replacing} being replaced" if replacing else "")
    status = controller_pb2.DeploymentStatus(
        ready_replicas=ready, desired_replicas=desired, manifest_digest=record.image.manifest_digest,
        observed_generation=record.generation, replicas=[replica_status(r, nodes) for r in replicas],
        message=message, state=state)
    return controller_pb2.Deployment(
        name=record.name, spec=record.spec, status=status, generation=record.generation, etag=record.etag,
        created_at=timestamp(record.created_at), updated_at=timestamp(record.updated_at), labels=record.labels)


def _apply_mask(current: controller_pb2.Deployment, given: controller_pb2.Deployment, paths: list[str]) -> None:
    """Copy the fields named by paths from given into current ("spec.image", "spec.placement.gpu_count",
    "labels"; none: the whole spec and the labels)."""
    for path in paths or ["spec", "labels"]:
        if path == "spec":
            current.spec.CopyFrom(given.spec)
        elif path == "labels":
            current.labels.clear()
            current.labels.update(given.labels)
        elif path.startswith("spec.placement.") and path.removeprefix("spec.placement.") in PLACEMENT_FIELDS:
            name = path.removeprefix("spec.placement.")
            current.spec.placement.ClearField(name)
            value = getattr(given.spec.placement, name)
            if name == "gpu_models":
                current.spec.placement.gpu_models.extend(value)
            elif name == "node_selector":
                current.spec.placement.node_selector.update(value)
            else:
                setattr(current.spec.placement, name, value)
        elif path.startswith("spec.") and path.removeprefix("spec.") in SPEC_FIELDS:
            name = path.removeprefix("spec.")
            current.spec.ClearField(name)
            if name == "placement":
                current.spec.placement.CopyFrom(given.spec.placement)
            elif name not in ("priority", "preemptible", "must_stay") or given.spec.HasField(name):
                setattr(current.spec, name, getattr(given.spec, name))
        else:
            raise InvalidInput(f"update_mask: {path!r} is not a field that can be changed (spec.image, spec.replicas, "
                               "spec.priority, spec.preemptible, spec.must_stay, spec.placement[.FIELD], labels)")


class Deployments:
    def __init__(self, cluster: Cluster, reconciler: Reconciler, storage: Callable[[], str | None], dialer: Dialer):
        self.cluster = cluster
        self.state = cluster.state
        self.reconciler = reconciler
        self.storage = storage  # the default storage node's address, asked for at each resolution
        self.dialer = dialer  # how the controller reaches storage nodes

    async def create(self, request: controller_pb2.CreateDeploymentRequest) -> controller_pb2.Deployment:
        given = request.deployment
        check_deployment(given)
        image = await images.resolve(given.spec.image, self.storage(), self.dialer)
        needs = requirements(given.name, given.spec, image)
        if request.validate_only:
            await self.cluster.call(self.state.deployment_absent, given.name)
            where = await self.cluster.call(self.reconciler.on_paper, needs)
            return controller_pb2.Deployment(name=given.name, spec=given.spec, labels=given.labels, status=(
                controller_pb2.DeploymentStatus(desired_replicas=given.spec.replicas,
                                                manifest_digest=image.manifest_digest, message=where)))
        await self.cluster.call(self.state.create_deployment, given.name, given.spec, given.labels, image, time.time())
        self.cluster.changes.publish(DEPLOYMENTS)
        return await self.get(given.name)

    async def get(self, name: str) -> controller_pb2.Deployment:
        record = await self.cluster.call(self.state.deployment, name)
        replicas = await self.cluster.call(self.state.replicas, name)
        nodes = {node.id: node for node in await self.cluster.call(self.state.nodes)}
        return deployment_message(record, replicas, nodes)

    async def list(self, request: controller_pb2.ListDeploymentsRequest, selector: dict[str, str],
                   size: int) -> controller_pb2.ListDeploymentsResponse:
        records = [d for d in await self.cluster.call(self.state.deployments)
                   if d.name > request.page_token and selector.items() <= d.labels.items()]
        page = records[:size]
        replicas = await self.cluster.call(self.state.replicas)
        nodes = {node.id: node for node in await self.cluster.call(self.state.nodes)}
        return controller_pb2.ListDeploymentsResponse(
            deployments=[deployment_message(d, [r for r in replicas if r.deployment == d.name], nodes) for d in page],
            next_page_token=page[-1].name if len(records) > size else "")

    async def scale(self, request: controller_pb2.ScaleDeploymentRequest) -> controller_pb2.Deployment:
        if request.replicas > MAX_REPLICAS:
            raise InvalidInput(f"replicas: {request.replicas} is more than {MAX_REPLICAS}")
        record = await self.cluster.call(self.state.deployment, request.name)
        spec = controller_pb2.DeploymentSpec()
        spec.CopyFrom(record.spec)
        spec.replicas = request.replicas
        await self.cluster.call(self.state.update_deployment, record.name, spec, record.labels, record.image,
                                request.etag, "DeploymentScaled",
                                f"deployment {record.name}: {record.spec.replicas} -> {request.replicas} replicas",
                                time.time())
        self.cluster.changes.publish(DEPLOYMENTS)
        return await self.get(record.name)

    async def update(self, request: controller_pb2.UpdateDeploymentRequest) -> controller_pb2.Deployment:
        record = await self.cluster.call(self.state.deployment, request.deployment.name)
        changed = deployment_message(record, [], {})
        paths = list(request.update_mask.paths)
        _apply_mask(changed, request.deployment, paths)
        check_deployment(changed)
        image = record.image
        if not paths or "spec" in paths or "spec.image" in paths:
            image = await images.resolve(changed.spec.image, self.storage(), self.dialer)
        if request.validate_only:
            where = await self.cluster.call(self.reconciler.on_paper,
                                            requirements(record.name, changed.spec, image))
            changed.status.message = where
            changed.status.manifest_digest = image.manifest_digest
            return changed
        rolling = image.manifest_digest != record.image.manifest_digest
        message = (f"deployment {record.name}: rolling to {changed.spec.image} ({image.manifest_digest})" if rolling
                   else f"deployment {record.name}: {', '.join(paths) or 'spec and labels'} changed")
        await self.cluster.call(self.state.update_deployment, record.name, changed.spec, changed.labels, image,
                                request.deployment.etag, "DeploymentUpdated", message, time.time())
        self.cluster.changes.publish(DEPLOYMENTS)
        return await self.get(record.name)

    async def delete(self, request: controller_pb2.DeleteDeploymentRequest) -> None:
        grace = request.grace.ToTimedelta().total_seconds() if request.HasField("grace") else 0.0
        if grace < 0:
            raise InvalidInput(f"grace is {grace:g}s; it cannot be negative")
        for node_id in await self.cluster.call(self.state.delete_deployment, request.name, request.etag, time.time(),
                                               grace):
            self.cluster.changes.publish(assignments_key(node_id))
        self.cluster.changes.publish(DEPLOYMENTS)
