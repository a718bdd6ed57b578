"""Doctor: routing. Strict rp_filter against the marks via-tunnel sets, and the host's ip
rules against via-tunnel's footprint (the judging is doctor/rules.py's, pure).
"""

from __future__ import annotations

from socket import AF_INET, AF_INET6

from via_tunnel.core.settings import Settings
from via_tunnel.doctor.check import FAIL, OK, WARN, Check

PROC_IPV4_CONF = "/proc/sys/net/ipv4/conf"


def read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def rp_filter_verdict(name: str, rp_filter: int, src_valid_mark: int, active: int,
                      where: str) -> Check:
    """Judge rp_filter (the effective value, the max of ``all`` and the interface's) and
    ``all.src_valid_mark`` with ``active`` groups running (pure)."""
    mode = {0: "off", 1: "strict", 2: "loose"}.get(rp_filter, str(rp_filter))
    found = f"rp_filter {mode} ({where}), src_valid_mark {src_valid_mark}"
    if rp_filter != 1:
        return Check(name, OK, f"{found}: replies through a tunnel are never filtered")
    if src_valid_mark == 1:
        return Check(name, OK, f"{found}: strict rp_filter takes the mark into account, and "
                               f"via-tunnel marks packets arriving on a group's interface")
    if active:
        return Check(name, FAIL,
                     f"{found} while {active} group(s) are active: strict rp_filter drops "
                     f"the replies arriving on their interfaces (someone reset the sysctl "
                     f"via-tunnel set)",
                     "sysctl -w net.ipv4.conf.all.src_valid_mark=1")
    return Check(name, OK, f"{found}: fine, via-tunnel sets src_valid_mark=1 when a group "
                           f"starts (and leaves it so, as wg-quick does) and marks packets "
                           f"arriving on the interface, so replies pass strict rp_filter")


def active_groups(settings: Settings) -> int:
    from via_tunnel.group import state

    return sum(1 for r in state.load_all(settings) if r.usable())


def check_rp_filter() -> list[Check]:
    rp = [read_int(f"{PROC_IPV4_CONF}/{c}/rp_filter") for c in ("all", "default")]
    svm = read_int(f"{PROC_IPV4_CONF}/all/src_valid_mark")
    if rp[0] is None or svm is None:
        return [Check("rp_filter", WARN, f"cannot read {PROC_IPV4_CONF} (no IPv4?)")]
    # An interface's effective value is max(all, its own); new ones start with default's.
    effective = max(rp[0], rp[1] or 0)
    return [rp_filter_verdict("rp_filter", effective, svm, active_groups(Settings.from_env()),
                              f"all {rp[0]}, default {rp[1]}")]


def dump_rules() -> list[object]:
    """Every ip rule of both families, as :class:`doctor_rules.IpRule`."""
    from via_tunnel.doctor.rules import IpRule
    from via_tunnel.kernel import netlink

    rules: list[object] = []
    with netlink.open_rtnl() as rt:
        for family in (AF_INET, AF_INET6):
            try:
                msgs = rt.rules_in_full(family)
            except Exception:  # IPv6 disabled: no v6 rules to judge
                if family == AF_INET:
                    raise
                continue
            for msg in msgs:
                attrs = {a[0]: a[1] for a in msg["attrs"]}
                rules.append(IpRule.from_netlink(family, msg, attrs))
    return rules


def check_ip_rules() -> list[Check]:
    from via_tunnel.doctor.rules import classify

    return classify(dump_rules())  # type: ignore[arg-type]
