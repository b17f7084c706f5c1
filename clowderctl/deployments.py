"""Deployment commands, through the controller's admin API: deploy, deployments, deployment describe,
scale, update, undeploy."""
from __future__ import annotations

import json
import re
import sys
import time
from datetime import timedelta
from typing import Any

import click
from google.protobuf import field_mask_pb2

from clowder.v1 import common_pb2, controller_pb2
from clowderctl.cluster import event_row, iso_time
from clowderctl.controller import ControllerClient, connect, controller_options
from clowderctl.output import column, emit, output_option
from clowderd.errors import ClowderError

WAIT_POLL_S = 0.5
DEFAULT_WAIT_TIMEOUT_S = 600.0


def _state(value: int) -> str:
    return controller_pb2.DeploymentState.Name(value).removeprefix("DEPLOYMENT_STATE_")


def _replica_state(value: int) -> str:
    return common_pb2.ReplicaState.Name(value).removeprefix("REPLICA_STATE_")


def deployment_row(deployment: controller_pb2.Deployment) -> dict[str, Any]:
    """A deployment as plain values: the JSON output, and what the tables show."""
    spec, status = deployment.spec, deployment.status
    return {
        "name": deployment.name, "image": spec.image, "manifest_digest": status.manifest_digest,
        "state": _state(status.state), "message": status.message, "ready_replicas": status.ready_replicas,
        "desired_replicas": status.desired_replicas, "generation": deployment.generation, "etag": deployment.etag,
        "priority": spec.priority if spec.HasField("priority") else None,
        "preemptible": spec.preemptible if spec.HasField("preemptible") else None,
        "must_stay": spec.must_stay if spec.HasField("must_stay") else None,
        "labels": dict(deployment.labels), "created_at": iso_time(deployment.created_at),
        "replicas": [{"id": r.replica_id, "node": r.node_name, "state": _replica_state(r.state),
                      "message": r.message} for r in status.replicas],
    }


DEPLOYMENT_COLUMNS = [
    column("name", "NAME"), column("state", "STATE"), column("ready", "READY"), column("image", "IMAGE"),
    column("manifest_digest", "DIGEST", lambda d: d.split(":", 1)[-1][:12]), column("message", "MESSAGE"),
]


