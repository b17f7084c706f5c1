"""Storage of queries and responses in a real SQLite database: what `store` keeps, redaction before
writing, retention and purge, reading back by deployment and time, and writes that never hold up a call."""
from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import time
from types import SimpleNamespace

import pytest

from clowderd.errors import InvalidInput
from clowderd.middleware.base import Call, Outcome
from clowderd.middleware.querystore import DAY_S, QueryStore, StoreQueries, create


def chat_call(content: str, model: str = "m", **kw) -> Call:
    return Call(method="chat", model=model, messages=[{"role": "user", "content": content}], principal="alice",
                client="10.0.0.7:4000", **kw)


def answered(*texts: str) -> Outcome:
    return Outcome(status=200, texts=list(texts), finish_reasons=["stop"] * len(texts),
                   usage={"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}, replica="r1", seconds=0.2)


def run_calls(store: QueryStore, section: dict, calls: list[tuple[Call, Outcome]]) -> None:
    middleware = StoreQueries({"enabled": True, **section}, store)

    async def go():
        for call, outcome in calls:
            await middleware.on_outcome(call, outcome)

    asyncio.run(go())


def test_queries_responses_and_metadata_are_stored_redacted_and_read_back_after_a_restart(tmp_path):
    path = tmp_path / "lb" / "queries.sqlite"
    store = QueryStore(path)
    call = chat_call("my card is 4111111111111111, call me at bob@example.com", user="bob@example.com",
                     metadata={"ticket": "card 4111111111111111"}, sampling={"temperature": 0.2})
    run_calls(store, {"redact_patterns": [r"\b\d{16}\b", r"[\w.]+@[\w.]+"]},
              [(call, answered("noted: 4111111111111111", "ok"))])
    store.close()

    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    reopened = QueryStore(path)
    [row] = reopened.find(deployment="m")
    reopened.close()
    assert (row.call_id, row.deployment, row.method, row.status) == (call.id, "m", "chat", 200)
    assert row.query == [{"role": "user", "content": "my card is [redacted], call me at [redacted]"}]
    assert row.response == ["noted: [redacted]", "ok"]
    assert row.metadata == {"principal": "alice", "user": "[redacted]", "client": "10.0.0.7:4000",
                            "metadata": {"ticket": "card [redacted]"}, "sampling": {"temperature": 0.2},
                            "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
                            "finish_reasons": ["stop", "stop"], "replica": "r1", "seconds": 0.2, "error": None}
    assert row.expires is None and abs(row.time - time.time()) < 60
    assert b"4111111111111111" not in path.read_bytes() and b"bob@example.com" not in path.read_bytes()


def test_only_what_store_lists_is_kept(tmp_path):
    store = QueryStore(tmp_path / "q.sqlite")
    completion = Call(method="completion", model="m", prompt="Once upon a time")
    refused = Outcome(status=400, texts=[""], finish_reasons=[""], usage=None, error="input-filter: blocked word")
    run_calls(store, {"store": ["response"]}, [(chat_call("secret question"), answered("an answer"))])
    run_calls(store, {"store": ["query"]}, [(completion, refused)])
    store.close()
    store = QueryStore(tmp_path / "q.sqlite")
    rows = {row.method: row for row in store.find()}
    store.close()
    assert (rows["chat"].query, rows["chat"].response, rows["chat"].metadata) == (None, ["an answer"], None)
    assert (rows["completion"].query, rows["completion"].response, rows["completion"].metadata) == \
        ("Once upon a time", None, None)
    assert rows["completion"].status == 400


def test_rows_past_their_retention_are_purged_and_rows_without_one_are_kept(tmp_path):
    store = QueryStore(tmp_path / "q.sqlite")
    run_calls(store, {"retention_days": 7}, [(chat_call("short-lived", model="a"), answered("x"))])
    run_calls(store, {}, [(chat_call("kept", model="b"), answered("y"))])
    store.close()
    store = QueryStore(tmp_path / "q.sqlite")
    [short] = store.find(deployment="a")
    assert short.expires == pytest.approx(short.time + 7 * DAY_S)
    assert store.purge(now=time.time() + 6 * DAY_S) == 0
    assert store.purge(now=time.time() + 8 * DAY_S) == 1
    assert [row.deployment for row in store.find()] == ["b"]
    store.close()


def test_rows_are_found_by_deployment_and_time_newest_first(tmp_path):
    store = QueryStore(tmp_path / "q.sqlite")
    calls = [(chat_call(f"q{i}", model="a" if i % 2 else "b"), answered(f"r{i}")) for i in range(6)]
    middleware = StoreQueries({"enabled": True}, store)
    for i, (call, outcome) in enumerate(calls):  # rows at known times: 1000, 1010, ... 1050
        store.add(lambda call=call, outcome=outcome, i=i: middleware.stored(call, outcome, 1000.0 + 10 * i))
    store.close()
    store = QueryStore(tmp_path / "q.sqlite")
    assert [row.response for row in store.find(deployment="a")] == [["r5"], ["r3"], ["r1"]]
    assert [row.response for row in store.find(since=1010, until=1040)] == [["r3"], ["r2"], ["r1"]]
    assert [row.response for row in store.find(deployment="b", since=1020)] == [["r4"], ["r2"]]
    assert [row.response for row in store.find(limit=2)] == [["r5"], ["r4"]]
    store.close()


def test_a_busy_database_never_holds_up_the_call(tmp_path):
    path = tmp_path / "q.sqlite"
    store = QueryStore(path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the database
    middleware = StoreQueries({"enabled": True}, store)

    async def go():
        started = time.perf_counter()
        for i in range(20):
            await middleware.on_outcome(chat_call(f"q{i}"), answered("a"))
        return time.perf_counter() - started

    assert asyncio.run(go()) < 0.05
    time.sleep(0.2)
    other.execute("COMMIT")
    other.close()
    store.close()
    store = QueryStore(path)
    assert len(store.find()) == 20
    store.close()


def test_an_invalid_redact_pattern_is_named_by_its_index(tmp_path):
    store = QueryStore(tmp_path / "q.sqlite")
    try:
        with pytest.raises(InvalidInput, match=r"query_storage.redact_patterns\[1\]: '\(unclosed' is not a valid"):
            StoreQueries({"enabled": True, "redact_patterns": ["ok", "(unclosed"]}, store)
    finally:
        store.close()


def test_a_store_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "q.sqlite"
    path.touch()
    os.chmod(path, 0o644)
    with pytest.raises(InvalidInput, match="q.sqlite: the query store has mode 0644.*chmod 600"):
        QueryStore(path)


def test_the_factory_stores_only_when_enabled_and_opens_the_lbs_store(tmp_path):
    opened = []

    def query_store():
        opened.append(QueryStore(tmp_path / "q.sqlite"))
        return opened[-1]

    shared = SimpleNamespace(query_store=query_store)
    assert create({}, None, shared) is None
    assert create({"query_storage": {"enabled": False, "retention_days": 3}}, None, shared) is None
    assert opened == []
    made = create({"query_storage": {"enabled": True, "store": ["query"]}}, None, shared)
    assert isinstance(made, StoreQueries) and made.store is opened[0] and made.keep == {"query"}
    opened[0].close()
