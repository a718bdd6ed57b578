"""Doctor: can a group use this interface? Exists, up, addresses, next hop, MTU, rp_filter.

The facts come from :func:`via_tunnel.kernel.netlink.link_facts`, the same as a launch uses, and
the verdicts mirror what :func:`via_tunnel.core.plan.plan_group` would refuse, so doctor and a
launch never disagree about an interface.
"""

from __future__ import annotations

from via_tunnel.core.plan import LinkFacts
from via_tunnel.doctor.check import FAIL, OK, WARN, Check

MIN_MTU_V6 = 1280


def facts_verdicts(facts: LinkFacts) -> list[Check]:
    """Judge an interface's facts (pure)."""
    name, mtu = facts.name, facts.mtu
    out: list[Check] = []
    if facts.up:
        out.append(Check("iface:up", OK, f"{name} exists (index {facts.index}) and is up"))
    else:
        out.append(Check("iface:up", FAIL, f"{name} is down (or has no carrier): a launch on it "
                                           f"exits 125, a group on it drops its traffic",
                         f"bring it up (ip link set {name} up, or start the VPN)"))
    if facts.ipv4:
        out.append(Check("iface:ipv4", OK, f"{name} has {', '.join(facts.ipv4)}"))
    else:
        out.append(Check("iface:ipv4", FAIL, f"{name} has no IPv4 address: via-tunnel cannot "
                                             f"route a group through it",
                         f"give it an address (or wait for the VPN to configure {name})"))
    if facts.ipv6_global:
        v6 = f"{name} has {', '.join(facts.ipv6_global)}"
        if facts.pointopoint or facts.gateway6:
            out.append(Check("iface:ipv6", OK, f"{v6}: a group's IPv6 goes through it"))
        else:
            out.append(Check("iface:ipv6", OK, f"{v6} but no IPv6 next hop: a group's IPv6 is "
                                               f"refused (clients fall back to IPv4)"))
    else:
        out.append(Check("iface:ipv6", OK, f"{name} has no global IPv6 address: a group's IPv6 "
                                           f"is refused at once (clients fall back to IPv4)"))
    if facts.pointopoint:
        out.append(Check("iface:nexthop", OK, f"{name} is point-to-point: no next hop needed"))
    elif facts.gateway4:
        out.append(Check("iface:nexthop", OK, f"next hop {facts.gateway4} (from a main-table "
                                              f"route through {name})"))
    elif facts.peer4:
        out.append(Check("iface:nexthop", OK, f"next hop {facts.peer4} (the peer of {name}'s "
                                              f"address)"))
    else:
        out.append(Check("iface:nexthop", WARN,
                         f"{name} is a broadcast interface, has no address with a peer and "
                         f"the main table has no route with a next hop through it: a plain "
                         f"launch exits 125",
                         f"pass --gateway ADDR (or set gateway in [interface.{name}] of "
                         f"the config)"))
    if mtu is None:
        out.append(Check("iface:mtu", WARN, f"cannot read the MTU of {name}"))
    elif mtu < MIN_MTU_V6:
        out.append(Check("iface:mtu", WARN, f"MTU {mtu}: below {MIN_MTU_V6}, IPv6 cannot use "
                                            f"it (TCP MSS is clamped to the route MTU)",
                         f"raise it if the path allows (ip link set {name} mtu {MIN_MTU_V6})"))
    else:
        out.append(Check("iface:mtu", OK, f"MTU {mtu} (a group's TCP MSS is clamped to the "
                                          f"route MTU)"))
    return out


def checks(name: str) -> list[Check]:
    from via_tunnel.core.errors import ViaTunnelError
    from via_tunnel.core.names import validate_ifname
    from via_tunnel.doctor import routing
    from via_tunnel.kernel import netlink

    try:
        validate_ifname(name)
        facts = netlink.link_facts(name)
    except ViaTunnelError as exc:
        return [Check("iface:up", FAIL, exc.message,
                      "check the name (ip link) or start what creates the interface")]
    out = facts_verdicts(facts)
    conf = routing.PROC_IPV4_CONF
    rp_all = routing.read_int(f"{conf}/all/rp_filter")
    rp_if = routing.read_int(f"{conf}/{name}/rp_filter")
    svm = routing.read_int(f"{conf}/all/src_valid_mark")
    if rp_all is not None and rp_if is not None and svm is not None:
        from via_tunnel.core.settings import Settings

        out.append(routing.rp_filter_verdict(
            "iface:rp_filter", max(rp_all, rp_if), svm,
            routing.active_groups(Settings.from_env()), f"{rp_if} on {name}, all {rp_all}"))
    return out
