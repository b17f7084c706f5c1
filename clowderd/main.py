"""clowderd: the Clowder node daemon. One process, any of four roles.

    clowderd [--config FILE] [--roles controller,storage,worker,lb] [--data-dir DIR]
             [--node-name NAME] [--controller-listen HOST:PORT] [--storage-listen HOST:PORT]
             [--worker-listen HOST:PORT] [--lb-listen HOST:PORT] [--controller HOST:PORT]
             [--deploy NAME=IMAGE ...] [--log-level LEVEL] [--log-format json|text]

Exit status: 0 after a clean shutdown (SIGTERM, SIGINT); 2 when it cannot start (bad flag or
config, data dir in use, address in use), with one line on stderr naming the file and key or
flag; 1 on an unexpected crash. Run from a checkout with ``python -m clowderd.main``.
"""
from __future__ import annotations

import os

# gRPC's C core logs to stderr directly, outside Python logging; keep it to errors so that the
# stream stays (nearly) all JSON lines. Must be set before grpc is imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import asyncio  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import click  # noqa: E402

from clowderd import eventloop  # noqa: E402
from clowderd.config import (  # noqa: E402
    LOG_FORMATS, LOG_LEVELS, ROLES, ConfigError, as_dict, build_config, parse_deployments)
from clowderd.errors import ClowderError  # noqa: E402
from clowderd.logs import setup_logging  # noqa: E402
from clowderd.version import __version__  # noqa: E402

EXIT_OK, EXIT_CRASH, EXIT_USAGE = 0, 1, 2

log = logging.getLogger("clowderd")


def _fail(message: str) -> "click.exceptions.Exit":
    click.echo(f"clowderd: error: {message}", err=True)
    return click.exceptions.Exit(EXIT_USAGE)


async def _serve(cfg) -> int:
    """Run the process until it stops; its exit status (EXIT_USAGE when the cluster refused or revoked
    the node)."""
    # Imported here so that `clowderd --help` and config errors do not need the generated stubs.
    from clowderd.server import Process

    process = Process(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, process.request_stop, signal.Signals(sig).name)
    try:
        await process.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return process.exit_status


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", metavar="FILE", type=click.Path(dir_okay=False),
              help="TOML config file; flags override its settings.")
@click.option("--roles", metavar="LIST",
              help=f"Comma-separated roles to run [default: {','.join(ROLES)}].")
@click.option("--data-dir", metavar="DIR", help="State directory [default: /var/lib/clowder].")
@click.option("--node-name", metavar="NAME", help="Name of this node [default: host name].")
@click.option("--controller-listen", metavar="HOST:PORT", help="[default: 127.0.0.1:7070]")
@click.option("--storage-listen", metavar="HOST:PORT", help="[default: 127.0.0.1:7071]")
@click.option("--worker-listen", metavar="HOST:PORT", help="[default: 127.0.0.1:7072]")
@click.option("--lb-listen", metavar="HOST:PORT", help="[default: 127.0.0.1:7073]")
@click.option("--controller", "controller_addr", metavar="HOST:PORT",
              help="The controller's public listener, where a node without the controller role joins "
                   "[default: the controller role of this process].")
@click.option("--deploy", "deploy", metavar="NAME=IMAGE", multiple=True,
              help="Create deployment NAME of IMAGE (one replica) when the controller starts, unless it "
                   "exists; repeatable. Adds to [controller.deploy].")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False),
              help="[default: info]")
@click.option("--log-format", type=click.Choice(LOG_FORMATS, case_sensitive=False),
              help="[default: json]")
@click.version_option(__version__, "--version", prog_name="clowderd")
def cli(config_path, roles, data_dir, node_name, controller_listen, storage_listen,
        worker_listen, lb_listen, controller_addr, deploy, log_level, log_format) -> None:
    """Run a Clowder node: controller, storage, worker and/or load balancer."""
    deployments = {}
    for item in deploy:
        name, sep, image = item.partition("=")
        if not sep or not name or not image:
            raise _fail(f"--deploy {item!r}: expected NAME=IMAGE, e.g. chat=smollm2:135m-instruct")
        deployments[name] = image
    flags = {
        "roles": roles, "data_dir": data_dir, "node_name": node_name,
        "controller.listen": controller_listen, "storage.listen": storage_listen,
        "worker.listen": worker_listen, "lb.listen": lb_listen,
        "cluster.controller": controller_addr,
        "log.level": log_level, "log.format": log_format,
    }
    try:
        cfg = build_config(config_path, flags, {"cluster.controller": "--controller"})
    except ConfigError as e:
        raise _fail(str(e))
    try:
        cfg.controller_deploy.update(parse_deployments(deployments, "--deploy"))
    except ConfigError as e:
        raise _fail(str(e))

    setup_logging(cfg.log_level, cfg.log_format)
    log.info("starting", extra={"version": __version__, "pid": os.getpid(),
                                "config": cfg.config_path, "roles": list(cfg.roles)})
    log.debug("effective config", extra={"settings": as_dict(cfg)})
    try:
        status = eventloop.run(_serve(cfg))
    except ClowderError as e:
        # Cannot start: data dir locked, address in use, ... One line, in the log format.
        log.error(f"cannot start: {e}")
        raise click.exceptions.Exit(EXIT_USAGE)
    except KeyboardInterrupt:  # a signal before the handlers were installed
        raise click.exceptions.Exit(EXIT_OK)
    except Exception:
        log.exception("crashed")
        raise click.exceptions.Exit(EXIT_CRASH)
    if status:
        raise click.exceptions.Exit(status)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `clowderd` script. Returns the exit status."""
    try:
        # With standalone_mode=False, click returns the code of a raised Exit.
        rc = cli.main(args=argv, prog_name="clowderd", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        return EXIT_OK
    except click.ClickException as e:
        e.show()
        return EXIT_USAGE
    return rc if isinstance(rc, int) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
