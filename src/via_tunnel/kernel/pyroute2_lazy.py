"""Import the pieces of pyroute2 we use without running its package ``__init__``.

``pyroute2/__init__.py`` only re-exports every part of the library (IPDB, NDB, conntrack,
wireless, ipvs, plan9, ...); importing it costs ~75 ms, more than half of a cold launch.
The rtnetlink message classes we use (rtnl.py) cost a fraction. So we register the
package without executing its ``__init__``; should any code later ask the package itself for a name
(``from pyroute2 import X``), a module ``__getattr__`` runs the real ``__init__`` then, so
nothing breaks -- it is only paid for when used.
"""

from __future__ import annotations

import sys
from typing import Any


def register_package() -> None:
    """Make ``import pyroute2.X`` work without running ``pyroute2/__init__``."""
    if "pyroute2" in sys.modules:
        return
    import importlib
    import importlib.util

    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None:
        from via_tunnel.core.errors import ViaTunnelError

        raise ViaTunnelError(f"pyroute2 is not installed for {sys.executable} "
                             f"(use the via-tunnel installed by scripts/demo.sh)")
    pkg = importlib.util.module_from_spec(spec)
    state = {"loaded": False}

    def __getattr__(name: str) -> Any:  # PEP 562: only for names not yet defined
        if state["loaded"] or name.startswith("__"):
            raise AttributeError(name)
        # `from pyroute2 import config` asks the package first: a submodule is imported
        # as such, without the package's __init__.
        if importlib.util.find_spec(f"pyroute2.{name}") is not None:
            return importlib.import_module(f"pyroute2.{name}")
        state["loaded"] = True
        spec.loader.exec_module(pkg)  # type: ignore[union-attr]
        return getattr(pkg, name)

    pkg.__getattr__ = __getattr__  # type: ignore[method-assign]
    sys.modules["pyroute2"] = pkg
