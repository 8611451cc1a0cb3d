"""Names: the one "did you mean" helper of camserve, for methods, layers, models and options."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

#: Longest name compared: a client's string is cut there, so a huge one cannot cost much.
_LONGEST = 200


def close_matches(
    word: str, candidates: Iterable[str], n: int = 3, cutoff: float = 0.6, fold_case: bool = False
) -> list[str]:
    """The candidates closest to ``word``, best first (``fold_case``: compared in lower case,
    returned as spelled)."""
    spelled = list(candidates)
    if not fold_case:
        return difflib.get_close_matches(word[:_LONGEST], spelled, n=n, cutoff=cutoff)
    by_lower = {c.lower(): c for c in spelled}
    found = difflib.get_close_matches(word[:_LONGEST].lower(), list(by_lower), n=n, cutoff=cutoff)
    return [by_lower[f] for f in found]


def did_you_mean(word: str, candidates: Iterable[str], fold_case: bool = False) -> str:
    """ " Did you mean X?" for the closest candidate, or "" when none is close."""
    found = close_matches(word, candidates, n=1, fold_case=fold_case)
    return f" Did you mean {found[0]}?" if found else ""
