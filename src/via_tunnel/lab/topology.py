"""The lab's topology: its addresses and the ``ip`` commands that wire it. Pure data.

Topology (``P`` is the lab's prefix; every namespace name starts with it)::

    P-c (client)                  P-i (internet)                  P-g (gateway, the VPS)
    eth0  192.0.2.2/28      ----  lan0 192.0.2.1/28
          2001:db8:1::2/64        lan0 2001:db8:1::1/64
                                  wan0 203.0.113.1/28       ----  wan0  203.0.113.2/28
                                  lo   198.51.100.10/32
                                       2001:db8:ff::10/128
    vlan3 192.0.2.34/28     ----------------------------------->  vlan3 192.0.2.33/28
    tun0  192.0.2.50 peer .49  (OpenVPN static key, UDP 192.0.2.2 <-> 203.0.113.2:1194)  tun0
    vnohop 192.0.2.82/28    ----------------------------------->  nohop0 192.0.2.81/28
    eth1dead 192.0.2.66/28 (DOWN) ----------------------------->  dead0  (down)

* The client's main table: connected routes, ``default via 192.0.2.1 dev eth0`` (v4 and v6)
  and ``198.51.100.128/25 via 192.0.2.33 dev vlan3`` (so a next hop via vlan3 can be found in
  the main table). No default via vlan3, and no route via tun0 except the kernel's own host
  route to the tunnel peer.
* ``vnohop`` is a working broadcast link to the gateway with only its connected route: no next
  hop can be found for it, so via-tunnel needs ``--gateway 192.0.2.81`` there (the internet
  routes 192.0.2.80/28 back through the gateway, so that works). ``eth1dead`` is down.
* The gateway forwards and does no NAT, so the server sees the client's tunnel addresses.
* The internet namespace routes 192.0.2.32/28 and 192.0.2.48/28 back through the gateway and
  runs the echo server: HTTP on TCP port 80 and an echo on UDP port 7, on 198.51.100.10 and
  2001:db8:ff::10, each answering with the caller's source address and a newline.
* The client's ``rp_filter`` is strict (1) by default, the hardest case for replies that come
  back through a tunnel; the gateway and the internet namespace do not filter.

:class:`Addresses` holds the addresses and ports (``Lab.SERVER`` and so on: the lab
inherits them); :func:`sysctls` and :func:`ip_batches` return what
:meth:`via_tunnel.lab.netlab.Lab.up` applies, in order.
"""

from __future__ import annotations

import via_tunnel.lab.programs as programs


class Addresses:
    """The lab's fixed addresses and the echo server's ports."""

    SERVER = "198.51.100.10"
    SERVER6 = "2001:db8:ff::10"
    CLIENT_LAN = "192.0.2.2"
    CLIENT_LAN6 = "2001:db8:1::2"
    LAN_GW = "192.0.2.1"
    LAN_GW6 = "2001:db8:1::1"
    CLIENT_VETH = "192.0.2.34"
    GW_VETH = "192.0.2.33"
    CLIENT_TUN = "192.0.2.50"
    GW_TUN = "192.0.2.49"
    GW_WAN = "203.0.113.2"
    INET_WAN = "203.0.113.1"
    VETH_ROUTE = "198.51.100.128/25"  # in the client's main table, via GW_VETH dev vlan3
    # IPv6 exists on vlan3 (not on tun0): a tunnel with v6 and one without, side by side.
    CLIENT_VETH6 = "2001:db8:3::34"
    GW_VETH6 = "2001:db8:3::33"
    GW_WAN6 = "2001:db8:2::2"
    INET_WAN6 = "2001:db8:2::1"
    VETH_ROUTE6 = "2001:db8:fe::/64"  # in the client's main table, via GW_VETH6 dev vlan3
    CLIENT_NOHOP = "192.0.2.82"  # vnohop: no route via it, the gateway is GW_NOHOP
    GW_NOHOP = "192.0.2.81"
    CLIENT_DEAD = "192.0.2.66"  # eth1dead: administratively down
    HTTP_PORT = programs.HTTP_PORT
    UDP_PORT = programs.UDP_PORT


