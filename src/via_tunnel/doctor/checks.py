"""Doctor: the checks of the machine, in report order, and the small ones (cgroup2, the
programs via-tunnel runs). The others live by concern: nftables (netfilter.py), rp_filter
and ip rules (routing.py), systemd-networkd (networkd.py), leftovers of crashed runs
(leftovers.py), the daemon's socket (daemon.py).

Every check is a function returning report lines (:class:`via_tunnel.doctor.check.Check`)
and changes nothing. The parts that decide (parsers, probe verdicts) are pure functions next
to the code that gathers their input, so they can be tested without root.
"""

from __future__ import annotations

import shutil

from via_tunnel.doctor import daemon, leftovers, netfilter, networkd, routing
from via_tunnel.doctor.check import FAIL, OK, WARN, Check, CheckFn


def machine_checks() -> list[tuple[str, CheckFn]]:
    """(name, function) of every machine check, in report order."""
    return [
        ("cgroup2", check_cgroup2),
        ("nft-binding", netfilter.check_nft_binding),
        ("kernel", netfilter.check_kernel_features),
        ("rp_filter", routing.check_rp_filter),
        ("ip-rules", routing.check_ip_rules),
        ("nft-marks", netfilter.check_nft_marks),
        ("networkd", networkd.check_networkd),
        ("leftovers", leftovers.check_leftovers),
        ("daemon", daemon.check_daemon),
        ("tools", check_tools),
    ]


# Programs via-tunnel runs, and what goes missing without them.
TOOLS = (
    ("ss", "iproute2", "a group's leftover sockets are not destroyed before teardown (their "
                       "last packets could leave by the LAN)"),
    ("conntrack", "conntrack", "after our nft table was flushed, flows that escaped "
                               "masquerade keep the LAN address until they end"),
)


def check_tools(path: str | None = None) -> list[Check]:
    """The programs via-tunnel runs are on PATH (``path`` overrides it, for tests)."""
    out = []
    for program, package, without in TOOLS:
        if shutil.which(program, path=path) is None:
            out.append(Check(f"tool-{program}", WARN, f"{program} not found: {without}",
                             f"apt install {package}"))
        else:
            out.append(Check(f"tool-{program}", OK, f"{program} found"))
    return out


def cgroup2_verdict(lines: list[str]) -> Check:
    """Judge the cgroup2 mount from mountinfo lines (pure)."""
    from via_tunnel.core.errors import ViaTunnelError
    from via_tunnel.kernel import cgroup

    try:
        mount = cgroup.parse_cgroup2_mount(lines)
    except ViaTunnelError as exc:
        return Check("cgroup2", FAIL, exc.message,
                     "mount it: mount -t cgroup2 none /sys/fs/cgroup (or /sys/fs/cgroup/unified "
                     "beside v1 controllers)")
    try:
        cgroup.nft_path(mount)
    except ViaTunnelError as exc:
        return Check("cgroup2", FAIL, exc.message,
                     "mount cgroup2 at /sys/fs/cgroup or /sys/fs/cgroup/unified")
    hybrid = any(line.partition(" - ")[2].split(" ", 1)[0] == "cgroup" for line in lines)
    kind = "hybrid (v1 controllers beside it)" if hybrid else "pure v2"
    return Check("cgroup2", OK, f"cgroup2 mounted at {mount}, {kind}")


def check_cgroup2() -> list[Check]:
    with open("/proc/self/mountinfo") as f:
        return [cgroup2_verdict(f.read().splitlines())]
