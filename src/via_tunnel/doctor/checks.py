"""Doctor: the checks of the machine, in report order, and the small ones (cgroup2, the
kernel interfaces for a group's sockets and conntrack entries). The others live by concern:
the init, where groups live and net_cls (host.py), nftables (netfilter.py), rp_filter and
ip rules (routing.py), systemd-networkd (networkd.py), leftovers of crashed runs
(leftovers.py), the daemon's socket (daemon.py).

Every check is a function returning report lines (:class:`via_tunnel.doctor.check.Check`)
and changes nothing. The parts that decide (parsers, probe verdicts) are pure functions next
to the code that gathers their input, so they can be tested without root.
"""

from __future__ import annotations

from via_tunnel.doctor import daemon, host, leftovers, netfilter, networkd, routing
from via_tunnel.doctor.check import FAIL, NEEDS_ROOT, OK, WARN, Check, CheckFn, is_root


def machine_checks() -> list[tuple[str, CheckFn]]:
    """(name, function) of every machine check, in report order."""
    return [
        ("cgroup2", check_cgroup2),
        ("placement", host.check_placement),
        ("net_cls", host.check_netcls),
        ("nft-binding", netfilter.check_nft_binding),
        ("kernel", netfilter.check_kernel_features),
        ("rp_filter", routing.check_rp_filter),
        ("ip-rules", routing.check_ip_rules),
        ("nft-marks", netfilter.check_nft_marks),
        ("networkd", networkd.check_networkd),
        ("leftovers", leftovers.check_leftovers),
        ("daemon", daemon.check_daemon),
        ("flows", check_flows),
    ]


def check_flows() -> list[Check]:
    """The kernel interfaces a group's teardown and repair use, tried on doctor's own:
    sock_diag finds a throwaway socket of this process by its cgroup and destroys it (only
    that one; kernel/sockdiag.py), ctnetlink lists conntrack entries by mark
    (kernel/conntrack.py)."""
    if not is_root():
        return [Check("flows", WARN, "socket destroy and conntrack not checked (needs root)",
                      NEEDS_ROOT)]
    return [_sockets_verdict(), _conntrack_verdict()]


def _sockets_verdict() -> Check:
    import socket

    from via_tunnel.kernel import cgroup, sockdiag

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        try:
            mine = [s for s in sockdiag.sockets(cgroup.own_cgroup(cgroup.cgroup2_mount()),
                                                   descendants=False)
                    if s.proto == "udp" and s.local == "127.0.0.1" and s.port == port]
            destroyed = sockdiag.destroy_sockets(mine)
        except OSError as exc:
            return Check("flows:sockets", FAIL, f"sock_diag refused: {exc.strerror}",
                         _SOCK_DIAG_FIX)
    if not mine:
        return Check("flows:sockets", FAIL, "sock_diag does not find this process's socket "
                                            "by its cgroup", _SOCK_DIAG_FIX)
    if not destroyed:
        return Check("flows:sockets", FAIL, "sock_diag cannot destroy sockets", _SOCK_DIAG_FIX)
    return Check("flows:sockets", OK, "a group's sockets are found by cgroup and destroyed "
                                      "before teardown")


def _conntrack_verdict() -> Check:
    from via_tunnel.kernel import conntrack

    try:
        with conntrack.open_socket() as nl:
            conntrack.dump(nl, 0xFFFF_FFFF, 0xFFFF_FFFF)  # a mark nobody sets: lists nothing
    except OSError as exc:
        return Check("flows:conntrack", WARN,
                     f"ctnetlink refused: {exc.strerror}: flows that escaped masquerade while "
                     f"our nft table was gone keep the LAN address",
                     "a kernel with NF_CT_NETLINK and NF_CONNTRACK_MARK")
    return Check("flows:conntrack", OK, "conntrack entries are listed by mark (both families) "
                                        "and deleted in-process")


_SOCK_DIAG_FIX = ("a kernel with INET_DIAG, INET_UDP_DIAG, INET_DIAG_DESTROY and cgroup "
                  "filters (Linux 5.8); without it an exited program's orphaned TCP sockets "
                  "may retransmit by the LAN after teardown")


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
    hybrid = any(_foreign_v1_hierarchy(line) for line in lines)
    kind = "hybrid (v1 controllers beside it)" if hybrid else "pure v2"
    return Check("cgroup2", OK, f"cgroup2 mounted at {mount}, {kind}")


def _foreign_v1_hierarchy(line: str) -> bool:
    """A cgroup v1 mount that is not via-tunnel's own net_cls (source "via-tunnel", there
    while groups are): a pure-v2 host with a group running is still pure v2."""
    fs_type, _, rest = line.partition(" - ")[2].partition(" ")
    return fs_type == "cgroup" and rest.split(" ", 1)[0] != "via-tunnel"


def check_cgroup2() -> list[Check]:
    with open("/proc/self/mountinfo") as f:
        return [cgroup2_verdict(f.read().splitlines())]
