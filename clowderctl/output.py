"""Listings as a table for people or JSON for scripts (--output table|json)."""
from __future__ import annotations

import json
import sys
from typing import Any, Callable, Sequence

import click
from rich.console import Console
from rich.table import Table

output_option = click.option(
    "-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True,
    help="Print a table for people or JSON for scripts.",
)


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


Column = tuple[str, str, Callable[[Any], str]]  # key, heading, how to show the value


def column(key: str, heading: str, fmt: Callable[[Any], str] = str) -> Column:
    return (key, heading, fmt)


def emit(output: str, rows: Sequence[dict[str, Any]], columns: Sequence[Column], title: str | None = None) -> None:
    """Print rows: as a JSON list of objects, or as a table of the given columns."""
    if output == "json":
        json.dump(list(rows), sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return
    table = Table(title=title, box=None, pad_edge=False, header_style="bold")
    for _, heading, _ in columns:
        table.add_column(heading)
    for row in rows:
        table.add_row(*(fmt(row[key]) for key, _, fmt in columns))
    Console(soft_wrap=True).print(table)


def emit_object(output: str, obj: dict[str, Any]) -> None:
    """Print one object: JSON, or 'key: value' lines."""
    if output == "json":
        json.dump(obj, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return
    width = max(len(k) for k in obj)
    for k, v in obj.items():
        click.echo(f"{k + ':':<{width + 1}} {v}")