_NO_DAD = {"net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0"}


def sysctls(client: str, gateway: str, inet: str, rp_filter: int) -> dict[str, dict[str, str]]:
    """Per namespace, the sysctls to set before any interface exists (interfaces created
    afterwards inherit ``conf.default``): the client filters by ``rp_filter``; the gateway
    and the internet forward and do not filter."""
    rp = str(rp_filter)
    client_values = {"net.ipv4.conf.all.rp_filter": rp, "net.ipv4.conf.default.rp_filter": rp,
                     **_NO_DAD}
    router = {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1",
              "net.ipv4.conf.all.rp_filter": "0", "net.ipv4.conf.default.rp_filter": "0",
              **_NO_DAD}
    return {client: client_values, gateway: dict(router), inet: dict(router)}


def ip_batches(c: str, g: str, i: str) -> list[tuple[str | None, list[str]]]:
    """``(namespace, ip batch lines)`` in order: the veth pairs (made from the host, None),
    then each namespace's links, addresses and routes. ``c``, ``g``, ``i``: the client,
    gateway and internet namespaces."""
    a = Addresses
    return [
        (None, [
            f"link add eth0 netns {c} type veth peer name lan0 netns {i}",
            f"link add vlan3 netns {c} type veth peer name vlan3 netns {g}",
            f"link add wan0 netns {g} type veth peer name wan0 netns {i}",
            f"link add vnohop netns {c} type veth peer name nohop0 netns {g}",
            f"link add eth1dead netns {c} type veth peer name dead0 netns {g}",
        ]),
        (c, [
            "link set lo up", "link set eth0 up", "link set vlan3 up",
            f"addr add {a.CLIENT_LAN}/28 dev eth0",
            f"addr add {a.CLIENT_LAN6}/64 dev eth0 nodad",
            f"addr add {a.CLIENT_VETH}/28 dev vlan3",
            "link set vnohop up",
            f"addr add {a.CLIENT_NOHOP}/28 dev vnohop",
            f"addr add {a.CLIENT_DEAD}/28 dev eth1dead",
            f"route add default via {a.LAN_GW} dev eth0",
            f"route add default via {a.LAN_GW6} dev eth0",
            f"route add {a.VETH_ROUTE} via {a.GW_VETH} dev vlan3",
            f"addr add {a.CLIENT_VETH6}/64 dev vlan3 nodad",
            f"route add {a.VETH_ROUTE6} via {a.GW_VETH6} dev vlan3",
        ]),
        (g, [
            "link set lo up", "link set vlan3 up", "link set wan0 up",
            f"addr add {a.GW_VETH}/28 dev vlan3",
            "link set nohop0 up",
            f"addr add {a.GW_NOHOP}/28 dev nohop0",
            f"addr add {a.GW_WAN}/28 dev wan0",
            f"route add default via {a.INET_WAN} dev wan0",
            f"addr add {a.GW_VETH6}/64 dev vlan3 nodad",
            f"addr add {a.GW_WAN6}/64 dev wan0 nodad",
            f"route add default via {a.INET_WAN6} dev wan0",
        ]),
        (i, [
            "link set lo up", "link set lan0 up", "link set wan0 up",
            f"addr add {a.SERVER}/32 dev lo",
            f"addr add {a.SERVER6}/128 dev lo nodad",
            f"addr add {a.LAN_GW}/28 dev lan0",
            f"addr add {a.LAN_GW6}/64 dev lan0 nodad",
            f"addr add {a.INET_WAN}/28 dev wan0",
            f"route add 192.0.2.32/28 via {a.GW_WAN} dev wan0",
            f"route add 192.0.2.48/28 via {a.GW_WAN} dev wan0",
            f"route add 192.0.2.80/28 via {a.GW_WAN} dev wan0",
            f"addr add {a.INET_WAN6}/64 dev wan0 nodad",
            f"route add 2001:db8:3::/64 via {a.GW_WAN6} dev wan0",
        ]),
    ]  # fmt: skip
