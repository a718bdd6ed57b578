"""``via-tunnel demo``: build a throwaway lab and show what via-tunnel does, with proof.

The lab (:mod:`via_tunnel.lab.netlab`) is three network namespaces; nothing outside them is touched.
via-tunnel runs inside the client namespace with its own state directory and cgroup subtree,
so a real install's groups are neither seen nor disturbed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from via_tunnel.lab.footprint import remove_footprint
from via_tunnel.lab.namespaces import netns_names, remove
from via_tunnel.lab.netlab import Lab
from via_tunnel.lab.procs import LabError

DEMO_PREFIX = "vtdemo"
REMOVE_HINT = "python3 -m via_tunnel.lab.demo --remove"
EXIT_OK = 0
EXIT_FAILED = 125
SETTLE_SECONDS = 5.0


class DemoError(Exception):
    """A step of the demo did not show what it should (one line for the user)."""


def demo_env(prefix: str) -> dict[str, str]:
    """Environment for via-tunnel in the demo lab: its own state dir and cgroup subtree, and
    PYTHONPATH so that the child runs this very copy of the package."""
    package_parent = str(Path(__file__).resolve().parents[2])
    return {
        "VIA_TUNNEL_STATE_DIR": f"/run/via-tunnel-demo-{prefix}",
        "VIA_TUNNEL_CGROUP": f"via-tunnel-demo-{prefix}",
        "PYTHONPATH": os.pathsep.join(
            p for p in (package_parent, os.environ.get("PYTHONPATH")) if p
        ),
    }


def run_demo(keep: bool = False) -> int:
    """Build the lab, fetch the echo server's view of the client without via-tunnel (the LAN
    address), through vlan3 and through tun0 (the tunnel addresses), check that via-tunnel
    left no ip rule, route or nftables table behind, and remove the lab unless ``keep``.

    Returns 0 when every step showed what it should, 125 (with one line on stderr) otherwise.
    """
    if os.geteuid() != 0:
        return _fail("the demo needs root (it creates network namespaces)")
    lab = Lab(DEMO_PREFIX, openvpn=True)
    env = demo_env(lab.prefix)
    if any(ns in netns_names() for ns in lab.namespaces):
        print(f"Removing a demo lab left up earlier: {' '.join(remove_demo())}")
    print(f"Building a lab of three network namespaces ({', '.join(lab.namespaces)}) ...")
    try:
        lab.up()
    except LabError as exc:
        if any(ns in netns_names() for ns in lab.namespaces):
            return _fail(f"{exc} (a demo lab left up? remove it with `{REMOVE_HINT}`)")
        return _fail(str(exc))
    try:
        _explain(lab)
        _show_runs(lab, env)
    except (DemoError, LabError) as exc:
        _cleanup(lab, env, keep=False)
        return _fail(str(exc))
    except KeyboardInterrupt:
        _cleanup(lab, env, keep=False)
        return 130
    except BaseException:  # a broken pipe, a bug: never leave the lab behind
        _cleanup(lab, env, keep=False)
        raise
    _cleanup(lab, env, keep=keep)
    return EXIT_OK


def remove_demo() -> list[str]:
    """Remove a demo lab left up by ``run_demo(keep=True)`` (and its via-tunnel state).
    Returns the namespaces removed (empty when there was none)."""
    removed = remove(DEMO_PREFIX)
    env = demo_env(DEMO_PREFIX)
    remove_footprint(env["VIA_TUNNEL_STATE_DIR"], env["VIA_TUNNEL_CGROUP"])
    return removed


def _explain(lab: Lab) -> None:
    print(f"""\
Lab up in {lab.up_seconds:.2f}s.
  client {lab.client}: eth0 {Lab.CLIENT_LAN} is the LAN with the default route;
    vlan3 {Lab.CLIENT_VETH} is a link to the gateway (a VPS), tun0 {Lab.CLIENT_TUN} is an
    OpenVPN tunnel to it. Neither carries a default route.
  gateway {lab.gateway}: forwards, no NAT: the far end sees whose packet it is.
  internet {lab.inet}: the server {Lab.SERVER} answers with the source address it sees.
""")


def _fetch(lab: Lab, env: dict[str, str], iface: str | None) -> str:
    fetch = lab.fetch_argv()
    via = [sys.executable, "-m", "via_tunnel", iface, "--"] if iface else []
    argv = [*via, *fetch]
    proc = lab.run(lab.client, argv, env=env, check=False, timeout=30)
    if proc.returncode != 0:
        message = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise DemoError(f"{f'via-tunnel {iface}' if iface else 'curl'} failed: {message}")
    return proc.stdout.strip()


def _show_runs(lab: Lab, env: dict[str, str]) -> None:
    before = lab.snapshot(lab.client)
    fetch = " ".join(lab.fetch_argv())
    steps = [
        (None, Lab.CLIENT_LAN, f"{fetch}"),
        ("vlan3", Lab.CLIENT_VETH, f"via-tunnel vlan3 -- {fetch}"),
        ("tun0", Lab.CLIENT_TUN, f"via-tunnel tun0 -- {fetch}"),
    ]
    for iface, expected, shown in steps:
        print(f"$ {shown}")
        answer = _fetch(lab, env, iface)
        verdict = "as expected" if answer == expected else f"WRONG: expected {expected}"
        print(f"  the server saw {answer or '(nothing)'}  ({verdict})")
        if answer != expected:
            raise DemoError(
                f"through {iface or 'the LAN'} the server saw {answer!r}, not {expected}"
            )
    # The last member's exit hands the teardown to via-tunnel's watcher: give it a moment.
    deadline = time.monotonic() + SETTLE_SECONDS
    after = lab.snapshot(lab.client)
    while _differences(before, after) and time.monotonic() < deadline:
        time.sleep(0.05)
        after = lab.snapshot(lab.client)
    rules = (
        sum(len(before["rules"][f]) for f in ("4", "6")),
        sum(len(after["rules"][f]) for f in ("4", "6")),
    )
    print(f"\nip rules in the client (v4+v6): {rules[0]} before, {rules[1]} after.")
    changed = _differences(before, after)
    if changed:
        raise DemoError(f"via-tunnel left changes behind in the client: {', '.join(changed)}")
    print("Routes and nftables are as they were too: nothing is left behind.")


def _differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return [key for key in ("rules", "routes", "nft") if before[key] != after[key]]


def _cleanup(lab: Lab, env: dict[str, str], *, keep: bool) -> None:
    if keep:
        print(f"""
The lab is left up. Try it:
  nsenter --net={lab.ns_path(lab.client)} {_shell_hint(env)}
Remove it with: {REMOVE_HINT}""")
        return
    lab.down()
    remove_footprint(env["VIA_TUNNEL_STATE_DIR"], env["VIA_TUNNEL_CGROUP"])
    print("Lab removed.")


def _shell_hint(env: dict[str, str]) -> str:
    return (
        f"env VIA_TUNNEL_STATE_DIR={env['VIA_TUNNEL_STATE_DIR']} "
        f"VIA_TUNNEL_CGROUP={env['VIA_TUNNEL_CGROUP']} $SHELL"
    )


def _fail(message: str) -> int:
    print(f"via-tunnel demo: {message}", file=sys.stderr)
    return EXIT_FAILED


def main(argv: list[str]) -> int:
    """``python -m via_tunnel.lab.demo [--keep | --remove]``."""
    if "--remove" in argv:
        removed = remove_demo()
        print(f"removed {' '.join(removed)}" if removed else "no demo lab is up")
        return EXIT_OK
    return run_demo(keep="--keep" in argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
