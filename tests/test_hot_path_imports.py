"""psutil stays off the launch path: nothing a launch may import (lazily or not) reaches
kernel/procs.py, the one module over psutil (its import alone costs ~30 ms, more than a warm
launch). Read from the source like test_layers.py, so a lazy import counts."""

from __future__ import annotations

from test_layers import GRAPH, MODULES, _imports


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        mod = todo.pop()
        if mod in seen or mod not in MODULES:
            continue
        seen.add(mod)
        todo.extend(GRAPH[mod])
    return seen


def test_no_launch_module_reaches_psutil() -> None:
    launch = [m for m in MODULES if m.startswith("via_tunnel.launch.")]
    reached = set().union(*(_reachable(m) for m in launch))
    assert "via_tunnel.kernel.procs" not in reached
    assert not [m for m in reached if "psutil" in _imports(MODULES[m])]
