"""Webhooks, from the aimage configuration's `webhooks`: each entry POSTs JSON to its `url` for the
events it lists:

- request: the call passed every middleware that may refuse it, on its way to the model;
- response: the call was answered (status 200); the payload carries the texts the caller received;
- blocked: a middleware refused the call (a 4xx status, with the refusal's message in `error`);
- error: anything else: the model's side failed (5xx), or the caller went away.

A call is told blocked from failed by whether it reached this middleware's `on_request`, which comes after
every middleware that refuses (see registry.py's order).

    {"event": "response", "call_id": "chatcmpl-...", "deployment": "smollm2", "method": "chat",
     "principal": "alice", "time": "2025-05-01T12:00:00.123456Z", "status": 200, "texts": ["..."]}

Delivery never delays a call: the lb's one `WebhookSender` keeps a bounded queue (a full queue drops its
oldest delivery, counted in the log) and one task that sends up to MAX_IN_FLIGHT deliveries at a time,
each within the webhook's `timeout_seconds`, retried `retries` times with exponential backoff after a
network error, a timeout, a 408, a 429 or a 5xx.

Signing: a webhook with a `secret_ref` is signed with the cluster secret of that name. Each attempt
carries `X-Clowder-Timestamp: <unix seconds>` and `X-Clowder-Signature: sha256=<hex>`, the HMAC-SHA256,
keyed with the secret, of the timestamp, a ".", and the exact body bytes. A receiver recomputes it over
the body it read, compares in constant time, and rejects timestamps more than a few minutes old, so that
a recorded delivery cannot be replayed later. A `secret_ref` that names no secret the lb holds is never
sent unsigned: the delivery is refused, with an error in the log naming the secret_ref.

The factory reads `config["webhooks"]` and `shared.webhook_sender`: the lb's `WebhookSender`, made with
the secrets it loaded (name -> secret) and closed at shutdown.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import json
import logging
import os
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import httpx

from clowderd.errors import InvalidInput
from clowderd.middleware.audit import rfc3339
from clowderd.middleware.base import Call, Middleware, Outcome
from clowderd.middleware.dropped import Dropped

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

QUEUE_LIMIT = 10_000
MAX_IN_FLIGHT = 32
BACKOFF_S = 0.5          # before the first retry; doubled for each one after
MAX_BACKOFF_S = 30.0
DEFAULT_RETRIES = 3
DEFAULT_TIMEOUT_S = 10.0
CLIENT_GONE = 499        # the lb's status for a call whose caller went away
RETRY_STATUSES = frozenset({408, 429})


def load_secrets(path: Path) -> dict[str, str]:
    """The signing secrets of `[lb] secrets_file`: a TOML file readable by clowderd alone, with a
    `[secrets]` table of name = "secret" (the names that webhooks' secret_ref give)."""
    path = Path(path)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise InvalidInput(f"{path}: cannot read the secrets file: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidInput(f"{path}: invalid TOML: {e}") from None
    if mode & 0o077:
        raise InvalidInput(f"{path}: the secrets file has mode {mode:04o}; it must be readable by clowderd alone "
                           "(chmod 600)")
    unknown = sorted(set(data) - {"secrets"})
    if unknown:
        raise InvalidInput(f"{path}: unknown top-level keys {unknown}; secrets go in a [secrets] table")
    secrets = data.get("secrets", {})
    for name, value in secrets.items():
        if not isinstance(value, str) or len(value) < 16:
            raise InvalidInput(f"{path}: secrets.{name}: expected a string of at least 16 characters")
    return dict(secrets)


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """The X-Clowder-Signature value of `body` sent at `timestamp`."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


@dataclass
class Delivery:
    url: str
    payload: dict
    secret_ref: str | None
    retries: int = DEFAULT_RETRIES
    timeout_seconds: float = DEFAULT_TIMEOUT_S


class WebhookSender:
    """Sends the deliveries of every deployment of the lb, in the background of its event loop."""

    def __init__(self, secrets: Mapping[str, str | bytes], queue_limit: int = QUEUE_LIMIT,
                 max_in_flight: int = MAX_IN_FLIGHT, backoff_seconds: float = BACKOFF_S):
        self.secrets = {name: s.encode() if isinstance(s, str) else s for name, s in secrets.items()}
        self.backoff_seconds = backoff_seconds
        self._queue: collections.deque[Delivery] = collections.deque(maxlen=queue_limit)
        self._ready = asyncio.Event()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._in_flight: set[asyncio.Task] = set()
        self._runner: asyncio.Task | None = None
        self._client: httpx.AsyncClient | None = None
        self._dropped = Dropped(log, "webhook deliveries dropped: the queue is full", queue_limit=queue_limit)

    def submit(self, delivery: Delivery) -> None:
        """Queue a delivery; returns at once. Call it on the lb's event loop."""
        if delivery.secret_ref is not None and delivery.secret_ref not in self.secrets:
            log.error("webhook not sent: its secret_ref names no secret of this lb", extra={
                "url": delivery.url, "secret_ref": delivery.secret_ref, "event": delivery.payload["event"],
                "call": delivery.payload["call_id"]})
            return
        if len(self._queue) == self._queue.maxlen:
            self._dropped.add()
        self._queue.append(delivery)  # a full deque drops its oldest
        self._ready.set()
        if self._runner is None:
            self._client = httpx.AsyncClient()
            self._runner = asyncio.get_running_loop().create_task(self._run(), name="webhook sender")

    async def close(self, drain_seconds: float = 0.0) -> None:
        """Give queued and running deliveries up to `drain_seconds` to finish, then stop."""
        deadline = time.monotonic() + drain_seconds
        while (self._queue or self._in_flight) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._runner is None:
            return
        if self._queue or self._in_flight:
            log.warning("webhook deliveries abandoned at shutdown", extra={
                "queued": len(self._queue), "in_flight": len(self._in_flight)})
        tasks = [self._runner, *self._in_flight]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._client.aclose()
        self._runner = self._client = None

    @property
    def dropped(self) -> int:
        return self._dropped.count

    async def _run(self) -> None:
        while True:
            while not self._queue:
                self._ready.clear()
                await self._ready.wait()
            await self._slots.acquire()
            task = asyncio.create_task(self._deliver(self._queue.popleft()))
            self._in_flight.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._in_flight.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook delivery failed", exc_info=task.exception())

    async def _deliver(self, delivery: Delivery) -> None:
        body = json.dumps(delivery.payload, ensure_ascii=False, separators=(",", ":")).encode()
        secret = self.secrets.get(delivery.secret_ref) if delivery.secret_ref else None
        reason = ""
        for attempt in range(delivery.retries + 1):
            if attempt:
                await asyncio.sleep(min(self.backoff_seconds * 2 ** (attempt - 1), MAX_BACKOFF_S))
            timestamp = str(int(time.time()))
            headers = {"content-type": "application/json", "x-clowder-event": delivery.payload["event"],
                       "x-clowder-timestamp": timestamp}
            if secret is not None:
                headers["x-clowder-signature"] = signature(secret, timestamp, body)
            try:
                response = await self._client.post(delivery.url, content=body, headers=headers,
                                                   timeout=delivery.timeout_seconds)
            except httpx.HTTPError as e:
                reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                continue
            if response.status_code < 300:
                return
            reason = f"HTTP {response.status_code}"
            if response.status_code < 500 and response.status_code not in RETRY_STATUSES:
                break
        log.error("webhook not delivered", extra={"url": delivery.url, "event": delivery.payload["event"],
                                                  "call": delivery.payload["call_id"], "attempts": attempt + 1,
                                                  "reason": reason})


class Webhooks(Middleware):
    name = "webhooks"

    def __init__(self, hooks: list[dict], sender: WebhookSender):
        self.hooks = hooks
        self.sender = sender
        self.events = frozenset(event for hook in hooks for event in hook["events"])

    async def on_request(self, call: Call) -> None:
        call.state[self.name] = "reached"
        if "request" in self.events:
            self._send("request", self._payload("request", call, None))

    async def on_outcome(self, call: Call, outcome: Outcome) -> None:
        event = event_of(outcome, reached=self.name in call.state)
        if event not in self.events:
            return
        payload = self._payload(event, call, outcome.status)
        if event == "response":
            payload["texts"] = outcome.texts
        else:
            payload["error"] = outcome.error
        self._send(event, payload)

    def _payload(self, event: str, call: Call, status: int | None) -> dict:
        return {"event": event, "call_id": call.id, "deployment": call.model, "method": call.method,
                "principal": call.principal, "time": rfc3339(time.time()), "status": status}

    def _send(self, event: str, payload: dict) -> None:
        for hook in self.hooks:
            if event in hook["events"]:
                self.sender.submit(Delivery(hook["url"], payload, hook.get("secret_ref"),
                                            hook.get("retries", DEFAULT_RETRIES),
                                            hook.get("timeout_seconds", DEFAULT_TIMEOUT_S)))


def event_of(outcome: Outcome, reached: bool) -> str:
    """The event a call's end is: `reached` says whether it passed every middleware that may refuse."""
    if outcome.status == 200:
        return "response"
    if not reached and 400 <= outcome.status < 500 and outcome.status != CLIENT_GONE:
        return "blocked"
    return "error"


def create(config: dict, policy, shared) -> Middleware | None:
    hooks = config.get("webhooks") or []
    return Webhooks(hooks, shared.webhook_sender) if hooks else None
