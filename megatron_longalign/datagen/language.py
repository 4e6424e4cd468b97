"""Which prompt language a document gets: Chinese or English.

The rule (documented in docs/DATA_CONSTRUCTION.md): count the CJK ideographs and the
other letters (`str.isalpha`, so Latin, Cyrillic, ...); the document is Chinese when
ideographs are at least `CJK_RATIO` of those. Counting letters rather than characters
keeps digits, punctuation and whitespace out of it, and a ratio well below one half
keeps Chinese text with many English names or code (every Latin letter counts,
while one ideograph is already a word) on the Chinese side. Only the document's first
`SAMPLE_CHARS` characters are looked at: the language does not change mid-document
often enough to pay for scanning 64k tokens.
"""

from __future__ import annotations

ENGLISH, CHINESE = "en", "zh"
LANGUAGES = (ENGLISH, CHINESE)
CJK_RATIO = 0.3
SAMPLE_CHARS = 20_000

# CJK Unified Ideographs, Extension A, and the compatibility block.
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xF900, 0xFAFF))


def is_cjk(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in _CJK_RANGES)


def detect_language(text: str) -> str:
    """`CHINESE` when CJK ideographs make up at least CJK_RATIO of the letters in the
    first SAMPLE_CHARS characters, else `ENGLISH` (also for text without letters)."""
    cjk = letters = 0
    for char in text[:SAMPLE_CHARS]:
        if is_cjk(char):
            cjk += 1
            letters += 1
        elif char.isalpha():
            letters += 1
    return CHINESE if letters and cjk / letters >= CJK_RATIO else ENGLISH
