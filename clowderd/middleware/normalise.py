"""Text as the language filters compare it, with the way back to the text as written.

`Folded(text)` is the text in the spirit of Unicode's NFKC_Casefold: compatibility forms made plain
(NFKC: fullwidth "ｂａｄ" and the ligature "ﬁ" as "bad" and "fi"), case folded ("BAD" and "baD" as "bad",
"ß" as "ss"; not when a filter is case-sensitive), and the default-ignorable code points removed: the
characters that render as nothing (zero-width space and joiners, soft hyphen, bidi controls, variation
selectors, tags, ...) and would otherwise let a listed word through unseen.

Each character of the folded text knows the span of the original it came from, so that a match found
in the folded text is cut or replaced in the original without touching the characters around it. Runs
of characters that each fold to one character (most text, fullwidth letters included) are folded with
str.translate and map character for character; a character that folds to none or to several ("ß",
"ﬁ"), and a combining mark with the character before it (which NFKC may compose into one), are folded as
a cluster and map to that cluster as a whole, so that a match never ends between a letter and its accent.
"""
from __future__ import annotations

import re
import unicodedata
from bisect import bisect_right
from typing import Iterator

# Default_Ignorable_Code_Point (Unicode 15.1, DerivedCoreProperties.txt).
DEFAULT_IGNORABLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f"
    "\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0000-\U000e0fff]")
_HARD = re.compile("x+")
MAX_CACHED = 1 << 16  # characters whose folding is kept: a text of every code point must not grow it without end


def _fold(text: str, casefold: bool) -> str:
    text = unicodedata.normalize("NFKC", DEFAULT_IGNORABLE.sub("", text))
    return unicodedata.normalize("NFKC", text.casefold()) if casefold else text


class _Table(dict):
    """A str.translate table (code point -> text) filled as characters are met, at most MAX_CACHED."""

    def __init__(self, of):
        super().__init__()
        self.of = of

    def __missing__(self, code: int) -> str:
        value = self.of(chr(code))
        if len(self) < MAX_CACHED:
            self[code] = value
        return value


# Per casefold: each character folded alone; and "." for a character that folds alone to one character
# (most do, fullwidth letters included), "x" for one that does not or that joins the one before it (a
# combining mark, which NFKC may compose with it).
_FOLD = {cf: _Table(lambda c, cf=cf: _fold(c, cf)) for cf in (True, False)}
_KIND = {cf: _Table(lambda c, cf=cf: "x" if unicodedata.combining(c) or len(_FOLD[cf][ord(c)]) != 1 else ".")
         for cf in (True, False)}


class Folded:
    """`text` folded (`.text`), and the map from positions in it back to `text` (`.original`)."""

    def __init__(self, original: str, casefold: bool = True):
        self.original = original
        self.casefold = casefold
        texts: list[str] = []
        self._at: list[int] = []           # where each piece begins in the folded text
        self._from: list[tuple[int, int, bool]] = []  # its span in the original; whether char for char
        length = 0
        for start, end, folded, exact in self._pieces():
            if folded:
                texts.append(folded)
                self._at.append(length)
                self._from.append((start, end, exact))
                length += len(folded)
        self.text = "".join(texts)

    def start(self, i: int) -> int:
        """Where in the original the folded character i begins (its piece, for a folded cluster); the
        original's end for i = len(text)."""
        if i >= len(self.text):
            return len(self.original)
        k = bisect_right(self._at, i) - 1
        start, _, exact = self._from[k]
        return start + (i - self._at[k]) if exact else start

    def boundary(self, i: int) -> int:
        """The last position at or before i where a piece of the original begins in the folded text: a
        cut there never splits a folded cluster."""
        if i >= len(self.text):
            return len(self.text)
        k = bisect_right(self._at, i) - 1
        return i if self._from[k][2] else self._at[k]

    def end(self, i: int) -> int:
        """Where in the original the folded text up to i (exclusive, i > 0) ends."""
        k = bisect_right(self._at, i - 1) - 1
        start, end, exact = self._from[k]
        return start + (i - self._at[k]) if exact else end

    def _pieces(self) -> Iterator[tuple[int, int, str, bool]]:
        """(start, end, folded text, char for char) of each piece of the original, in order."""
        text = self.original
        if text.isascii():
            yield 0, len(text), text.lower() if self.casefold else text, True
            return
        fold_each = _FOLD[self.casefold]
        done = 0
        for hard in _HARD.finditer(text.translate(_KIND[self.casefold])):
            start = max(hard.start() - 1, done)  # the character before: a combining mark may join it
            if start > done:
                yield done, start, text[done:start].translate(fold_each), True
            i = start
            while i < hard.end():  # one cluster at a time: a character and the combining marks after it
                j = i + 1
                while j < hard.end() and unicodedata.combining(text[j]):
                    j += 1
                yield i, j, fold_each[ord(text[i])] if j == i + 1 else _fold(text[i:j], self.casefold), False
                i = j
            done = hard.end()
        if done < len(text):
            yield done, len(text), text[done:].translate(fold_each), True


def fold(text: str, casefold: bool = True) -> str:
    """The folded text alone."""
    return Folded(text, casefold).text
