"""pyroute2 is used by its internals (the doctor decodes ip rules with its message classes,
skipping its package ``__init__``: pyroute2_lazy.py; the tests pin rtnl.py's and rtmsg.py's
wire format to it): the installed version must be in the range pyproject.toml pins, and
what we rely on must still be there and behave."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def test_the_installed_pyroute2_is_in_the_pinned_range() -> None:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    spec = next(d for d in deps if d.startswith("pyroute2"))
    bounds = dict(re.findall(r"(>=|<)\s*([\d.]+)", spec))
    assert set(bounds) == {">=", "<"}, f"pyroute2 must be pinned to a tested range: {spec}"
    installed = _version(metadata.version("pyroute2"))
    assert _version(bounds[">="]) <= installed < _version(bounds["<"]), (spec, installed)


def test_rtnl_needs_no_pyroute2_and_the_doctors_decoder_skips_its_init() -> None:
    code = (
        "import sys\n"
        "from via_tunnel.kernel import rtnl\n"
        "assert not [m for m in sys.modules if m.startswith('pyroute2')], 'rtnl imports it'\n"
        "from via_tunnel.kernel.pyroute2_lazy import register_package\n"
        "register_package()\n"
        "from pyroute2.netlink.rtnl.fibmsg import fibmsg\n"
        "assert 'pyroute2.iproute' not in sys.modules, 'the package __init__ ran'\n"
        "from via_tunnel.kernel.nlmsg import message\n"
        "p = rtnl.rule_payload(2, 5100, 0x81000000, 0xff000000, 0x76740001, \"lookup\", 0,"
        " False)\n"
        "d = fibmsg(message(rtnl.RTM_NEWRULE, 1, 1, p))\n"
        "d.decode()\n"
        "print(d.get_attr('FRA_TABLE'), d.get_attr('FRA_PRIORITY'), d['action'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(0x76740001), "5100", "1"]
