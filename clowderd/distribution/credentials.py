"""Registry credentials in `$XDG_CONFIG_HOME/clowder/auth.json` (default ~/.config/clowder),
mode 0600, in Docker's layout: {"auths": {"HOST[:PORT]": {"auth": base64("user:password")}}}."""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from clowderd.errors import InvalidInput


def auth_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "clowder" / "auth.json"


def _load(path: Path) -> dict:
    if not path.exists():
        return {"auths": {}}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data.get("auths"), dict):
            raise ValueError("no 'auths' object")
        return data
    except (ValueError, AttributeError) as exc:
        raise InvalidInput(f"{path}: not a credentials file ({exc}); remove it and log in again") from None


def _save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def get(registry: str) -> tuple[str, str] | None:
    entry = _load(auth_file())["auths"].get(registry)
    if not entry:
        return None
    user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
    return user, password


def store(registry: str, username: str, password: str) -> Path:
    path = auth_file()
    data = _load(path)
    data["auths"][registry] = {"auth": base64.b64encode(f"{username}:{password}".encode()).decode()}
    _save(path, data)
    return path


def remove(registry: str) -> bool:
    path = auth_file()
    data = _load(path)
    if registry not in data["auths"]:
        return False
    del data["auths"][registry]
    _save(path, data)
    return True
