"""core/fastjson.py against the json module: the same values in, the same text out."""

from __future__ import annotations

import json
import random

import pytest

from via_tunnel.core import fastjson

DOCUMENTS = [
    '{"iface": "vlan3", "slot": 3, "mark": 2197815296, "ready": true, "dns4": null,'
    ' "created": 1765065600.123456, "saved_sysctls": {"/proc/sys/x": "1"}}',
    '  [1, -2.5e-3, "a\\u00e9\\n\\"q\\"", [], {}, false]  ',
    '"\\ud83d\\ude00"', "0", "-0.0", "1e400", '{"a": {"b": [null]}}',
    '{"iface": "q\\"t;1", "x": "\\u202e"}',
]
BAD = ["", "{", '{"a": 1,}', "NaN", "Infinity", '"\x01"', "[1] 2", "{'a': 1}", "01"]


@pytest.mark.parametrize("text", DOCUMENTS)
def test_loads_returns_what_json_returns(text: str) -> None:
    assert fastjson.loads(text) == json.loads(text)
    assert fastjson.loads(text.encode()) == json.loads(text)


@pytest.mark.parametrize("text", BAD)
def test_loads_refuses_what_json_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    with pytest.raises(ValueError):
        fastjson.loads(text)


def test_dumps_writes_what_json_writes() -> None:
    rng = random.Random(7)

    def text() -> str:
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0, 0x2FFF)]))
                       for _ in range(rng.randrange(6)))

    def value(depth: int) -> object:
        kinds = [lambda: None, lambda: True, lambda: False,
                 lambda: rng.randint(-2**40, 2**40), lambda: rng.uniform(-1e6, 1e6), text,
                 lambda: [value(depth + 1) for _ in range(rng.randrange(4))],
                 lambda: {text(): value(depth + 1) for _ in range(rng.randrange(4))}]
        return kinds[rng.randrange(8 if depth < 3 else 6)]()

    for _ in range(500):
        obj = value(0)
        assert fastjson.dumps(obj) == json.dumps(obj)
    assert fastjson.dumps(("a", 1)) == json.dumps(("a", 1))
    with pytest.raises(ValueError):
        fastjson.dumps(float("nan"))
    with pytest.raises(TypeError):
        fastjson.dumps({1: 2})
    with pytest.raises(TypeError):
        fastjson.dumps(object())
