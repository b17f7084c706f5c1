"""Call logging: one structured line per call on "clowderd.calls", never the prompt or the answer."""
from __future__ import annotations

import asyncio
import io
import json
import logging

from clowderd.logs import JsonFormatter
from clowderd.middleware.base import Call, Outcome
from clowderd.middleware.calllog import CallLog, create


def logged_lines(calls: list[tuple[Call, Outcome]]) -> list[dict]:
    """The JSON lines the call log writes for these calls, as clowderd's log format prints them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("clowderd.calls")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        async def go():
            for call, outcome in calls:
                await CallLog().on_outcome(call, outcome)

        asyncio.run(go())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_one_line_per_call_with_who_how_it_ended_tokens_and_time_but_no_texts():
    answered_call = Call(method="chat", model="smollm2", messages=[{"role": "user", "content": "my secret plan"}],
                         principal="alice", client="10.0.0.5:51234")
    answered = Outcome(status=200, texts=["the confidential answer"], finish_reasons=["stop"],
                       usage={"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
                       replica="smollm2-r1", seconds=0.1234567)
    refused_call = Call(method="completion", model="smollm2", prompt="another secret", client="10.0.0.6:1")
    refused = Outcome(status=401, texts=[""], finish_reasons=[""], usage=None,
                      error="auth: the API key is not valid", seconds=0.0004)

    first, second = logged_lines([(answered_call, answered), (refused_call, refused)])

    assert first["logger"] == "clowderd.calls" and first["level"] == "info" and first["msg"] == "call"
    assert {k: first[k] for k in ("call", "deployment", "method", "principal", "client", "status", "finish_reasons",
                                  "prompt_tokens", "completion_tokens", "seconds", "replica", "error")} == {
        "call": answered_call.id, "deployment": "smollm2", "method": "chat", "principal": "alice",
        "client": "10.0.0.5:51234", "status": 200, "finish_reasons": ["stop"], "prompt_tokens": 12,
        "completion_tokens": 7, "seconds": 0.123457, "replica": "smollm2-r1", "error": None}
    assert (second["status"], second["principal"], second["prompt_tokens"], second["error"]) == \
        (401, None, None, "auth: the API key is not valid")
    printed = json.dumps([first, second])
    assert "secret" not in printed and "confidential" not in printed


def test_a_logger_above_info_silences_it():
    logger = logging.getLogger("clowderd.calls")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        outcome = Outcome(status=200, texts=["x"], finish_reasons=["stop"], usage=None)
        asyncio.run(CallLog().on_outcome(Call(method="completion", model="m", prompt="p"), outcome))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert records == []


def test_every_chain_gets_a_call_log():
    assert isinstance(create({}, None, None), CallLog)
