"""Conversations kept by the lb, from the aimage configuration's `conversation`: the caller names a
conversation in `metadata.conversation_id` and sends only its new messages; the earlier messages are put
back before them, within `max_messages` and `max_history_chars`. What does not fit is dropped (policy
"trim") or replaced by a summary that the deployment's own model writes (policy "summarise"). A chat
without a conversation id starts a new conversation; its id comes back in the
`x-clowder-conversation-id` response header.

A conversation belongs to the deployment and the caller (the authenticated user, or no one) that
started it: anyone else is told it does not exist. Untouched for `ttl_hours`, it is forgotten.
History lives in a SQLite database in the lb's data directory, written only when a call succeeds.
"""
from __future__ import annotations

import asyncio
import json
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from clowderd.middleware.base import Call, Middleware, Outcome, Refused

CONVERSATION_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
HEADER = "x-clowder-conversation-id"
PURGE_INTERVAL_S = 3600.0
SKIP = "skip"  # call.state["conversation"] of the lb's own calls (summaries)
SUMMARY_PROMPT = ("Summarise the conversation below in a few sentences, keeping names, facts and decisions. "
                  "Answer with the summary only.")

Summarise = Callable[[Call, list[dict]], Awaitable[str]]  # (the caller's call, messages) -> summary

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY, deployment TEXT NOT NULL, principal TEXT NOT NULL, summary TEXT NOT NULL DEFAULT '',
    messages TEXT NOT NULL, updated REAL NOT NULL);
CREATE INDEX IF NOT EXISTS conversations_updated ON conversations (updated);
"""


@dataclass
class Conversation:
    id: str
    deployment: str
    principal: str
    summary: str
    messages: list[dict]
    updated: float = 0.0


class ConversationStore:
    """Conversations by id, in one SQLite file (WAL); every method is blocking and thread-safe."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def get(self, conversation_id: str) -> Conversation | None:
        with self._lock:
            row = self._db.execute("SELECT id, deployment, principal, summary, messages, updated FROM conversations "
                                   "WHERE id = ?", (conversation_id,)).fetchone()
        return None if row is None else Conversation(*row[:4], json.loads(row[4]), row[5])

    def put(self, c: Conversation) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO conversations VALUES (?, ?, ?, ?, ?, ?)",
                             (c.id, c.deployment, c.principal, c.summary, json.dumps(c.messages), time.time()))

    def forget_older_than(self, deployment: str, seconds: float) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM conversations WHERE deployment = ? AND updated < ?",
                                    (deployment, time.time() - seconds)).rowcount

    def close(self) -> None:
        self._db.close()


def fit(messages: list[dict], max_messages: int, max_chars: int) -> int:
    """How many of the oldest messages must go so that the rest fit both limits."""
    keep, chars = 0, 0
    for m in reversed(messages):
        if keep == max_messages or chars + len(m["content"]) > max_chars:
            break
        keep, chars = keep + 1, chars + len(m["content"])
    return len(messages) - keep


class KeepConversation(Middleware):
    name = "conversation"

    def __init__(self, section: dict, store: ConversationStore, summarise: Summarise):
        self.store = store
        self.summarise = summarise
        self.max_messages = section.get("max_messages", 50)
        self.max_chars = section.get("max_history_chars", 16000)
        self.policy = section.get("policy", "trim")
        self.ttl = section.get("ttl_hours", 168) * 3600.0
        self._forgotten = 0.0  # when conversations past their ttl were last deleted

    async def on_request(self, call: Call) -> None:
        if call.method != "chat" or call.state.get(self.name) == SKIP:
            return
        conversation_id = call.metadata.get("conversation_id") or "conv-" + secrets.token_hex(12)
        if not CONVERSATION_ID.match(conversation_id):
            raise Refused(400, f"metadata.conversation_id {conversation_id!r}: use 1 to 128 letters, digits, "
                               "'.', '_' and '-'", "invalid_conversation_id")
        owner = call.principal or ""
        if time.monotonic() - self._forgotten > PURGE_INTERVAL_S:
            self._forgotten = time.monotonic()
            await asyncio.to_thread(self.store.forget_older_than, call.model, self.ttl)
        found = await asyncio.to_thread(self.store.get, conversation_id)
        if found is not None and time.time() - found.updated > self.ttl:
            found = None
        if found is not None and (found.deployment != call.model or found.principal != owner):
            raise Refused(404, f"conversation {conversation_id!r} does not exist", "conversation_not_found")
        conversation = found or Conversation(conversation_id, call.model, owner, "", [])
        history = conversation.messages
        drop = fit(history, self.max_messages, self.max_chars)
        if drop:
            if self.policy == "summarise":
                earlier = ([{"role": "system", "content": f"Earlier summary: {conversation.summary}"}]
                           if conversation.summary else [])
                conversation.summary = await self.summarise(call, earlier + history[:drop])
            history = history[drop:]
        conversation.messages = history
        summary = ([{"role": "system", "content": f"Summary of the conversation so far: {conversation.summary}"}]
                   if conversation.summary else [])
        call.state[self.name] = (conversation, [dict(m) for m in call.messages])
        call.messages[:0] = summary + [dict(m) for m in history]
        call.response_headers[HEADER] = conversation_id

    async def on_outcome(self, call: Call, outcome: Outcome) -> None:
        kept = call.state.get(self.name)
        if outcome.status != 200 or not isinstance(kept, tuple):
            return
        conversation, new = kept
        conversation.messages = conversation.messages + new + [{"role": "assistant", "content": outcome.texts[0]}]
        await asyncio.to_thread(self.store.put, conversation)


def summary_request(messages: list[dict]) -> list[dict]:
    """The chat that asks the model for a summary of these messages."""
    transcript = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    return [{"role": "system", "content": SUMMARY_PROMPT}, {"role": "user", "content": transcript}]


def create(config: dict, policy, shared) -> Middleware | None:
    section = config.get("conversation") or {}
    if not section.get("enabled"):
        return None
    return KeepConversation(section, shared.conversations(), shared.summarise)
