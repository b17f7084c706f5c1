"""clowderctl: administer Clowder.

Image commands (build, images, inspect, tag, rmi, gc, fsck, df, demo) work on this node's content
store in the data directory that clowderd uses, the way `git` works on a repository: no daemon
needs to run, and both may run at once. Cluster commands (nodes, node, events, token, deploy,
deployments, deployment, scale, update, undeploy) call the controller's admin API (--controller,
--token).
"""
from __future__ import annotations

import sys

import click

from clowderctl import apikeys, audit, cluster, deployments, distribution, images
from clowderd.errors import ClowderError

DEFAULT_DATA_DIR = "/var/lib/clowder"


class _Cli(click.Group):
    """Report user-facing errors as one line and a non-zero exit, not a traceback."""

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
    ctx.obj = images.StoreContext(data_dir)
    ctx.call_on_close(ctx.obj.close)


images.register(cli)
distribution.register(cli)
apikeys.register(cli)
cluster.register(cli)
deployments.register(cli)
audit.register(cli)


def main() -> None:
    cli(prog_name="clowderctl")


if __name__ == "__main__":
    main()
