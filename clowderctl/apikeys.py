"""API keys of the lb: `clowderctl apikey create|list|revoke --keys-file FILE`.

The keys file is the one `[lb] keys_file` names (see clowderd/middleware/auth.py). A new key is printed
once and only its SHA-256 digest is written; the file is rewritten whole (write to a temporary file, then
rename) with mode 0600, and a running lb picks the change up within seconds.
"""
from __future__ import annotations

import json
import re
import secrets
from pathlib import Path

import click

from clowderctl.output import column, emit, output_option
from clowderd.errors import InvalidInput
from clowderd.files import write_private
from clowderd.middleware.auth import key_digest, load_keys, read_users

USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
KEY_PREFIX = "ck-"

keys_file_option = click.option("--keys-file", required=True, type=click.Path(dir_okay=False, path_type=Path),
                                envvar="CLOWDER_KEYS_FILE", help="The lb's keys file ([lb] keys_file).")


def _read(path: Path) -> dict[str, dict]:
    """The users of the file, as checked by the lb's own loader."""
    if not path.exists():
        return {}
    load_keys(path)  # also checks that no key belongs to two users
    return read_users(path)


def _write(path: Path, users: dict[str, dict]) -> None:
    lines = []
    for name in sorted(users):
        entry = users[name]
        lines.append(f"[users.{json.dumps(name)}]")
        lines.append(f"groups = {json.dumps(sorted(entry.get('groups', [])))}")
        lines.append(f"keys = {json.dumps(entry.get('keys', []))}")
        if entry.get("requests_per_minute"):
            lines.append(f"requests_per_minute = {int(entry['requests_per_minute'])}")
        lines.append("")
    write_private(path, "\n".join(lines))


@click.group("apikey")
def apikey() -> None:
    """API keys for the lb's OpenAI-compatible and gRPC methods."""


@apikey.command("create")
@click.argument("user")
@keys_file_option
@click.option("--group", "groups", multiple=True, help="A group the user is in (repeatable).")
@click.option("--requests-per-minute", type=click.IntRange(min=1), help="The user's rate limit.")
def create(user: str, keys_file: Path, groups: tuple[str, ...], requests_per_minute: int | None) -> None:
    """Make a new key for USER (created if new) and print it: it is shown only this once."""
    if not USER_NAME.match(user):
        raise InvalidInput(f"user name {user!r}: use letters, digits, '.', '_', '@' and '-' (at most 128)")
    users = _read(keys_file)
    entry = users.setdefault(user, {"groups": [], "keys": []})
    entry["groups"] = sorted(set(entry.get("groups", [])) | set(groups))
    if requests_per_minute:
        entry["requests_per_minute"] = requests_per_minute
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    entry.setdefault("keys", []).append(key_digest(key))
    _write(keys_file, users)
    click.echo(key)


@apikey.command("list")
@keys_file_option
@output_option
def list_keys(keys_file: Path, output: str) -> None:
    """The users, their groups, rate limits and how many keys each has."""
    rows = [{"user": name, "groups": entry.get("groups", []), "keys": len(entry.get("keys", [])),
             "requests_per_minute": entry.get("requests_per_minute")} for name, entry in sorted(_read(keys_file).items())]
    emit(output, rows, [column("user", "USER"), column("groups", "GROUPS", lambda g: ", ".join(g) or "-"),
                        column("keys", "KEYS"), column("requests_per_minute", "REQUESTS/MIN", lambda r: str(r or "-"))])


@apikey.command("revoke")
@click.argument("user")
@keys_file_option
def revoke(user: str, keys_file: Path) -> None:
    """Remove USER and every key of theirs."""
    users = _read(keys_file)
    if user not in users:
        raise InvalidInput(f"{keys_file}: no user {user!r}; users: {', '.join(sorted(users)) or 'none'}")
    del users[user]
    _write(keys_file, users)
    click.echo(f"revoked {user}")


def register(group: click.Group) -> None:
    group.add_command(apikey)
