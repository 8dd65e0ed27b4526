"""Text clean-up shared by the tasks that generate text."""

from __future__ import annotations

# "a polar polar bear" can be right; three in a row never is in a short generated text.
MIN_REPEATS = 3
_EDGE_PUNCTUATION = ".,;:!?-–—\"'()[]"


def collapse_repetition(text: str) -> tuple[str, bool]:
    """Cut runs of ``MIN_REPEATS``+ repeated words or phrases back to one; say if any were found.

    A loop cut off by the token limit ends in a partial repeat ("on the beach on the beach
    on the beach on the"); that tail goes too.
    """
    words = text.split()
    found = False
    while True:
        words, changed = _collapse_once(words)
        if not changed:
            return " ".join(words), found
        found = True


def _collapse_once(words: list[str]) -> tuple[list[str], bool]:
    keys = [word.casefold().strip(_EDGE_PUNCTUATION) for word in words]
    kept: list[str] = []
    changed = False
    i = 0
    while i < len(words):
        for n in range(1, (len(words) - i) // MIN_REPEATS + 1):
            gram = keys[i : i + n]
            repeats = 1
            while keys[i + repeats * n : i + (repeats + 1) * n] == gram:
                repeats += 1
            if repeats >= MIN_REPEATS:
                kept.extend(words[i : i + n])
                end = i + repeats * n
                tail = len(words) - end
                if 0 < tail < n and keys[end:] == gram[:tail]:
                    end = len(words)
                i = end
                changed = True
                break
        else:
            kept.append(words[i])
            i += 1
    return kept, changed
