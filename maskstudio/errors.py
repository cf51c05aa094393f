"""The two error types and the validation helpers everything else raises through (lowest layer).

SpecError: an invalid spec; `path` names the JSON field (e.g. `mask.rules[2].k`), str() is one line.
RunError: a run that cannot go ahead; str() is one line naming the fix, `.spec` keeps the input spec.
"""
from __future__ import annotations

import difflib


class SpecError(ValueError):
    """An invalid spec: `path` is the JSON path (e.g. `mask.rules[2].k`), str() is one line."""

    def __init__(self, path: str, message: str):
        self.path, self.message = path, message
        super().__init__(f"{path}: {message}" if path else message)


class RunError(ValueError):
    """A run that cannot go ahead; str() is one line naming the fix. `.spec` keeps the input spec."""

    def __init__(self, message: str, spec=None):
        super().__init__(message)
        self.spec = spec


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def require(cond: bool, path: str, message: str) -> None:
    if not cond:
        raise SpecError(path, message)


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_keys(d: dict, allowed, path: str, extra=()) -> None:
    for key in d:
        if key not in allowed and key not in extra:
            raise SpecError(f"{path}.{key}" if path else key,
                            f"unknown key{did_you_mean(key, list(allowed) + list(extra))}; "
                            f"allowed: {', '.join(allowed)}")
