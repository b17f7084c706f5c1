"""The middleware chain: ordered, stackable steps between a caller and a deployment's model.

A method call (chat or completion, streamed or not) passes the chain in order on the way in: each
middleware may read and change the call, or refuse it (raise Refused with an HTTP status and a message).
On the way out the response passes the chain in reverse order, text chunk by chunk: each middleware may
change a choice's text or hold some of it back (a filter that must see a word whole) and give it back when
the choice ends. When the call is over, each sees its outcome (for logs, audit, webhooks, storage).

A middleware object serves every call of a deployment at once; what it keeps per call goes in
`call.state`, under its own name.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class Refused(Exception):
    """A middleware refuses the call: the caller gets `status` and `message`."""

    def __init__(self, status: int, message: str, code: str = "refused"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.middleware = ""  # the refusing middleware's name, set by the chain


class StopChoice(Exception):
    """Raised by on_text: pass on `text` (what may still be shown), then end the choice with
    `finish_reason`; the rest of its generation is cancelled."""

    def __init__(self, text: str = "", finish_reason: str = "content_filter"):
        super().__init__(finish_reason)
        self.text = text
        self.finish_reason = finish_reason


@dataclass
class Call:
    """One method call on its way through the lb."""
    method: str                        # "chat" or "completion"
    model: str                         # the deployment
    messages: list[dict] | None = None  # chat: [{"role": ..., "content": ...}]
    prompt: str | None = None          # completion
    sampling: dict = field(default_factory=dict)  # the sampling values given: temperature, max_tokens, ...
    stream: bool = False
    include_usage: bool = False        # a streamed call's last chunk carries the usage
    echo: bool = False                 # completion: the prompt comes back before the text
    user: str = ""                     # OpenAI "user": the end user, as the caller names them
    metadata: dict[str, str] = field(default_factory=dict)
    api_key: str | None = None         # from "Authorization: Bearer ..."
    client: str = ""                   # the caller's address
    body_bytes: int = 0                # size of the request as received
    principal: str | None = None       # who the caller is, once authenticated
    groups: frozenset[str] = frozenset()
    adapter_digest: str = ""           # which model of the aimage answers (see worker.proto)
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    received: float = field(default_factory=time.perf_counter)
    state: dict = field(default_factory=dict)
    response_headers: dict[str, str] = field(default_factory=dict)  # set by middleware, sent to the caller

    def __post_init__(self):
        if not self.id:
            self.id = ("chatcmpl-" if self.method == "chat" else "cmpl-") + uuid.uuid4().hex

    def input_text(self) -> str:
        """What the caller wrote: the messages' contents, or the prompt."""
        if self.messages is not None:
            return "\n".join(m["content"] for m in self.messages)
        return self.prompt or ""


@dataclass
class Outcome:
    """How a call ended, as the caller saw it."""
    status: int                        # 200, or the HTTP status of the error
    texts: list[str]                   # per choice, the text the caller received
    finish_reasons: list[str]
    usage: dict | None                 # prompt_tokens, completion_tokens, total_tokens
    error: str | None = None
    replica: str = ""                  # the replica that answered
    seconds: float = 0.0


class Middleware:
    """Override what you need; the defaults pass everything through unchanged."""

    name = "middleware"

    async def on_request(self, call: Call) -> None:
        """Change the call, or raise Refused."""

    def on_text(self, call: Call, index: int, text: str) -> str:
        """The text to pass on for choice `index` from the text that came from the model's side; raise
        StopChoice to end the choice here."""
        return text

    def on_choice_end(self, call: Call, index: int) -> str:
        """Choice `index` is complete: the text held back, if any."""
        return ""

    async def on_outcome(self, call: Call, outcome: Outcome) -> None:
        """The call is over (answered, refused or failed)."""


class Chain:
    def __init__(self, middleware: list[Middleware]):
        self.middleware = list(middleware)

    def names(self) -> list[str]:
        return [m.name for m in self.middleware]

    async def request(self, call: Call) -> None:
        for m in self.middleware:
            try:
                await m.on_request(call)
            except Refused as refusal:
                refusal.middleware = m.name
                raise

    def text(self, call: Call, index: int, text: str) -> str:
        """The text to pass on; raises StopChoice (with the text that passed every middleware outside
        the one that stopped, and what they held) to end the choice."""
        for i in range(len(self.middleware) - 1, -1, -1):
            if not text:
                break
            try:
                text = self.middleware[i].on_text(call, index, text)
            except StopChoice as stop:
                stop.text = self._flush(call, index, stop.text, i)
                raise
        return text

    def choice_end(self, call: Call, index: int) -> str:
        """What is left of choice `index` once each middleware, model side first, has released what it
        held (which then passes through the middleware outside it). Raises StopChoice like text()."""
        return self._flush(call, index, "", len(self.middleware))

    def _flush(self, call: Call, index: int, text: str, below: int) -> str:
        """`text` through the middleware outside position `below`, each adding what it held."""
        for i in range(below - 1, -1, -1):
            m = self.middleware[i]
            try:
                if text:
                    text = m.on_text(call, index, text)
                text += m.on_choice_end(call, index)
            except StopChoice as stop:
                stop.text = self._flush(call, index, stop.text, i)
                raise
        return text

    async def outcome(self, call: Call, outcome: Outcome) -> None:
        for m in reversed(self.middleware):
            try:
                await m.on_outcome(call, outcome)
            except Exception:  # one middleware's failure must not keep the others from seeing the end
                log.exception("middleware failed at the end of a call", extra={"middleware": m.name,
                                                                               "call": call.id})
