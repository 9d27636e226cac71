"""Text a tokenizer cannot encode: JSON may escape a lone UTF-16 surrogate ("\\ud800"), which
Python's JSON decoder turns into a str that no UTF-8 encoder accepts. Found here, with where it is,
so the client gets a 400 that says so instead of the tokenizer's internal error."""

from __future__ import annotations

import re
from typing import Any

# json.loads joins a valid surrogate pair into one code point: any surrogate left is lone
_SURROGATE = re.compile("[\ud800-\udfff]")


def find_lone_surrogate(value: Any, path: str = "") -> tuple[str, str] | None:
    """(dotted path, the surrogate) of the first string in a decoded JSON value that holds one."""
    if isinstance(value, str):
        match = _SURROGATE.search(value)
        return (path, match.group()) if match else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        where = f"{path}.{key}" if path else str(key)
        found = find_lone_surrogate(key, where) if isinstance(key, str) else None
        found = found or find_lone_surrogate(item, where)
        if found:
            return found
    return None


def check_unicode(value: Any) -> None:
    """ValueError naming the first lone surrogate in `value` (pydantic makes it a 400)."""
    found = find_lone_surrogate(value)
    if found:
        where, char = found
        raise ValueError(f"{where or 'the body'} holds a lone UTF-16 surrogate (U+{ord(char):04X}),"
                         " which is not a character; send valid Unicode text (a surrogate pair's"
                         " two halves together, e.g. \\ud83d\\ude00)")
