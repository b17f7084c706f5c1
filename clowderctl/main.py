"""clowderctl: administer Clowder.

Image commands (build, images, inspect, tag, rmi, gc, fsck, df, demo) work on this node's content
store in the data directory that clowderd uses, the way `git` works on a repository: no daemon
needs to run, and both may run at once. Cluster commands (nodes, node, events, token, deploy,
deployments, deployment, scale, update, undeploy) call the controller's admin API (--controller,
--token).
"""
from __future__ import annotations

import importlib
import sys

import click

from clowderctl.context import StoreContext
from clowderd.errors import ClowderError

DEFAULT_DATA_DIR = "/var/lib/clowder"


# The module of each command, imported when that command runs (or --help lists them all): a
# command does not wait for the imports of all the others (a pull starts in half the time).
COMMANDS = {
    **dict.fromkeys(("build", "demo", "images", "df", "inspect", "tag", "rmi", "gc", "fsck"), "images"),
    **dict.fromkeys(("login", "logout", "push", "pull"), "distribution"),
    "apikey": "apikeys",
    **dict.fromkeys(("nodes", "node", "events", "token"), "cluster"),
    **dict.fromkeys(("deploy", "deployments", "deployment", "scale", "update", "undeploy"), "deployments"),
    "audit": "audit",
}


def module_commands(module: str) -> dict[str, click.Command]:
    """The commands clowderctl.<module> registers, by name."""
    group = click.Group()
    importlib.import_module(f"clowderctl.{module}").register(group)
    return group.commands


class _Cli(click.Group):
    """Loads each command's module on demand; reports user-facing errors as one line and a non-zero
    exit, not a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        module = COMMANDS.get(name)
        return module_commands(module).get(name) if module else None

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ClowderError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--data-dir", envvar="CLOWDER_DATA_DIR", default=DEFAULT_DATA_DIR, show_default=True,
    type=click.Path(file_okay=False), help="The node's data directory (also $CLOWDER_DATA_DIR).",
)
@click.pass_context
def cli(ctx: click.Context, data_dir: str) -> None:
    """Administer Clowder: build and manage aimages on this node, and the cluster through its controller."""
    ctx.obj = StoreContext(data_dir)
    ctx.call_on_close(ctx.obj.close)


def main() -> None:
    cli(prog_name="clowderctl")


if __name__ == "__main__":
    main()
