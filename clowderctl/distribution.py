"""Distribution commands: login, logout, push, pull.

Remote references: `HOST[:PORT]/repo[:tag]` for an OCI registry (HTTPS; a loopback host gets
plain HTTP when it answers plain HTTP; --insecure forces plain HTTP), `clowder://HOST:PORT/repo[:tag]`
for a Clowder storage node's gRPC address (chunk-aware: only the chunks this node lacks cross the
network). A registry whose certificate comes from a private CA is trusted through SSL_CERT_FILE
(a PEM bundle holding that CA).
"""
from __future__ import annotations

import sys
import threading

import click
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

from clowderctl.context import StoreContext, pass_store
from clowderctl.controller import cluster_dialer, controller_options
from clowderctl.output import emit_object, human_bytes, output_option
from clowderd.distribution import credentials
from clowderd.distribution import progress as dprogress
from clowderd.distribution.chunk_client import DEFAULT_STREAMS
from clowderd.distribution.errors import TransferError
from clowderd.distribution.oci_client import OciClient
from clowderd.distribution.pull import pull
from clowderd.distribution.push import push
from clowderd.distribution.refs import parse_remote
from clowderd.errors import InvalidInput
from clowderd.trust.enroll import speaks_tls

insecure_option = click.option("--insecure", is_flag=True,
                               help="Use plain HTTP (also the case for a loopback registry that answers plain HTTP).")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bars; print only the digest.")


class _Bars(dprogress.Progress):
    """One rich bar per blob: bytes, rate, time left."""

    def __init__(self, bars: Progress):
        self.bars = bars
        self.tasks: dict[str, int] = {}
        self.lock = threading.Lock()

    def start(self, key: str, description: str, total: int) -> None:
        with self.lock:
            self.tasks[key] = self.bars.add_task(description, total=total or None)

    def advance(self, key: str, nbytes: int) -> None:
        if nbytes:
            self.bars.update(self.tasks[key], advance=nbytes)

    def done(self, key: str) -> None:
        task = self.tasks[key]
        total = next(t.total for t in self.bars.tasks if t.id == task)
        self.bars.update(task, completed=total or 0)


def _with_bars(quiet: bool, run):
    if quiet:
        return run(dprogress.Progress())
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=None, transient=False) as bars:
        return run(_Bars(bars))


@click.command("login")
@click.argument("registry")
@click.option("-u", "--username", prompt=True, help="User name.")
@click.option("-p", "--password", help="Password (prefer --password-stdin or the prompt).")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@insecure_option
def login_cmd(registry: str, username: str, password: str | None, password_stdin: bool, insecure: bool) -> None:
    """Log in to an OCI registry; credentials go to $XDG_CONFIG_HOME/clowder/auth.json (mode 0600)."""
    if password_stdin:
        password = sys.stdin.read().rstrip("\n")
    elif password is None:
        password = click.prompt("Password", hide_input=True)
    client = OciClient(registry, insecure=insecure, credentials=(username, password))
    try:
        client.ping()
    finally:
        client.close()
    path = credentials.store(registry, username, password)
    click.echo(f"logged in to {registry} (credentials in {path})")


@click.command("logout")
@click.argument("registry")
def logout_cmd(registry: str) -> None:
    """Forget the credentials of a registry."""
    if not credentials.remove(registry):
        raise InvalidInput(f"not logged in to {registry}")
    click.echo(f"logged out of {registry}")


@click.command("push")
@click.argument("name")
@click.argument("dest", required=False)
@insecure_option
@quiet_option
@pass_store
def push_cmd(ctx: StoreContext, name: str, dest: str | None, insecure: bool, quiet: bool) -> None:
    """Push the local image NAME[:TAG] to DEST (HOST[:PORT]/repo[:tag]); without DEST, NAME must
    itself name the registry."""
    ref = parse_remote(dest or name)
    result = _with_bars(quiet, lambda p: push(ctx.store, name, ref, insecure=insecure, progress=p))
    if quiet:
        click.echo(result.digest)
    else:
        click.echo(f"pushed {result.destination} {result.digest}: {result.uploaded_blobs} of {result.blobs} blobs "
                   f"uploaded ({human_bytes(result.uploaded_bytes)}), {result.mounted_blobs} mounted")


@click.command("pull")
@click.argument("ref")
@click.option("-t", "--tag", "name", help="Local name (default: the reference without clowder://).")
@click.option("--streams", default=DEFAULT_STREAMS, show_default=True, type=click.IntRange(1, 32),
              help="Parallel chunk streams from a Clowder node.")
@click.option("--limit-rate", type=float, help="Receive at most this many bytes per second (chunk pulls).")
@insecure_option
@quiet_option
@output_option
@controller_options
@pass_store
def pull_cmd(ctx: StoreContext, ref: str, name: str | None, streams: int, limit_rate: float | None,
             insecure: bool, quiet: bool, output: str, controller: str, token: str | None) -> None:
    """Pull an image from an OCI registry (HOST[:PORT]/repo[:tag]) or a Clowder node
    (clowder://HOST:PORT/repo[:tag]) into this node's store. A Clowder node asks for a certificate of its
    cluster: the one of the node whose data dir this is, else an admin certificate for the admin token
    (--controller and --token, as for the cluster commands)."""
    remote = parse_remote(ref)
    dialer = cluster_dialer(ctx.data_dir, controller, token) if remote.kind == "clowder" else None
    try:
        result = _with_bars(quiet or output == "json", lambda p: pull(
            ctx.store, remote, name=name, insecure=insecure, streams=streams, limit_rate=limit_rate, progress=p,
            dialer=dialer))
    except TransferError as e:
        if dialer is not None and not dialer.secure and speaks_tls(remote.registry):
            raise TransferError(f"the Clowder node at {remote.registry} asks for a certificate of its cluster: run "
                                "this on one of its nodes (with its data dir), or give the admin token (--token or "
                                "$CLOWDER_TOKEN) and the controller (--controller or $CLOWDER_CONTROLLER)") from e
        raise
    if output == "json":
        emit_object("json", vars(result))
    elif quiet:
        click.echo(result.digest)
    else:
        click.echo(f"pulled {result.name or ref} {result.digest}: {result.pulled_blobs} of {result.blobs} blobs, "
                   f"{human_bytes(result.pulled_bytes)}; {human_bytes(result.fetched_bytes)} received, "
                   f"{human_bytes(result.local_bytes)} from chunks already here")


def register(group: click.Group) -> None:
    for command in (login_cmd, logout_cmd, push_cmd, pull_cmd):
        group.add_command(command)
