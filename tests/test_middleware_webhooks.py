"""Webhooks: events sent to a real HTTP receiver on a loopback port, which checks each signature and can
fail or stall the first attempts; retries, refusal of unknown secrets, a full queue, and no delay to calls."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from clowderd.middleware.base import Call, Outcome
from clowderd.middleware.webhooks import Delivery, Webhooks, WebhookSender, create, event_of

SECRET = "s3cret-for-tests"


class Receiver:
    """An HTTP server that records every POST, answering 503 to the first `fail_first` of them and
    waiting `stall_seconds` before answering the first `stall_first`."""

    def __init__(self, fail_first: int = 0, stall_first: int = 0, stall_seconds: float = 0.0):
        self.fail_first, self.stall_first, self.stall_seconds = fail_first, stall_first, stall_seconds
        self.attempts: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                with receiver.lock:
                    receiver.attempts.append({"headers": {k.lower(): v for k, v in self.headers.items()},
                                              "body": body, "at": time.monotonic()})
                    number = len(receiver.attempts)
                if number <= receiver.stall_first:
                    time.sleep(receiver.stall_seconds)
                self.send_response(503 if number <= receiver.fail_first else 204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def delivered(self) -> list[dict]:
        """The payloads of the attempts that were answered with success."""
        return [json.loads(a["body"]) for a in self.attempts[self.fail_first:]]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made = []

    def make(**kw) -> Receiver:
        made.append(Receiver(**kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


def signed_correctly(attempt: dict, secret: str = SECRET) -> bool:
    timestamp = attempt["headers"]["x-clowder-timestamp"]
    expected = hmac.new(secret.encode(), timestamp.encode() + b"." + attempt["body"], hashlib.sha256).hexdigest()
    return (hmac.compare_digest(attempt["headers"]["x-clowder-signature"], "sha256=" + expected)
            and abs(time.time() - int(timestamp)) < 60)


def chat_call(content: str = "hello") -> Call:
    return Call(method="chat", model="m", messages=[{"role": "user", "content": content}], principal="alice")


def answered(text: str = "the answer") -> Outcome:
    return Outcome(status=200, texts=[text], finish_reasons=["stop"], usage=None)


def refused(status: int = 401, error: str = "auth: the API key is not valid") -> Outcome:
    return Outcome(status=status, texts=[""], finish_reasons=[""], usage=None, error=error)


async def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_each_event_is_posted_signed_over_timestamp_and_body(receiver):
    r = receiver()
    hooks = [{"url": r.url, "events": ["request", "response", "blocked", "error"], "secret_ref": "hooks"}]

    async def scenario():
        sender = WebhookSender({"hooks": SECRET})
        webhooks = Webhooks(hooks, sender)
        ok = chat_call("what is 2+2?")
        await webhooks.on_request(ok)
        await webhooks.on_outcome(ok, answered("4"))
        await webhooks.on_outcome(chat_call(), refused())  # refused before reaching the webhooks
        failed = chat_call()
        await webhooks.on_request(failed)
        await webhooks.on_outcome(failed, refused(503, "deployment 'm' has no ready replica"))
        await sender.close(drain_seconds=10)
        return ok

    ok = asyncio.run(scenario())
    assert len(r.attempts) == 5 and all(signed_correctly(a) for a in r.attempts)
    by_event = {}
    for payload in r.delivered():
        by_event.setdefault(payload["event"], []).append(payload)
    assert sorted(by_event) == ["blocked", "error", "request", "response"] and len(by_event["request"]) == 2
    response = by_event["response"][0]
    assert {k: response[k] for k in ("call_id", "deployment", "method", "principal", "status", "texts")} == \
        {"call_id": ok.id, "deployment": "m", "method": "chat", "principal": "alice", "status": 200, "texts": ["4"]}
    assert response["time"].endswith("Z")
    assert by_event["blocked"][0]["status"] == 401 and "texts" not in by_event["blocked"][0]
    assert by_event["blocked"][0]["error"] == "auth: the API key is not valid"
    assert by_event["error"][0]["status"] == 503 and "texts" not in by_event["error"][0]
    assert all("what is 2+2?" not in json.dumps(p) for p in r.delivered())
    # Deliveries run concurrently, in no set order; each names its event in a header too.
    assert all(a["headers"]["x-clowder-event"] == json.loads(a["body"])["event"] for a in r.attempts)


def test_a_signature_made_with_another_secret_does_not_verify(receiver):
    r = receiver()

    async def scenario():
        sender = WebhookSender({"hooks": "another secret"})
        sender.submit(Delivery(r.url, {"event": "response", "call_id": "c"}, "hooks"))
        await sender.close(drain_seconds=10)

    asyncio.run(scenario())
    assert len(r.attempts) == 1 and not signed_correctly(r.attempts[0])


def test_failed_attempts_are_retried_with_exponential_backoff(receiver):
    r = receiver(fail_first=3)

    async def scenario():
        sender = WebhookSender({}, backoff_seconds=0.05)
        sender.submit(Delivery(r.url, {"event": "response", "call_id": "c"}, None, retries=3))
        await sender.close(drain_seconds=10)

    asyncio.run(scenario())
    assert len(r.attempts) == 4 and r.delivered() == [{"event": "response", "call_id": "c"}]
    gaps = [b["at"] - a["at"] for a, b in zip(r.attempts, r.attempts[1:])]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.2
    assert "x-clowder-signature" not in r.attempts[0]["headers"]  # no secret_ref: sent unsigned


def test_a_delivery_that_keeps_failing_stops_after_its_retries_and_is_logged(receiver, caplog):
    r = receiver(fail_first=10)

    async def scenario():
        sender = WebhookSender({}, backoff_seconds=0.01)
        sender.submit(Delivery(r.url, {"event": "error", "call_id": "c"}, None, retries=2))
        await sender.close(drain_seconds=10)

    with caplog.at_level(logging.ERROR, logger="clowderd.middleware.webhooks"):
        asyncio.run(scenario())
    assert len(r.attempts) == 3
    [failure] = [rec for rec in caplog.records if rec.msg == "webhook not delivered"]
    assert (failure.url, failure.attempts, failure.reason, failure.call) == (r.url, 3, "HTTP 503", "c")


def test_an_attempt_past_its_timeout_is_abandoned_and_retried(receiver):
    r = receiver(stall_first=1, stall_seconds=1.0)

    async def scenario():
        sender = WebhookSender({}, backoff_seconds=0.01)
        sender.submit(Delivery(r.url, {"event": "response", "call_id": "c"}, None, retries=1, timeout_seconds=0.2))
        started = time.monotonic()
        await wait_for(lambda: len(r.attempts) == 2)
        await sender.close(drain_seconds=10)
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 0.9
    assert len(r.attempts) == 2


def test_a_secret_ref_the_lb_does_not_hold_is_never_sent_unsigned(receiver, caplog):
    r = receiver()
    hooks = [{"url": r.url, "events": ["response"], "secret_ref": "missing-secret"}]

    async def scenario():
        sender = WebhookSender({"other": SECRET})
        await Webhooks(hooks, sender).on_outcome(chat_call(), answered())
        await sender.close(drain_seconds=0.5)

    with caplog.at_level(logging.ERROR, logger="clowderd.middleware.webhooks"):
        asyncio.run(scenario())
    assert r.attempts == []
    [error] = [rec for rec in caplog.records if rec.secret_ref == "missing-secret"]
    assert "secret_ref names no secret" in error.getMessage() and error.url == r.url


def test_a_full_queue_drops_the_oldest_deliveries_and_counts_them(receiver, caplog):
    r = receiver()

    async def scenario():
        sender = WebhookSender({}, queue_limit=2)
        for i in range(5):  # all queued before the sender task first runs
            sender.submit(Delivery(r.url, {"event": "response", "call_id": f"c{i}"}, None))
        dropped = sender.dropped
        await sender.close(drain_seconds=10)
        return dropped

    with caplog.at_level(logging.ERROR, logger="clowderd.middleware.webhooks"):
        assert asyncio.run(scenario()) == 3
    assert sorted(p["call_id"] for p in r.delivered()) == ["c3", "c4"]
    assert any(rec.msg.startswith("webhook deliveries dropped") and rec.dropped == 1 for rec in caplog.records)


def test_a_stalled_receiver_never_delays_the_call(receiver):
    r = receiver(stall_first=100, stall_seconds=1.0)
    hooks = [{"url": r.url, "events": ["request", "response"], "timeout_seconds": 5}]

    async def scenario():
        sender = WebhookSender({})
        webhooks = Webhooks(hooks, sender)
        call = chat_call()
        started = time.perf_counter()
        await webhooks.on_request(call)
        await webhooks.on_outcome(call, answered())
        spent = time.perf_counter() - started
        await sender.close()
        return spent

    assert asyncio.run(scenario()) < 0.05


def test_events_are_told_apart_by_status_and_by_whether_the_call_passed_the_refusing_middleware():
    assert event_of(answered(), reached=True) == "response"
    assert event_of(refused(401), reached=False) == "blocked"
    assert event_of(refused(429, "rate-limit: ..."), reached=False) == "blocked"
    assert event_of(refused(400, "the worker refused the sampling values"), reached=True) == "error"
    assert event_of(refused(503), reached=True) == "error"
    assert event_of(refused(499, "the caller went away before the end"), reached=False) == "error"


def test_only_the_listed_events_go_to_each_webhook(receiver):
    r1, r2 = receiver(), receiver()
    hooks = [{"url": r1.url, "events": ["response"]}, {"url": r2.url, "events": ["blocked"]}]

    async def scenario():
        sender = WebhookSender({})
        webhooks = Webhooks(hooks, sender)
        call = chat_call()
        await webhooks.on_request(call)
        await webhooks.on_outcome(call, answered())
        await webhooks.on_outcome(chat_call(), refused(403, "auth: restricted"))
        await sender.close(drain_seconds=10)

    asyncio.run(scenario())
    assert [p["event"] for p in r1.delivered()] == ["response"]
    assert [p["event"] for p in r2.delivered()] == ["blocked"]


def test_the_factory_makes_webhooks_only_for_a_configuration_that_lists_some():
    async def scenario():
        shared = SimpleNamespace(webhook_sender=WebhookSender({}))
        assert create({"webhooks": []}, None, shared) is None and create({}, None, shared) is None
        made = create({"webhooks": [{"url": "http://127.0.0.1:1/", "events": ["error"]}]}, None, shared)
        assert isinstance(made, Webhooks) and made.sender is shared.webhook_sender

    asyncio.run(scenario())
