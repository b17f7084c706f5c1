"""Prompts prepended to every call, from the aimage configuration's `prompts`: a system prompt first, then
fixed messages, then the caller's own. For a completion (a bare prompt, no roles) the system prompt and
the messages' contents are put before the prompt, each followed by a blank line."""
from __future__ import annotations

from clowderd.middleware.base import Call, Middleware


class PrependPrompts(Middleware):
    name = "prompts"

    def __init__(self, section: dict):
        self.messages = []
        if section.get("system"):
            self.messages.append({"role": "system", "content": section["system"]})
        self.messages += [{"role": m["role"], "content": m["content"]} for m in section.get("prefix_messages", ())]

    async def on_request(self, call: Call) -> None:
        if call.messages is not None:
            call.messages[:0] = [dict(m) for m in self.messages]
        else:
            call.prompt = "".join(m["content"] + "\n\n" for m in self.messages) + (call.prompt or "")


def create(config: dict, policy, shared) -> Middleware | None:
    section = config.get("prompts") or {}
    return PrependPrompts(section) if section.get("system") or section.get("prefix_messages") else None
