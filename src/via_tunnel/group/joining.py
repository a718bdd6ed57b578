"""Who may join a running group: the rule that keeps one run from changing the routing of
the programs already in it, and the stricter one for the daemon's non-root callers, which
keeps one user's run from ever taking another user's routing (see core/policy.py).
"""

from __future__ import annotations

from via_tunnel.core.errors import ViaTunnelError
from via_tunnel.core.plan import IPv6Mode
from via_tunnel.group import adapters
from via_tunnel.group.state import GroupRecord

__all__ = ["check_compatible", "check_same"]


def check_compatible(rec: GroupRecord, *, gateway: str | None, ipv6: IPv6Mode = "auto",
                     dns: tuple[str, ...] = ()) -> None:
    """A run joining an existing group may not ask for other routing than it has: that
    would silently change the traffic of the programs already running in it."""
    from via_tunnel.core.plan import split_resolvers

    if gateway is not None and rec.gateway4 not in (None, gateway):
        raise ViaTunnelError(
            f"{rec.iface} is already in use with gateway {rec.gateway4}; "
            f"--gateway {gateway} would change the routing of running programs")
    if ipv6 != "auto" and rec.ipv6 != ipv6:
        have = "blocked" if rec.ipv6 == "block" else "through the tunnel"
        raise ViaTunnelError(
            f"{rec.iface} is already in use with IPv6 {have}; --ipv6 {ipv6} would change "
            f"the routing of running programs")
    if dns and split_resolvers(dns) != (rec.dns4, rec.dns6):
        have = ", ".join(a for a in (rec.dns4, rec.dns6) if a) or "no --dns"
        raise ViaTunnelError(
            f"{rec.iface} is already in use with {have}; a different --dns would change "
            f"the DNS of running programs")


def check_same(rec: GroupRecord, *, gateway: str | None, ipv6: IPv6Mode,
               dns: tuple[str, ...]) -> None:
    """Refuse to join ``rec`` unless it was created with exactly these options (the
    effective ones: the config's defaults filled in). A record of an older version, which
    did not record what was asked, is joined only when the group's routing is identical to
    what these options would make of the interface now."""
    asked = rec.asked()
    if asked is not None:
        differ = [name for name, have, want in zip(("gateway", "ipv6", "dns"), asked,
                                                   (gateway, ipv6, tuple(dns)), strict=True)
                  if have != want]
    else:
        differ = _differ_from_plan(rec, gateway=gateway, ipv6=ipv6, dns=dns)
    if differ:
        raise ViaTunnelError(
            f"{rec.iface} is in use with other routing options (started by root or another "
            f"user; {', '.join(differ)} differ from this run's); try again once its "
            f"programs have exited")


def _differ_from_plan(rec: GroupRecord, *, gateway: str | None, ipv6: IPv6Mode,
                      dns: tuple[str, ...]) -> list[str]:
    """What of ``rec``'s routing differs from what these options would make now (all of it
    when the interface cannot be read)."""
    from via_tunnel.core.plan import plan_group

    k = adapters.current()
    try:
        plan = plan_group(k.netlink.link_facts(rec.iface), slot=rec.slot, level=rec.level,
                          cgroup_nft_path=rec.cgroup_nft_path, gateway=gateway, ipv6=ipv6,
                          dns=dns or k.resolvers.link_resolvers(rec.iface))
    except ViaTunnelError:
        return ["gateway", "ipv6", "dns"]
    pairs = {"gateway": (plan.gateway4, rec.gateway4), "ipv6": (plan.ipv6, rec.ipv6),
             "dns": ((plan.dns4, plan.dns6), (rec.dns4, rec.dns6))}
    return [name for name, (want, have) in pairs.items() if want != have]
