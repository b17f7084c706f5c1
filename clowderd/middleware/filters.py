"""Language filters from the aimage configuration's `filters.input` and `filters.output`: lists of words
(or phrases) to block or to redact, matched as whole words, case-insensitively unless `case_sensitive`.

Input: a blocked word refuses the call (400, naming the word); redacted words are replaced in the
messages or prompt before the model sees them. Output: redacted words are replaced and a blocked word
ends the choice before it (finish_reason "content_filter"), cancelling the rest of the generation.

Streamed output arrives in arbitrary pieces, so a word can straddle two of them. The output filter holds
back the tail of what it has seen that could still become a listed word (the trailing run of word
characters, or a suffix that begins one of the phrases) and releases it once the next piece shows it is
not one, or when the choice ends: no listed word ever reaches the caller, whatever the chunking.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from clowderd.middleware.base import Call, Middleware, Refused, StopChoice

DEFAULT_REPLACEMENT = "[redacted]"
_TRAILING_WORD = re.compile(r"\w+$")


@dataclass(frozen=True)
class WordList:
    words: tuple[str, ...]
    case_sensitive: bool

    def pattern(self) -> re.Pattern | None:
        if not self.words:
            return None
        # Longest first, so that a phrase wins over a word it starts with.
        alternatives = "|".join(re.escape(w) for w in sorted(self.words, key=len, reverse=True))
        return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", 0 if self.case_sensitive else re.IGNORECASE)


class _Matcher:
    def __init__(self, section: dict):
        case = bool(section.get("case_sensitive", False))
        self.block = WordList(tuple(section.get("block", ())), case).pattern()
        self.redact = WordList(tuple(section.get("redact", ())), case).pattern()
        self.replacement = section.get("replacement", DEFAULT_REPLACEMENT)
        self.case_sensitive = case
        words = [*section.get("block", ()), *section.get("redact", ())]
        self.words = words if case else [w.lower() for w in words]

    def redacted(self, text: str) -> str:
        return self.redact.sub(self.replacement, text) if self.redact else text

    def held_from(self, text: str) -> int:
        """Where the part of `text` that could still grow into a listed word begins."""
        cut = len(text)
        trailing = _TRAILING_WORD.search(text)
        if trailing:
            cut = trailing.start()
        folded = text if self.case_sensitive else text.lower()
        for start in range(max(0, len(text) - max(map(len, self.words), default=0)), cut):
            suffix = folded[start:]
            if any(w.startswith(suffix) for w in self.words):
                return start
        return cut


class InputFilter(Middleware):
    name = "input-filter"

    def __init__(self, section: dict):
        self.matcher = _Matcher(section)

    async def on_request(self, call: Call) -> None:
        m = self.matcher
        texts = [msg["content"] for msg in call.messages] if call.messages is not None else [call.prompt or ""]
        if m.block:
            for text in texts:
                hit = m.block.search(text)
                if hit:
                    raise Refused(400, f"the input contains the blocked word {hit.group(0)!r}", "blocked_input")
        if m.redact:
            if call.messages is not None:
                for msg in call.messages:
                    msg["content"] = m.redacted(msg["content"])
            else:
                call.prompt = m.redacted(call.prompt or "")


class OutputFilter(Middleware):
    name = "output-filter"

    def __init__(self, section: dict):
        self.matcher = _Matcher(section)

    def _buffers(self, call: Call) -> dict[int, tuple[str, str]]:
        """Per choice: the last character released (a word boundary depends on it) and the text held."""
        return call.state.setdefault(self.name, {})

    def on_text(self, call: Call, index: int, text: str) -> str:
        buffers = self._buffers(call)
        context, held = buffers.get(index, ("", ""))
        pending = context + held + text
        start = len(context)
        cut = max(start, self.matcher.held_from(pending))
        buffers[index] = (pending[cut - 1:cut], pending[cut:])
        return self._release(call, index, pending, start, cut)

    def on_choice_end(self, call: Call, index: int) -> str:
        context, held = self._buffers(call).pop(index, ("", ""))
        pending = context + held
        return self._release(call, index, pending, len(context), len(pending))

    def _release(self, call: Call, index: int, pending: str, start: int, cut: int) -> str:
        """pending[start:cut], redacted; a blocked word in it stops the choice. Matching sees all of
        `pending`, so that the characters around a word decide whether it is a whole word."""
        m = self.matcher
        if m.block:
            hit = m.block.search(pending, start)
            if hit and hit.start() < cut:
                self._buffers(call).pop(index, None)
                raise StopChoice(self._redact(pending, start, hit.start()))
        return self._redact(pending, start, cut)

    def _redact(self, pending: str, start: int, end: int) -> str:
        m = self.matcher
        if not m.redact:
            return pending[start:end]
        out, last = [], start
        for hit in m.redact.finditer(pending, start):
            if hit.start() >= end:
                break
            out += [pending[last:hit.start()], m.replacement]
            last = hit.end()
        out.append(pending[last:end])
        return "".join(out)


def create_input(config: dict, policy, shared) -> Middleware | None:
    section = (config.get("filters") or {}).get("input")
    return InputFilter(section) if section and (section.get("block") or section.get("redact")) else None


def create_output(config: dict, policy, shared) -> Middleware | None:
    section = (config.get("filters") or {}).get("output")
    return OutputFilter(section) if section and (section.get("block") or section.get("redact")) else None
