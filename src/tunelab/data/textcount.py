"""Counting the tiktoken tokens of many strings fast: whole strings and words are remembered.

tiktoken first splits text into pieces with its regex, then byte-pair-encodes each piece, so a
count is the sum of the pieces' counts. For cl100k_base and o200k_base, a space whose previous
character is not whitespace always starts a new piece: no piece pattern can run through a space
(letters, digits, punctuation runs and contractions stop at it; whitespace runs cannot contain
the non-whitespace character before it), and the pieces after it match the same way whether or
not the text before is there (the patterns have no look-behind). So ``"Hello world"`` counts as
``"Hello"`` plus ``" world"``, and the counts of words, which repeat endlessly across a dataset,
can be remembered. tests/data/test_textcount.py checks the identity on random text.
"""

from __future__ import annotations

from collections.abc import Callable

STRING_CACHE_LIMIT = 50_000
"""Distinct whole strings remembered; past it the cache starts over (bounded memory)."""
WORD_CACHE_LIMIT = 200_000
"""Distinct words remembered, likewise."""
_SPLIT_LONGER_THAN = 24
"""Shorter strings are encoded whole: splitting them costs more than it saves."""


class TextCounter:
    """``count(text)`` equals ``len(encode_ordinary(text))``, for cl100k_base and o200k_base."""

    def __init__(self, encode_ordinary: Callable[[str], list[int]]) -> None:
        self._encode = encode_ordinary
        self._strings: dict[str, int] = {}
        self._bare = _WordCounts(encode_ordinary, "")
        self._spaced = _WordCounts(encode_ordinary, " ")
        """Counts of " " + key: the words after a space, the most common pieces by far."""

    def count(self, text: str) -> int:
        count = self._strings.get(text)
        if count is None:
            count = self._by_words(text) if len(text) > _SPLIT_LONGER_THAN else len(self._encode(text))
            if len(self._strings) >= STRING_CACHE_LIMIT:
                self._strings.clear()
            self._strings[text] = count
        return count

    def _by_words(self, text: str) -> int:
        if len(self._bare) + len(self._spaced) >= WORD_CACHE_LIMIT:
            self._bare.clear()
            self._spaced.clear()
        parts = text.split(" ")
        # Printable text has no whitespace but " " (tabs, newlines, no-break spaces are not
        # printable); without "  " either, every space is a safe cut: sum the words at C speed.
        if text.isprintable() and "" not in parts[:-1]:
            return self._bare[parts[0]] + sum(map(self._spaced.__getitem__, parts[1:]))
        total = 0
        word = parts[0]
        for part in parts[1:]:
            # A cut before this space is safe only after a non-whitespace character.
            if word and not word[-1].isspace():
                total += self._bare[word]
                word = " " + part
            else:
                word += " " + part
        return total + self._bare[word]


class _WordCounts(dict[str, int]):
    """Token counts of ``prefix + key``, encoded on first lookup."""

    def __init__(self, encode: Callable[[str], list[int]], prefix: str) -> None:
        super().__init__()
        self._encode = encode
        self._prefix = prefix

    def __missing__(self, key: str) -> int:
        count = self[key] = len(self._encode(self._prefix + key))
        return count
