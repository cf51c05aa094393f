"""The two error types and the validation helpers everything else raises through (lowest layer).

SpecError: an invalid spec; `path` names the JSON field (e.g. `mask.rules[2].k`), str() is one line.
RunError: a run that cannot go ahead; str() is one line naming the fix, `.spec` keeps the input spec.
"""
from __future__ import annotations

import difflib
import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """`text` with control characters (newlines, ANSI escapes, NUL) written as escapes, so a
    message built from user data stays one line and cannot drive a terminal."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


class SpecError(ValueError):
    """An invalid spec: `path` is the JSON path (e.g. `mask.rules[2].k`), str() is one line."""

    def __init__(self, path: str, message: str):
        self.path, self.message = one_line(path), one_line(message)
        super().__init__(f"{self.path}: {self.message}" if path else self.message)


class RunError(ValueError):
    """A run that cannot go ahead; str() is one line naming the fix. `.spec` keeps the input spec."""

    def __init__(self, message: str, spec=None):
        super().__init__(one_line(message))
        self.spec = spec


def did_you_mean(word, choices) -> str:
    choices = [c for c in choices if isinstance(c, str)]
    if not isinstance(word, str) or len(word) > 200 or len(choices) > 5000:
        return ""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def require(cond: bool, path: str, message: str) -> None:
    if not cond:
        raise SpecError(path, message)


def is_int(x) -> bool:
    """An integer (not a bool) small enough for int64 arithmetic on token indices."""
    return isinstance(x, int) and not isinstance(x, bool) and -MAX_INT <= x <= MAX_INT


MAX_INT = (1 << 31) - 1  # every integer in a spec fits here (token counts, sizes, offsets, ids)


def check_keys(d: dict, allowed, path: str, extra=()) -> None:
    for key in d:
        if key not in allowed and key not in extra:
            raise SpecError(f"{path}.{key}" if path else key,
                            f"unknown key{did_you_mean(key, list(allowed) + list(extra))}; "
                            f"allowed: {', '.join(allowed)}")
