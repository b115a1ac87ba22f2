"""Wording shared by messages: a count with its noun in the right number ("1 rank", "2 ranks")."""


def counted(count, noun, plural=None):
    """``counted(1, "rank")`` -> "1 rank"; ``counted(4, "rank")`` -> "4 ranks"; ``plural``
    names an irregular plural."""
    return f"{count} {noun if count == 1 else (plural or noun + 's')}"
