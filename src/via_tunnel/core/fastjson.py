"""JSON for the launch hot path, without importing :mod:`json`.

``import json`` costs ~10 ms (it pulls in ``re`` and ``enum``), as much as the rest of a warm
launch, which only reads one group record and, through the daemon, sends one small request
and reads one answer. This module drives the C scanner and string encoder of ``_json`` (the
same code :func:`json.loads` uses) directly.

Contract: :func:`loads` accepts exactly what ``json.loads(text)`` accepts (strict: no control
characters in strings; NaN and Infinity refused) and returns the same values; :func:`dumps`
writes what ``json.dumps(obj)`` would for dicts with string keys, lists, tuples, strings,
ints, finite floats, booleans and None (ASCII only, the default separators).
tests/test_fastjson.py holds both against :mod:`json`.
"""

from __future__ import annotations

import _json
import math


class _Context:
    """What the C scanner reads from a ``json.JSONDecoder``."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> float:
        raise ValueError(f"{name} is not valid JSON")


_scan = _json.make_scanner(_Context())  # type: ignore[arg-type]  # duck-typed context
_WHITESPACE = " \t\n\r"


def loads(text: str | bytes) -> object:
    """Parse one JSON document; ValueError when it is not one."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
    except StopIteration as exc:
        raise ValueError(f"not JSON at character {exc.value}") from None
    if text[end:].strip(_WHITESPACE):
        raise ValueError(f"extra data after JSON at character {end}")
    return value


def dumps(obj: object) -> str:
    """Write ``obj`` as ``json.dumps`` would (see the module docstring for the types)."""
    if obj is None:
        return "null"
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if isinstance(obj, str):
        return _json.encode_basestring_ascii(obj)
    if isinstance(obj, int):
        return int.__repr__(obj)
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError("out of range float values are not JSON compliant")
        return float.__repr__(obj)
    if isinstance(obj, list | tuple):
        return "[" + ", ".join(dumps(v) for v in obj) + "]"
    if isinstance(obj, dict):
        items = []
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"keys must be str, not {type(key).__name__}")
            items.append(f"{_json.encode_basestring_ascii(key)}: {dumps(value)}")
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")
