"""The lb's audit log: `clowderctl audit verify FILE` checks its hash chain and names the first record
that was changed, removed, reordered or cut short."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from clowderctl.output import emit_object, output_option
from clowderd.middleware import audit


@click.group("audit")
def audit_group() -> None:
    """The lb's audit log."""


@audit_group.command("verify")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@output_option
def verify(file: Path, output: str) -> None:
    """Check the hash chain of the audit log FILE.

    Prints "ok: N records", or the first tampered record (its line, seq and what is wrong) and exits 1.
    """
    result = audit.verify(file)
    if output == "json":
        emit_object(output, result.as_dict())
    else:
        click.echo(result.describe())
    sys.exit(0 if result.ok else 1)


def register(group: click.Group) -> None:
    group.add_command(audit_group)
