"""Security checks from the aimage configuration's `security`: a size limit on the input (413 naming the
limit) and prompt-injection patterns (400 naming the pattern that matched): a built-in list of the common
phrasings when `prompt_injection.enabled`, plus the configuration's own regular expressions."""
from __future__ import annotations

import re

from clowderd.middleware.base import Call, Middleware, Refused

# Common ways of asking a model to drop its instructions or reveal them.
BUILTIN_INJECTION_PATTERNS = (
    r"\b(ignore|disregard|forget)\b.{0,40}\b(previous|prior|above|earlier|all)\b.{0,40}"
    r"\b(instructions?|prompts?|rules?|directions?)\b",
    r"\b(reveal|show|print|repeat|output)\b.{0,40}\b(system|hidden|initial)\s+(prompt|instructions?|message)\b",
    r"\byou are now\b.{0,40}\b(unfiltered|jailbroken|DAN|developer mode)\b",
    r"\bpretend\b.{0,40}\b(no|without)\b.{0,20}\b(rules|restrictions|filters|guidelines)\b",
)


class SecurityChecks(Middleware):
    name = "security"

    def __init__(self, section: dict):
        self.max_input_bytes = section.get("max_input_bytes")
        injection = section.get("prompt_injection") or {}
        patterns = list(BUILTIN_INJECTION_PATTERNS) if injection.get("enabled") else []
        patterns += injection.get("patterns", [])
        self.patterns = [(p, re.compile(p, re.IGNORECASE | re.DOTALL)) for p in patterns]

    async def on_request(self, call: Call) -> None:
        text = call.input_text()
        if self.max_input_bytes is not None:
            size = len(text.encode())
            if size > self.max_input_bytes:
                raise Refused(413, f"the input is {size} bytes, over this deployment's limit of "
                                   f"{self.max_input_bytes} bytes (security.max_input_bytes)", "input_too_large")
        for source, pattern in self.patterns:
            if pattern.search(text):
                raise Refused(400, f"the input looks like a prompt injection (it matches {source!r})",
                              "prompt_injection")


def create(config: dict, policy, shared) -> Middleware | None:
    section = config.get("security") or {}
    injection = section.get("prompt_injection") or {}
    wanted = section.get("max_input_bytes") is not None or injection.get("enabled") or injection.get("patterns")
    return SecurityChecks(section) if wanted else None
