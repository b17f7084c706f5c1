"""Cluster commands, through the controller's admin API: nodes, node describe|label|cordon|uncordon|drain|
revoke, events, token."""
from __future__ import annotations

import datetime as dt
import json
import sys
import time
from typing import Any

import click
from google.protobuf import timestamp_pb2

from clowder.v1 import common_pb2, controller_pb2
from clowderctl.controller import connect, controller_options
from clowderctl.output import column, emit, human_bytes, output_option
from clowderd.errors import InvalidInput


def iso_time(ts: timestamp_pb2.Timestamp) -> str:
    return ts.ToDatetime(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _ago(ts: timestamp_pb2.Timestamp) -> str:
    seconds = max(0.0, time.time() - ts.ToNanoseconds() / 1e9)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def node_row(node: controller_pb2.ClusterNode) -> dict[str, Any]:
    """A node as plain values: the JSON output, and what the tables show."""
    info, inventory = node.info, node.info.inventory
    return {
        "name": info.name, "id": info.node_id,
        "state": controller_pb2.NodeState.Name(node.state).removeprefix("NODE_STATE_").lower(),
        "state_since": iso_time(node.state_since), "cordoned": node.cordoned, "draining": node.draining,
        "roles": [common_pb2.Role.Name(r).removeprefix("ROLE_").lower() for r in info.roles],
        "worker_address": node.worker_address, "version": info.version,
        "labels": {**info.labels, **node.labels}, "own_labels": dict(info.labels), "admin_labels": dict(node.labels),
        "cpu_count": inventory.cpu_count, "cpu_load": round(inventory.cpu_load, 2),
        "memory_total": inventory.memory_total, "memory_available": inventory.memory_available,
        "disk_total": inventory.disk_total, "disk_free": inventory.disk_free,
        "gpus": [{"index": g.index, "uuid": g.uuid, "model": g.model, "memory_total": g.memory_total,
                  "memory_used": g.memory_used, "compute_capability": g.compute_capability,
                  "driver_version": g.driver_version} for g in inventory.gpus],
        "replicas": [{"id": r.replica_id, "deployment": r.deployment,
                      "state": common_pb2.ReplicaState.Name(r.state).removeprefix("REPLICA_STATE_").lower(),
                      "message": r.message} for r in node.replicas],
        "joined_at": iso_time(node.joined_at), "last_heartbeat": iso_time(node.last_heartbeat),
        "last_heartbeat_ago": _ago(node.last_heartbeat),
        "store_check": _store_check(inventory.store_check) if inventory.HasField("store_check") else None,
    }


def _store_check(check: common_pb2.StoreCheck) -> dict[str, Any]:
    return {"kind": check.kind, "finished_at": iso_time(check.finished_at), "finished_ago": _ago(check.finished_at),
            "blobs_checked": check.blobs_checked, "bytes_checked": check.bytes_checked,
            "quarantined": list(check.quarantined)}


def _store_check_line(check: dict[str, Any] | None) -> str:
    if check is None:
        return "none finished yet"
    quarantined = len(check["quarantined"])
    return (f"{check['kind']} finished {check['finished_at']} ({check['finished_ago']}): "
            f"{check['blobs_checked']} blobs, {human_bytes(check['bytes_checked'])}, {quarantined or 'none'} quarantined")


def _scheduling(row: dict[str, Any]) -> str:
    return "draining" if row["draining"] else "cordoned" if row["cordoned"] else "yes"


def _status(row: dict[str, Any]) -> str:
    """The state, and how the node is unschedulable when it is: "ready", "unreachable,cordoned"."""
    return row["state"] + ("" if _scheduling(row) == "yes" else f",{_scheduling(row)}")


def _memory(row: dict[str, Any]) -> str:
    return f"{human_bytes(row['memory_available'])} free of {human_bytes(row['memory_total'])}"


def _labels(labels: dict[str, str], separator: str = ", ") -> str:
    return separator.join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def _gpus(gpus: list[dict[str, Any]]) -> str:
    models: dict[str, int] = {}
    for gpu in gpus:
        models[gpu["model"]] = models.get(gpu["model"], 0) + 1
    return ", ".join(f"{n}x {model}" for model, n in models.items()) or "-"


NODE_COLUMNS = [
    column("name", "NAME"), column("status", "STATUS"),
    column("roles", "ROLES", ",".join), column("worker_address", "ADDRESS", lambda a: a or "-"),
    column("cpu_count", "CPUS"), column("memory_total", "MEMORY", human_bytes), column("gpus", "GPUS", _gpus),
    column("last_heartbeat_ago", "HEARTBEAT"), column("labels", "LABELS", lambda labels: _labels(labels, ",")),
]


@click.command("nodes")
@click.option("-l", "--selector", default="", metavar="KEY=VALUE,...", help="Only nodes with all these labels.")
@output_option
@controller_options
def nodes(selector: str, output: str, controller: str, token: str | None) -> None:
    """The nodes of the cluster: state, roles, inventory, labels."""
    client = connect(controller, token)
    rows = [node_row(n) for n in client.pages("ListNodes", controller_pb2.ListNodesRequest(label_selector=selector),
                                               "nodes")]
    if output == "table":
        rows = [{**row, "status": _status(row)} for row in rows]
    emit(output, rows, NODE_COLUMNS)


@click.group("node")
def node() -> None:
    """Describe, label, cordon, uncordon or drain one node."""


@node.command("describe")
@click.argument("name")
@output_option
@controller_options
def describe(name: str, output: str, controller: str, token: str | None) -> None:
    """Everything the controller knows about node NAME."""
    row = node_row(connect(controller, token).call("GetNode", controller_pb2.GetNodeRequest(name=name)))
    if output == "json":
        json.dump(row, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    lines = [
        ("Name", row["name"]), ("ID", row["id"]), ("State", f"{row['state']} since {row['state_since']}"),
        ("Schedulable", _scheduling(row)), ("Roles", ", ".join(row["roles"]) or "-"),
        ("Worker address", row["worker_address"] or "-"), ("Version", row["version"]),
        ("Labels (node)", _labels(row["own_labels"])), ("Labels (admin)", _labels(row["admin_labels"])),
        ("Joined", row["joined_at"]), ("Last heartbeat", f"{row['last_heartbeat']} ({row['last_heartbeat_ago']})"),
        ("CPUs", f"{row['cpu_count']} (load {row['cpu_load']:.2f} per CPU)"), ("Memory", _memory(row)),
        ("Disk", f"{human_bytes(row['disk_free'])} free of {human_bytes(row['disk_total'])}"),
        ("Store check", _store_check_line(row["store_check"])),
    ]
    width = max(len(k) for k, _ in lines) + 1
    for key, value in lines:
        click.echo(f"{key + ':':<{width}} {value}")
    for digest in (row["store_check"] or {}).get("quarantined", []):
        click.echo(f"  quarantined {digest}")
    click.echo("GPUs:" if row["gpus"] else "GPUs: none")
    for gpu in row["gpus"]:
        click.echo(f"  {gpu['index']}  {gpu['model']}  {gpu['uuid']}  memory {human_bytes(gpu['memory_used'])} used "
                   f"of {human_bytes(gpu['memory_total'])}  compute {gpu['compute_capability']}  "
                   f"driver {gpu['driver_version']}")
    click.echo("Replicas:" if row["replicas"] else "Replicas: none")
    for replica in row["replicas"]:
        message = f"  {replica['message']}" if replica["message"] else ""
        click.echo(f"  {replica['id']}  {replica['deployment']}  {replica['state'].upper()}{message}")


@node.command("label")
@click.argument("name")
@click.argument("changes", nargs=-1, required=True, metavar="KEY=VALUE|KEY- ...")
@controller_options
def label(name: str, changes: tuple[str, ...], controller: str, token: str | None) -> None:
    """Set (KEY=VALUE) or remove (KEY-) labels of node NAME."""
    request = controller_pb2.LabelNodeRequest(name=name)
    for change in changes:
        if "=" in change:
            key, value = change.split("=", 1)
            request.set[key] = value
        elif change.endswith("-") and len(change) > 1:
            request.remove.append(change[:-1])
        else:
            raise InvalidInput(f"{change!r}: give KEY=VALUE to set a label or KEY- to remove one")
    row = node_row(connect(controller, token).call("LabelNode", request))
    click.echo(f"node {name}: labels {_labels(row['labels'])}")


def _schedulable_command(verb: str, method: str, request_type: type, doc: str) -> click.Command:
    @controller_options
    def command(name: str, controller: str, token: str | None) -> None:
        response = connect(controller, token).call(method, request_type(name=name))
        row = node_row(response.node if isinstance(response, controller_pb2.DrainNodeResponse) else response)
        click.echo(f"node {name}: schedulable {_scheduling(row)}")
    command.__doc__ = doc
    return click.argument("name")(click.command(verb)(command))


node.add_command(_schedulable_command("cordon", "CordonNode", controller_pb2.CordonNodeRequest,
                                      "Place no new replicas on node NAME; running ones stay."))
node.add_command(_schedulable_command("uncordon", "UncordonNode", controller_pb2.UncordonNodeRequest,
                                      "Make node NAME schedulable again (and end a drain)."))
node.add_command(_schedulable_command("drain", "DrainNode", controller_pb2.DrainNodeRequest,
                                      "Cordon node NAME and have the scheduler move its replicas elsewhere."))


@node.command("revoke")
@click.argument("name")
@controller_options
def revoke(name: str, controller: str, token: str | None) -> None:
    """End node NAME's membership at once: its certificates are refused by every node from their next call,
    its replicas go elsewhere. It can come back only by joining with the join token."""
    response = connect(controller, token).call("RevokeNode", controller_pb2.RevokeNodeRequest(name=name))
    click.echo(f"node {name} revoked: {len(response.revoked_serials)} certificate(s) refused from now on")


def event_row(event: controller_pb2.Event) -> dict[str, Any]:
    return {"revision": event.revision, "time": iso_time(event.time), "severity": event.severity,
            "reason": event.reason, "object": f"{event.object_kind}/{event.object_name}",
            "node": event.node_name, "message": event.message}


def _event_line(row: dict[str, Any]) -> str:
    return f"{row['time']:<21} {row['severity']:<8} {row['reason']:<18} {row['object']:<24} {row['message']}"


@click.command("events")
@click.option("-f", "--follow", is_flag=True, help="Keep printing events as they happen.")
@click.option("--node", "node_name", metavar="NAME", help="Only events about node NAME.")
@output_option
@controller_options
def events(follow: bool, node_name: str | None, output: str, controller: str, token: str | None) -> None:
    """What happened in the cluster, oldest first (JSON: an array, or one object a line with --follow)."""
    client = connect(controller, token)
    kind, name = ("Node", node_name) if node_name else ("", "")
    past = list(client.pages("ListEvents", controller_pb2.ListEventsRequest(object_kind=kind, object_name=name),
                             "events"))
    rows = [event_row(e) for e in past]
    if output == "json" and not follow:
        emit(output, rows, [])
        return
    if output == "table":
        click.echo(_event_line({"time": "TIME", "severity": "SEVERITY", "reason": "REASON", "object": "OBJECT",
                                "message": "MESSAGE"}))

    def show(row: dict[str, Any]) -> None:
        click.echo(json.dumps(row) if output == "json" else _event_line(row))

    for row in rows:
        show(row)
    if follow:
        since = past[-1].revision if past else 0
        request = controller_pb2.WatchEventsRequest(object_kind=kind, object_name=name, since_revision=since)
        for event in client.stream("WatchEvents", request):
            show(event_row(event))


@click.command("token")
@click.option("--rotate", is_flag=True, help="Replace the join token; the old one admits no new node.")
@controller_options
def join_token(rotate: bool, controller: str, token: str | None) -> None:
    """Print the token that nodes join with ([cluster] join_token); it ends with the cluster CA's fingerprint."""
    client = connect(controller, token)
    method, request = ("RotateJoinToken", controller_pb2.RotateJoinTokenRequest()) if rotate else \
        ("GetJoinToken", controller_pb2.GetJoinTokenRequest())
    click.echo(client.call(method, request).token)


def register(group: click.Group) -> None:
    for command in (nodes, node, events, join_token):
        group.add_command(command)
