"""Structured logging for clowderd.

Two formats on stderr:

* ``json`` (default): one JSON object per line with ``ts`` (ISO-8601 UTC, milliseconds, ``Z``),
  ``level``, ``logger``, ``msg``, then every extra field given with ``extra={...}`` (``role``,
  ``addr``, ...), and ``exc`` with the traceback when there is one. For journald, Loki, jq.
* ``text``: ``TS LEVEL logger: msg key=value ...`` for people at a terminal.

Use ``logging.getLogger("clowderd.<component>")`` and pass context as extra fields rather than
formatting it into the message, so that it can be filtered on::

    log.info("serving", extra={"role": "storage", "addr": "0.0.0.0:7071"})
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
from typing import Any, TextIO

# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD = frozenset(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {
    "message", "asctime", "taskName"}


def _ts(record: logging.LogRecord) -> str:
    t = _dt.datetime.fromtimestamp(record.created, tz=_dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_jsonable(x) for x in v]
    return str(v)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _ts(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in _extras(record).items():
            if k not in out:
                out[k] = _jsonable(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [_ts(record), f"{record.levelname:<7}", f"{record.name}:", record.getMessage()]
        for k, v in _extras(record).items():
            s = v if isinstance(v, str) else json.dumps(_jsonable(v), ensure_ascii=False)
            if isinstance(v, str) and (not s or any(c.isspace() or c in '"=' for c in s)):
                s = json.dumps(s, ensure_ascii=False)
            parts.append(f"{k}={s}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Send every logger's records to stream (stderr) in the chosen format. Idempotent."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Our own debug lines are useful; grpc's and asyncio's rarely are.
    if level.lower() == "debug":
        for noisy in ("grpc", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.INFO)
    logging.captureWarnings(True)