def wait_until_ready(client: ControllerClient, name: str, timeout: float) -> None:
    """Print the deployment's state as it changes until it is READY. FAILED ends the wait at once;
    UNSCHEDULABLE or anything else past the timeout ends it too: both with the reason, as an error."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        row = deployment_row(client.call("GetDeployment", controller_pb2.GetDeploymentRequest(name=name)))
        shown = (row["state"], row["ready_replicas"], row["message"])
        if shown != last:
            message = f": {row['message']}" if row["message"] else ""
            click.echo(f"{name}: {row['state']} {row['ready_replicas']}/{row['desired_replicas']} ready{message}")
            last = shown
        if row["state"] == "READY":
            return
        if row["state"] == "FAILED":
            raise ClowderError(f"deployment {name} failed: {row['message']}")
        if time.monotonic() > deadline:
            raise ClowderError(f"deployment {name} is not READY after {timeout:g}s ({row['state']}): {row['message']}")
        time.sleep(WAIT_POLL_S)


def wait_options(command: Any) -> Any:
    """--wait and --timeout."""
    command = click.option("--timeout", type=float, default=DEFAULT_WAIT_TIMEOUT_S, show_default=True,
                           metavar="SECONDS", help="With --wait: how long to wait.")(command)
    return click.option("--wait", is_flag=True, help="Wait until the deployment is READY, printing its states.")(
        command)


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """Bytes from '80GiB', '40 GB', '1073741824'."""
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
    unit = m and _SIZE_UNITS.get(m.group(2).lower())
    if not unit or float(m.group(1)) <= 0:
        raise click.BadParameter(f"{value!r} is not a size: give a positive number of bytes with an optional "
                                 "unit (KB, MB, GB, TB or KiB, MiB, GiB, TiB), e.g. 40GiB", ctx, param)
    return int(float(m.group(1)) * unit)


def _labels(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    labels = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", ctx, param)
        labels[key.strip()] = value.strip()
    return labels


@click.command("deploy")
@click.argument("name")
@click.argument("image")
@click.option("--replicas", type=click.IntRange(0), default=1, show_default=True)
@click.option("--priority", type=int, help="Overrides the aimage configuration's priority.")
@click.option("--preemptible/--no-preemptible", default=None,
              help="May be evicted for a higher-priority deployment [default: the aimage configuration's].")
@click.option("--must-stay/--no-must-stay", default=None,
              help="Never evicted [default: the aimage configuration's].")
@click.option("--gpus", type=click.IntRange(1, 64), help="GPUs per replica [default: the aimage configuration's].")
@click.option("--gpu-model", "gpu_models", multiple=True, metavar="MODEL",
              help="An acceptable GPU model (part of its name, e.g. H100); repeat for several.")
@click.option("--gpu-memory", callback=_size, metavar="SIZE", help="GPU memory each GPU must have, e.g. 40GiB [default: estimated from the weights].")
@click.option("--node-selector", "node_selector", multiple=True, callback=_labels, metavar="KEY=VALUE",
              help="Only nodes with this label (added to the configuration's); repeat for several.")
@click.option("--engine", help="The runtime engine [default: the aimage configuration's].")
@click.option("--strategy", type=click.Choice(["binpack", "spread"]),
              help="Fill nodes one by one, or spread the replicas [default: the controller's].")
@click.option("--dry-run", is_flag=True, help="Check, and say where a replica would go; change nothing.")
@wait_options
@controller_options
def deploy(name: str, image: str, replicas: int, priority: int | None, preemptible: bool | None,
           must_stay: bool | None, gpus: int | None, gpu_models: tuple[str, ...], gpu_memory: int | None,
           node_selector: dict[str, str], engine: str | None, strategy: str | None, dry_run: bool, wait: bool,
           timeout: float, controller: str, token: str | None) -> None:
    """Deploy IMAGE (an aimage reference) as deployment NAME. The placement options override the
    aimage configuration's placement for this deployment, field by field."""
    placement = common_pb2.Placement(
        gpu_count=gpus or 0, gpu_models=gpu_models, gpu_memory=gpu_memory or 0, node_selector=node_selector,
        engine=engine or "",
        strategy={"binpack": common_pb2.Placement.STRATEGY_BINPACK, "spread": common_pb2.Placement.STRATEGY_SPREAD,
                  None: common_pb2.Placement.STRATEGY_UNSPECIFIED}[strategy])
    spec = controller_pb2.DeploymentSpec(image=image, replicas=replicas, priority=priority, preemptible=preemptible,
                                         must_stay=must_stay, placement=placement)
    client = connect(controller, token)
    created = client.call("CreateDeployment", controller_pb2.CreateDeploymentRequest(
        deployment=controller_pb2.Deployment(name=name, spec=spec), validate_only=dry_run))
    if dry_run:
        click.echo(f"{name}: {image} is {created.status.manifest_digest}; {created.status.message}")
        return
    click.echo(f"deployment {name}: {replicas} replica(s) of {image} ({created.status.manifest_digest})")
    if wait:
        wait_until_ready(client, name, timeout)


@click.command("deployments")
@output_option
@controller_options
def deployments(output: str, controller: str, token: str | None) -> None:
    """The deployments: state, ready replicas, image."""
    client = connect(controller, token)
    rows = [deployment_row(d) for d in client.pages("ListDeployments", controller_pb2.ListDeploymentsRequest(),
                                                     "deployments")]
    for row in rows:
        row["ready"] = f"{row['ready_replicas']}/{row['desired_replicas']}"
    emit(output, rows, DEPLOYMENT_COLUMNS)


