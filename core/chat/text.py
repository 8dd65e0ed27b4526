"""Splitting long text at a platform's limit, on line and then word boundaries."""

from __future__ import annotations


def split_text(text: str, limit: int) -> list[str]:
    """``text`` in pieces of at most ``limit`` characters, broken at a line end where one
    is near, else at a space, and only mid-word for a word longer than the limit. The
    pieces, joined with the whitespace they were broken at, give back the text."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    pieces: list[str] = []
    rest = text
    while len(rest) > limit:
        window = rest[: limit + 1]
        # The last line break past the window's first quarter, else the last space past
        # its half: pieces stay long, and a paragraph stays whole where it can.
        cut = window.rfind("\n", limit // 4)
        if cut <= 0:
            cut = window.rfind(" ", limit // 2)
        if cut <= 0:
            cut = limit
            pieces.append(rest[:cut])
            rest = rest[cut:]
            continue
        pieces.append(rest[:cut].rstrip())
        rest = rest[cut + 1 :]
    if rest or not pieces:
        pieces.append(rest)
    return pieces


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters at a word, with an ellipsis when cut."""
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit - 1)
    return text[: cut if cut > limit // 2 else limit - 1].rstrip() + "…"
