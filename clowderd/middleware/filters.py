"""Language filters from the aimage configuration's `filters.input` and `filters.output`: lists of words
(or phrases) to block or to redact.

Matching is on the folded text (clowderd.middleware.normalise): compatibility forms made plain, case
folded unless `case_sensitive`, invisible characters removed; the rules are folded the same way. So a
listed word is caught in fullwidth letters, with a zero-width space inside it or in another case. A
rule is a string, matched as a whole word (not inside a longer word, as before), or an object that says
how: `{"word": "...", "match": "word"}` or `"match": "substring"` (anywhere, also glued to other
letters). A whole-word rule also matches the word with a common English plural ending (-s, -es, and -y
to -ies); irregular plurals are rules of their own.

Input: a blocked word refuses the call (400, naming the field and the word); redacted words are replaced
before the model sees them, in every text of the call that can reach the model. Output: redacted words
are replaced and a blocked word ends the choice before it (finish_reason "content_filter"), cancelling
the rest of the generation. What is cut or replaced is the original text of the match, found through the
folded text's map back to it: the text around it passes as it came.

Streamed output arrives in arbitrary pieces, so a word can straddle two of them. The output filter holds
back the tail of what it has seen that could still become a listed word (the trailing run of word
characters, or a suffix that begins one of the rules; at least the last character, which a combining
mark may yet join) and releases it once the next piece shows it is not one, or when the choice ends: no
listed word ever reaches the caller, whatever the chunking, and the caller sees what an unchunked answer
would have shown.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from clowderd.middleware.base import Call, Middleware, Refused, StopChoice
from clowderd.middleware.normalise import Folded, fold

DEFAULT_REPLACEMENT = "[redacted]"
# A character of a word: \w, and the combining diacritical marks (those left over after NFKC, on a letter
# that has no precomposed form with them), which are part of the letter before them.
_WORD = r"[\w\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]"
_TRAILING_WORD = re.compile(_WORD + "+$")
_CONSONANT_Y = re.compile(r"[^\W\d_aeiou]y$")


@dataclass(frozen=True)
class Rule:
    word: str
    substring: bool  # matched anywhere; else as a whole word, or its plural

    @classmethod
    def of(cls, entry: str | dict) -> "Rule":
        if isinstance(entry, str):
            return cls(entry, False)
        return cls(entry["word"], entry.get("match", "word") == "substring")

    def forms(self, casefold: bool) -> set[str]:
        """The texts it matches, folded: the word, and for a whole word ending in a letter its plurals."""
        word = fold(self.word, casefold)
        if not word or self.substring or not word[-1].isalpha():
            return {word} - {""}
        forms = {word, word + "s", word + "es"}
        if _CONSONANT_Y.search(word):
            forms.add(word[:-1] + "ies")
        return forms


@dataclass
class _Searched:
    """The folded text of what is searched, after `context`: the folded character released before it, if
    any (whether a match is a whole word depends on it). Positions are in `text`."""
    folded: Folded
    context: str = ""

    @property
    def text(self) -> str:
        return self.context + self.folded.text

    def start(self, p: int) -> int:
        """The original position where the searched character p begins."""
        return self.folded.start(p - len(self.context))

    def end(self, p: int) -> int:
        """The original position where the searched text up to p ends."""
        return self.folded.end(p - len(self.context))

    def boundary(self, p: int) -> int:
        return len(self.context) + self.folded.boundary(p - len(self.context))


class _Matcher:
    def __init__(self, section: dict):
        self.casefold = not section.get("case_sensitive", False)
        self.replacement = section.get("replacement", DEFAULT_REPLACEMENT)
        self.block = self._pattern(section.get("block", ()))
        self.redact = self._pattern(section.get("redact", ()))
        self.forms = [f for entry in (*section.get("block", ()), *section.get("redact", ()))
                      for f in Rule.of(entry).forms(self.casefold)]
        self.longest = max(map(len, self.forms), default=0)

    def _pattern(self, entries) -> re.Pattern | None:
        alternatives = [(form, re.escape(form) if rule.substring else f"(?<!{_WORD}){re.escape(form)}(?!{_WORD})")
                        for rule in map(Rule.of, entries) for form in rule.forms(self.casefold)]
        if not alternatives:
            return None
        # Longest first, so that a phrase wins over a word it starts with.
        return re.compile("|".join(a for _, a in sorted(alternatives, key=lambda a: len(a[0]), reverse=True)))

    def search(self, text: str, context: str = "") -> _Searched:
        return _Searched(Folded(text, self.casefold), context)

    def held_from(self, s: _Searched) -> int:
        """Where the part of the searched text that could still grow into a match begins: a trailing word
        (whether it is whole is not known yet), a suffix that begins one of the rules' forms, or at least
        the last character. No match runs past it, and it never splits a folded cluster."""
        text, start = s.text, len(s.context)
        cut = max(start, len(text) - 1)  # the last character, whatever it is: a combining mark may follow
        trailing = _TRAILING_WORD.search(text, start)
        if trailing:
            cut = trailing.start()
        for i in range(max(start, len(text) - self.longest), cut):
            suffix = text[i:]
            if any(f.startswith(suffix) for f in self.forms):
                cut = i
                break
        while True:  # back to a cluster's start, and before any match that reaches past the cut
            moved = s.boundary(cut)
            for pattern in (self.block, self.redact):  # a substring match may reach into a trailing word
                for hit in pattern.finditer(text, start) if pattern else ():
                    if hit.end() > moved:
                        moved = min(moved, hit.start())
                        break
            if moved == cut:
                return max(start, cut)
            cut = moved

    def blocked(self, s: _Searched, cut: int) -> re.Match | None:
        """The first blocked word that begins before `cut`."""
        hit = self.block.search(s.text, len(s.context)) if self.block else None
        return hit if hit and hit.start() < cut else None

    def redacted(self, s: _Searched, cut: int) -> str:
        """The original of the searched text up to `cut`, each redacted word in it replaced."""
        original, end = s.folded.original, s.start(cut)
        out, last = [], 0
        for hit in self.redact.finditer(s.text, len(s.context)) if self.redact else ():
            if hit.start() >= cut:
                break
            start = s.start(hit.start())
            if start < last:  # in a cluster already replaced
                continue
            out += [original[last:start], self.replacement]
            last = s.end(hit.end())
        out.append(original[last:end])
        return "".join(out)


class InputFilter(Middleware):
    name = "input-filter"

    def __init__(self, section: dict):
        self.matcher = _Matcher(section)

    async def on_request(self, call: Call) -> None:
        m = self.matcher
        for where, text, put in _model_inputs(call):
            s = m.search(text)
            hit = m.blocked(s, len(s.text))
            if hit:
                word = text[s.start(hit.start()):s.end(hit.end())]
                raise Refused(400, f"{where}: the input contains the blocked word {word!r}", "blocked_input")
            if m.redact:
                put(m.redacted(s, len(s.text)))


def _model_inputs(call: Call):
    """(where, text, setter) of each text of the call that can reach the model: the messages' contents
    and names (an engine's chat template may put a name into the prompt), or the prompt. Not the stop
    strings, which only end the output, nor `user` and `metadata`, which no engine is given."""
    if call.messages is None:
        yield "prompt", call.prompt or "", lambda text: setattr(call, "prompt", text)
        return
    for i, message in enumerate(call.messages):
        for field in ("content", "name"):
            if message.get(field):
                yield f"messages[{i}].{field}", message[field], lambda text, m=message, f=field: m.__setitem__(f, text)


class OutputFilter(Middleware):
    name = "output-filter"

    def __init__(self, section: dict):
        self.matcher = _Matcher(section)

    def _buffers(self, call: Call) -> dict[int, tuple[str, str]]:
        """Per choice: the last folded character released (a word boundary depends on it) and the text
        held, as it came."""
        return call.state.setdefault(self.name, {})

    def on_text(self, call: Call, index: int, text: str) -> str:
        buffers = self._buffers(call)
        context, held = buffers.get(index, ("", ""))
        s = self.matcher.search(held + text, context)
        cut = self.matcher.held_from(s)
        buffers[index] = (s.text[cut - 1:cut], s.folded.original[s.start(cut):])
        return self._release(call, index, s, cut)

    def on_choice_end(self, call: Call, index: int) -> str:
        context, held = self._buffers(call).pop(index, ("", ""))
        s = self.matcher.search(held, context)
        return self._release(call, index, s, len(s.text))

    def _release(self, call: Call, index: int, s: _Searched, cut: int) -> str:
        """The original of the searched text up to `cut`, redacted; a blocked word in it stops the choice."""
        hit = self.matcher.blocked(s, cut)
        if hit:
            self._buffers(call).pop(index, None)
            raise StopChoice(self.matcher.redacted(s, hit.start()))
        return self.matcher.redacted(s, cut)


def create_input(config: dict, policy, shared) -> Middleware | None:
    section = (config.get("filters") or {}).get("input")
    return InputFilter(section) if section and (section.get("block") or section.get("redact")) else None


def create_output(config: dict, policy, shared) -> Middleware | None:
    section = (config.get("filters") or {}).get("output")
    return OutputFilter(section) if section and (section.get("block") or section.get("redact")) else None