@click.group("deployment")
def deployment() -> None:
    """Describe one deployment."""


@deployment.command("describe")
@click.argument("name")
@output_option
@controller_options
def describe(name: str, output: str, controller: str, token: str | None) -> None:
    """Deployment NAME: its state, each replica with its node, state and reason, and its events."""
    client = connect(controller, token)
    row = deployment_row(client.call("GetDeployment", controller_pb2.GetDeploymentRequest(name=name)))
    events = [event_row(e) for e in client.pages("ListEvents", controller_pb2.ListEventsRequest(
        object_kind="Deployment", object_name=name), "events")]
    if output == "json":
        json.dump({**row, "events": events}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    overrides = ", ".join(f"{k} {row[k]}" for k in ("priority", "preemptible", "must_stay") if row[k] is not None)
    lines = [("Name", row["name"]), ("Image", row["image"]), ("Digest", row["manifest_digest"]),
             ("State", row["state"] + (f": {row['message']}" if row["message"] else "")),
             ("Replicas", f"{row['ready_replicas']}/{row['desired_replicas']} ready"),
             ("Overrides", overrides or "-"), ("Generation", row["generation"]), ("Created", row["created_at"])]
    width = max(len(k) for k, _ in lines) + 1
    for key, value in lines:
        click.echo(f"{key + ':':<{width}} {value}")
    click.echo("Replicas:" if row["replicas"] else "Replicas: none")
    for replica in row["replicas"]:
        message = f"  {replica['message']}" if replica["message"] else ""
        click.echo(f"  {replica['id']}  {replica['node'] or '-'}  {replica['state']}{message}")
    click.echo("Events:" if events else "Events: none")
    for event in events:
        click.echo(f"  {event['time']}  {event['severity']:<8} {event['reason']:<18} {event['message']}")


@click.command("scale")
@click.argument("name")
@click.argument("replicas", type=click.IntRange(0))
@wait_options
@controller_options
def scale(name: str, replicas: int, wait: bool, timeout: float, controller: str, token: str | None) -> None:
    """Run REPLICAS replicas of deployment NAME."""
    client = connect(controller, token)
    client.call("ScaleDeployment", controller_pb2.ScaleDeploymentRequest(name=name, replicas=replicas))
    click.echo(f"deployment {name}: {replicas} replica(s)")
    if wait:
        wait_until_ready(client, name, timeout)


@click.command("update")
@click.argument("name")
@click.argument("image")
@wait_options
@controller_options
def update(name: str, image: str, wait: bool, timeout: float, controller: str, token: str | None) -> None:
    """Roll deployment NAME to IMAGE: new replicas start, each old one stops once a new one is READY."""
    client = connect(controller, token)
    updated = client.call("UpdateDeployment", controller_pb2.UpdateDeploymentRequest(
        deployment=controller_pb2.Deployment(name=name, spec=controller_pb2.DeploymentSpec(image=image)),
        update_mask=field_mask_pb2.FieldMask(paths=["spec.image"])))
    click.echo(f"deployment {name}: rolling to {image} ({updated.status.manifest_digest})")
    if wait:
        wait_until_ready(client, name, timeout)


@click.command("undeploy")
@click.argument("name")
@click.option("--grace", type=click.FloatRange(0, min_open=True), metavar="SECONDS",
              help="How long the replicas may take to finish the calls they are answering [default: the "
                   "worker's, 5 s]; no new calls reach them meanwhile.")
@controller_options
def undeploy(name: str, grace: float | None, controller: str, token: str | None) -> None:
    """Delete deployment NAME; its replicas stop."""
    request = controller_pb2.DeleteDeploymentRequest(name=name)
    if grace is not None:
        request.grace.FromTimedelta(timedelta(seconds=grace))
    connect(controller, token).call("DeleteDeployment", request)
    click.echo(f"deployment {name} deleted")


def register(group: click.Group) -> None:
    for command in (deploy, deployments, deployment, scale, update, undeploy):
        group.add_command(command)
