"""Counting by words equals tiktoken's count of the whole text, on adversarial random text."""

from __future__ import annotations

import random

import pytest

from tunelab.data.encodings import get_encoding
from tunelab.data.textcount import TextCounter

# Characters around which tiktoken's split patterns behave differently.
ALPHABET = (
    ["a", "b", "Z", "é", "ß", "Ⅻ", "東", "京", "ا", "ं", "\u0301", "'", "’", "s", "t", "ll", "VE", "Re", "d", "M"]
    + ["0", "7", "12345", "٣", ".", ",", "!", "?", "/", "(", ")", "-", "_", '"', "@", "#", "😀", "👍🏽", "\ufffd"]
    + [" ", " ", " ", " ", "  ", "   ", "\n", "\r\n", "\t", "\u00a0", "\u2009", "\u3000", "\x0b", "\x1c", "\u2028"]
    + ["\u200b", "<|endoftext|>", "\ud800"]
)
WORDS = ["the", " the", "The", "hello", "world", "don't", "I'm", "x.y", "3.14", "http://a.b/c", "..."]


def random_text(rng: random.Random) -> str:
    pool = ALPHABET if rng.random() < 0.6 else ALPHABET + WORDS * 3
    return "".join(rng.choice(pool) for _ in range(rng.randint(0, 80)))


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_word_counts_equal_whole_text_counts(name: str) -> None:
    encode = get_encoding(name).encode_ordinary
    counter = TextCounter(encode)
    rng = random.Random(name)
    for _ in range(8_000):
        text = random_text(rng)
        assert counter.count(text) == len(encode(text)), repr(text)


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_prose_and_code(name: str) -> None:
    encode = get_encoding(name).encode_ordinary
    counter = TextCounter(encode)
    texts = [
        "Some chaps named Fabian Gottlieb von Bellingshausen and Mikhail Lazarev, as if they don't teach that!",
        "def f(x):\n    return x  +  1  # two  spaces\n\n\tindented\ttabs  ",
        "  leading and trailing spaces  ",
        "Multiple\n\nparagraphs. With  double  spaces and trailing newline\n",
        "Voilà — «les guillemets» ; 10 000 €. ¿Qué? 日本語のテキスト、句読点。",
        " " * 30 + "x" + " " * 30,
    ]
    for text in texts:
        assert counter.count(text) == len(encode(text)), repr(text)
        assert counter.count(text) == len(encode(text))  # from the cache this time


def test_caches_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from tunelab.data import textcount

    monkeypatch.setattr(textcount, "WORD_CACHE_LIMIT", 50)
    monkeypatch.setattr(textcount, "STRING_CACHE_LIMIT", 10)
    encode = get_encoding("cl100k_base").encode_ordinary
    counter = TextCounter(encode)
    for i in range(500):
        text = f"unique words number {i} and {i * 7} again and more of them {i}"
        assert counter.count(text) == len(encode(text))
    assert len(counter._strings) <= 10
    assert len(counter._bare) + len(counter._spaced) <= 50 + 20
