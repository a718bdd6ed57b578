"""Doctor: nftables. The binding and libnftables work, the kernel accepts what via-tunnel
sends (probed without committing anything), and no other table sets our mark bit.
"""

from __future__ import annotations

import os

from via_tunnel.core.settings import Settings
from via_tunnel.doctor.check import FAIL, NEEDS_ROOT, OK, WARN, Check, is_root

BINDING_FIX = ("apt install python3-nftables (the binding of the installed libnftables; a "
               "venv needs --system-site-packages; PyPI look-alikes and builds of another "
               "nftables version do not match)")


def check_nft_binding() -> list[Check]:
    """``import nftables`` works, the binding loads the installed libnftables, and that
    library can talk to the kernel (``list tables``), through the contexts via-tunnel
    itself uses (kernel/nft.py)."""
    import sys

    from via_tunnel.kernel import nft

    try:
        import nftables  # type: ignore[import-not-found]
    except ImportError as exc:
        return [Check("nft-binding", FAIL, f"{sys.executable} cannot import the libnftables "
                                           f"Python binding ({exc})", BINDING_FIX)]
    where = os.path.dirname(getattr(nftables, "__file__", "") or "?")
    try:
        nft.preload()
    except Exception as exc:  # undefined symbol, missing .so: a binding of another version
        return [Check("nft-binding", FAIL, f"the binding at {where} cannot use the installed "
                                           f"libnftables: {exc}", BINDING_FIX)]
    if not is_root():  # libnftables would print "you must be root" on our stderr
        return [Check("nft-binding", WARN, f"binding at {where} loads libnftables; talking "
                                           f"to the kernel needs root", NEEDS_ROOT)]
    rc, out, err = nft.text_cmd("list tables")
    if rc != 0:
        if "Operation not permitted" in err:
            return [Check("nft-binding", WARN, f"binding at {where} loads libnftables; talking "
                                               f"to the kernel needs root", NEEDS_ROOT)]
        return [Check("nft-binding", FAIL, f"libnftables cannot talk to the kernel: "
                                           f"{_first_error(err)}",
                      "check that the kernel has nf_tables (modprobe nf_tables)")]
    tables = len([line for line in out.splitlines() if line.startswith("table")])
    return [Check("nft-binding", OK, f"binding at {where} drives libnftables; the kernel "
                                     f"answers ({tables} table(s))")]


def _first_error(err: str) -> str:
    lines = [line.strip() for line in err.splitlines() if line.strip()]
    return lines[0] if lines else "no message"


PROBE_TABLE = "via_tunnel_doctor"
# Deleting the probe table twice: the second delete always fails (whatever existed before),
# so the kernel checks every message of the transaction and then commits none of it.
PROBE_ABORT = f"delete table inet {PROBE_TABLE}\ndelete table inet {PROBE_TABLE}\n"


def _probe_bodies(level: int) -> dict[str, str]:
    """nft text per feature (only our constants and a computed int; no user input)."""
    from via_tunnel.core.nftplan import base_ruleset, level_ruleset
    from via_tunnel.core.settings import NFT_TABLE

    t = f"inet {PROBE_TABLE}"
    ours = base_ruleset().replace(f"table inet {NFT_TABLE} {{", f"table {t} {{", 1)
    if f"table {t} {{" not in ours:  # the probe must never touch our real table
        raise ValueError("ruleset.nft does not start its table as expected")
    ours += level_ruleset(level).replace(f"inet {NFT_TABLE} ", f"{t} ")
    return {
        "socket-cgroupv2": (
            f"add table {t}\nadd map {t} m {{ type cgroupsv2 : mark; }}\n"
            f"add chain {t} c {{ type route hook output priority mangle; }}\n"
            f"add rule {t} c meta mark set socket cgroupv2 level {level} map @m\n"),
        "nat": (
            f"add table {t}\nadd chain {t} n {{ type nat hook postrouting priority srcnat; }}\n"
            f"add rule {t} n meta mark 0x80000000 masquerade\n"
            f"add chain {t} d {{ type nat hook output priority -100; }}\n"
            f"add rule {t} d meta nfproto ipv4 meta l4proto udp dnat ip to 192.0.2.53\n"),
        "conntrack-marks": (
            f"add table {t}\nadd chain {t} c {{ type route hook output priority mangle; }}\n"
            f"add rule {t} c ct mark set meta mark\nadd rule {t} c meta mark set ct mark\n"),
        "ruleset": ours,
    }


_FEATURE_TEXT = {
    "socket-cgroupv2": "socket cgroupv2 (a group's sockets get its mark)",
    "nat": "nat (masquerade on the interface, DNAT of DNS)",
    "conntrack-marks": "conntrack marks (connections keep the group's mark)",
    "ruleset": "via-tunnel's whole fixed ruleset",
}


def probe_verdict(feature: str, rc: int, err: str) -> Check:
    """Judge one probe from what libnftables returned (pure): exactly one error, the
    deliberate abort, means the kernel accepted every other message."""
    name = f"kernel:{feature}"
    what = _FEATURE_TEXT.get(feature, feature)
    errors = [e.strip() for e in err.split("Error:")[1:]]
    if rc != 0 and len(errors) == 1 and "No such file or directory" in errors[0]:
        return Check(name, OK, f"{what}: accepted by the kernel (probe not committed)")
    if rc == 0:  # cannot happen: the abort always fails; never claim success on it
        return Check(name, FAIL, f"{what}: the probe was not refused as it must be",
                     "report this as a bug in via-tunnel doctor")
    if any("Operation not permitted" in e for e in errors):
        return Check(name, WARN, f"{what}: not probed (needs root)", NEEDS_ROOT)
    first = _first_error(errors[0]) if errors else _first_error(err)
    return Check(name, FAIL, f"{what}: refused: {first}",
                 "this kernel or nftables lacks it (kernel config: NFT_SOCKET, NFT_NAT, "
                 "NFT_CT, NFT_MASQ, NFT_FIB, NFT_REJECT; nftables >= 1.0)")


def run_probe(feature: str, body: str) -> Check:
    """Send ``body`` and the abort as one transaction through libnftables; the kernel
    checks each message and commits nothing."""
    from via_tunnel.kernel import nft

    rc, _out, err = nft.text_cmd(body + PROBE_ABORT)
    return probe_verdict(feature, rc, err)


def check_kernel_features() -> list[Check]:
    if not is_root():
        return [Check("kernel", WARN, "kernel features not probed (needs root)", NEEDS_ROOT)]
    from via_tunnel.group import lifecycle
    from via_tunnel.kernel import cgroup

    mount = cgroup.cgroup2_mount()
    level = cgroup.level_of(lifecycle.group_path(Settings.from_env(), mount, "probe"), mount)
    return [run_probe(feature, body) for feature, body in _probe_bodies(level).items()]


def check_nft_marks() -> list[Check]:
    """No other nftables table sets our mark bit (doctor_marks.py)."""
    from via_tunnel.doctor.marks import check_foreign_marks
    from via_tunnel.kernel import nft

    if not is_root():
        return [Check("nft-marks", WARN, "cannot read the nftables ruleset without root",
                      NEEDS_ROOT)]
    objects = nft.others_ruleset()
    if objects is None:
        return [Check("nft-marks", WARN, "cannot list the nftables ruleset",
                      "check `nft list tables`")]
    return check_foreign_marks(objects)
