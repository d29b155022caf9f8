"""Text as the moderation term check reads it (pure; the config validates terms with it too)."""

from __future__ import annotations

import unicodedata

# Characters that show nothing (Unicode's default-ignorable code points beyond the format
# category Cf, and blank fillers): removed before matching, as format characters are.
_INVISIBLE = frozenset(
    [0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180B, 0x180C, 0x180D, 0x180F, 0x2800, 0x3164,
     0xFFA0, *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0)]
)  # fmt: skip


def normalized(text: str) -> str:
    """What the term check reads: compatibility forms as their plain letters (NFKC: full-width
    letters, ligatures), accents removed (NFKD without combining marks), case-folded, and without
    invisible characters (format characters such as zero-width spaces and soft hyphens, variation
    selectors, fillers), which would otherwise split or disguise a word without showing."""
    decomposed = unicodedata.normalize("NFKD", text)
    kept = "".join(
        char
        for char in decomposed
        if unicodedata.category(char) not in ("Mn", "Cf") and ord(char) not in _INVISIBLE
    )
    return unicodedata.normalize("NFKC", kept).casefold()
