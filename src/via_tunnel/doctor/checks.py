"""Doctor: checks of the machine (cgroup2, nftables, kernel features, sysctls, ip rules,
systemd-networkd, leftovers of crashed runs, the daemon's socket).

Every check is a function returning report lines (:class:`via_tunnel.doctor.run.Check`) and
changes nothing. The parts that decide (parsers, probe verdicts) are pure functions next to
the code that gathers their input, so they can be tested without root.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
from collections.abc import Iterable
from socket import AF_INET, AF_INET6

from via_tunnel.core.settings import MAX_SLOT, Settings, mark_for_slot, table_for_slot
from via_tunnel.core.wire import PING
from via_tunnel.doctor.check import FAIL, OK, WARN, Check, CheckFn

CLEANUP = "via-tunnel cleanup"
NEEDS_ROOT = "run doctor as root to check this"


def _root() -> bool:
    return os.geteuid() == 0


def machine_checks() -> list[tuple[str, CheckFn]]:
    """(name, function) of every machine check, in report order."""
    return [
        ("cgroup2", check_cgroup2),
        ("nft-binding", check_nft_binding),
        ("kernel", check_kernel_features),
        ("rp_filter", check_rp_filter),
        ("ip-rules", check_ip_rules),
        ("nft-marks", check_nft_marks),
        ("networkd", check_networkd),
        ("leftovers", check_leftovers),
        ("daemon", check_daemon),
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


# --------------------------------------------------------------------------- cgroup2


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


# --------------------------------------------------------------------------- nftables

BINDING_FIX = ("apt install python3-nftables (the binding of the installed libnftables; a "
               "venv needs --system-site-packages; PyPI look-alikes and builds of another "
               "nftables version do not match)")


def check_nft_binding() -> list[Check]:
    """``import nftables`` works, the binding loads the installed libnftables, and that
    library can talk to the kernel (``list tables``)."""
    import sys

    try:
        import nftables  # type: ignore[import-not-found]
    except ImportError as exc:
        return [Check("nft-binding", FAIL, f"{sys.executable} cannot import the libnftables "
                                           f"Python binding ({exc})", BINDING_FIX)]
    where = os.path.dirname(getattr(nftables, "__file__", "") or "?")
    try:
        ctx = nftables.Nftables()
    except Exception as exc:  # undefined symbol, missing .so: a binding of another version
        return [Check("nft-binding", FAIL, f"the binding at {where} cannot use the installed "
                                           f"libnftables: {exc}", BINDING_FIX)]
    if not _root():  # libnftables would print "you must be root" on our stderr
        return [Check("nft-binding", WARN, f"binding at {where} loads libnftables; talking "
                                           f"to the kernel needs root", NEEDS_ROOT)]
    rc, out, err = ctx.cmd("list tables")
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
    from via_tunnel.core.plan import base_ruleset, level_ruleset
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


def run_probe(ctx: object, feature: str, body: str) -> Check:
    """Send ``body`` and the abort as one transaction through libnftables context ``ctx``;
    the kernel checks each message and commits nothing."""
    rc, _out, err = ctx.cmd(body + PROBE_ABORT)  # type: ignore[attr-defined]
    return probe_verdict(feature, rc, err)


def check_kernel_features() -> list[Check]:
    if not _root():
        return [Check("kernel", WARN, "kernel features not probed (needs root)", NEEDS_ROOT)]
    import nftables

    from via_tunnel.group import lifecycle
    from via_tunnel.kernel import cgroup

    mount = cgroup.cgroup2_mount()
    level = cgroup.level_of(lifecycle.group_path(Settings.from_env(), mount, "probe"), mount)
    ctx = nftables.Nftables()
    return [run_probe(ctx, feature, body) for feature, body in _probe_bodies(level).items()]


# --------------------------------------------------------------------------- sysctls

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


# --------------------------------------------------------------------------- ip rules


def dump_rules() -> list[object]:
    """Every ip rule of both families, as :class:`doctor_rules.IpRule`."""
    from via_tunnel.doctor.rules import IpRule
    from via_tunnel.kernel import netlink

    rules: list[object] = []
    with netlink.open_rtnl() as rt:
        for family in (AF_INET, AF_INET6):
            try:
                msgs = rt.rules(family)
            except Exception:  # IPv6 disabled: no v6 rules to judge
                if family == AF_INET:
                    raise
                continue
            for msg in msgs:
                attrs = {a[0]: a[1] for a in msg["attrs"]}
                rules.append(IpRule.from_netlink(family, msg, attrs))
    return rules


def check_nft_marks() -> list[Check]:
    """No other nftables table sets our mark bit (doctor_marks.py)."""
    from via_tunnel.doctor.marks import check_foreign_marks
    from via_tunnel.kernel import nft

    if not _root():
        return [Check("nft-marks", WARN, "cannot read the nftables ruleset without root",
                      NEEDS_ROOT)]
    objects = nft.others_ruleset()
    if objects is None:
        return [Check("nft-marks", WARN, "cannot list the nftables ruleset",
                      "check `nft list tables`")]
    return check_foreign_marks(objects)


def check_ip_rules() -> list[Check]:
    from via_tunnel.doctor.rules import classify

    return classify(dump_rules())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- networkd

ENV_NETWORKD_CONF_DIR = "VIA_TUNNEL_NETWORKD_CONF_DIR"
NETWORKD_KEYS = ("ManageForeignRoutingPolicyRules", "ManageForeignRoutes")
_FALSE = {"no", "false", "0", "off", "n", "f"}
_WANTS = ("multi-user.target.wants", "network-online.target.wants", "sockets.target.wants",
          "sysinit.target.wants")
_UNITS = ("systemd-networkd.service", "systemd-networkd.socket",
          "dbus-org.freedesktop.network1.service")


def networkd_dirs() -> list[str]:
    """Directories holding networkd.conf and networkd.conf.d, highest precedence first."""
    override = os.environ.get(ENV_NETWORKD_CONF_DIR)
    if override:
        return [override]
    return ["/etc/systemd", "/run/systemd", "/usr/local/lib/systemd", "/usr/lib/systemd"]


def networkd_settings(texts: Iterable[str]) -> dict[str, str]:
    """The ``[Network]`` keys that ``texts`` (main file first, then drop-ins in order) end up
    setting; a later assignment wins, as in systemd (pure)."""
    values: dict[str, str] = {}
    for text in texts:
        section = ""
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1].strip()
            elif section == "Network" and "=" in line:
                key, _, value = line.partition("=")
                values[key.strip()] = value.strip()
    return values


def _networkd_texts(dirs: list[str]) -> tuple[list[str], list[str]]:
    """(texts, paths) of the main file and the drop-ins, in the order systemd applies them:
    the main file of the highest-precedence directory, then drop-ins sorted by name (a name
    in a higher-precedence directory masks the same name below)."""
    paths: list[str] = []
    for d in dirs:
        main = os.path.join(d, "networkd.conf")
        if os.path.isfile(main):
            paths.append(main)
            break
    dropins: dict[str, str] = {}
    for d in dirs:
        dd = os.path.join(d, "networkd.conf.d")
        with contextlib.suppress(OSError):
            for name in os.listdir(dd):
                if name.endswith(".conf"):
                    dropins.setdefault(name, os.path.join(dd, name))
    paths += [dropins[n] for n in sorted(dropins)]
    texts = []
    for p in paths:
        with contextlib.suppress(OSError), open(p) as f:
            texts.append(f.read())
    return texts, paths


def networkd_running() -> bool:
    """A process whose command is systemd-networkd (comm is cut to 15 characters)."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "systemd-network":
                    return True
    return False


def networkd_enabled(dirs: list[str]) -> bool:
    return any(os.path.lexists(os.path.join(d, "system", wants, unit))
               for d in dirs for wants in _WANTS for unit in _UNITS)


def networkd_verdict(running: bool, enabled: bool, values: dict[str, str],
                     paths: list[str]) -> Check:
    """Judge systemd-networkd's foreign-rule settings (pure)."""
    if not (running or enabled):
        return Check("networkd", OK, "systemd-networkd is not running or enabled: nobody "
                                     "removes via-tunnel's ip rules and routes behind its back")
    state = "running" if running else "enabled"
    bad = [k for k in NETWORKD_KEYS if values.get(k, "yes").lower() not in _FALSE]
    read = ", ".join(paths) or "no networkd.conf"
    if not bad:
        return Check("networkd", OK, f"systemd-networkd is {state} and leaves foreign rules and "
                                     f"routes alone ({read})")
    found = ", ".join(f"{k}={values.get(k, 'yes (default)')}" for k in bad)
    return Check(
        "networkd", WARN,
        f"systemd-networkd is {state} with {found} ({read}): when it restarts it deletes the "
        f"ip rules and routes of via-tunnel's active groups",
        "put [Network] " + " ".join(f"{k}=no" for k in bad) +
        " in /etc/systemd/networkd.conf.d/via-tunnel.conf, then restart systemd-networkd")


def check_networkd() -> list[Check]:
    dirs = networkd_dirs()
    texts, paths = _networkd_texts(dirs)
    return [networkd_verdict(networkd_running(), networkd_enabled(dirs),
                             networkd_settings(texts), paths)]


# --------------------------------------------------------------------------- leftovers


def check_leftovers() -> list[Check]:
    """Records whose group has no process and no watcher, kernel objects in our ranges with
    no record, our nft table with no group, cgroups with no record (what ``cleanup`` sweeps,
    found with the same helpers)."""
    from via_tunnel.core.plan import RuleSpec, group_rules
    from via_tunnel.group import lifecycle, state
    from via_tunnel.kernel import cgroup, netlink

    settings = Settings.from_env()
    records = state.load_all(settings)
    out: list[Check] = []
    for rec in records:
        alive = state.watcher_alive(settings, rec.iface)
        if cgroup.populated(rec.cgroup):
            if not alive:
                out.append(Check(
                    "leftovers", WARN,
                    f"group {rec.iface} has processes but no watcher: nothing will remove "
                    f"its rules when they exit",
                    f"{CLEANUP} after they exit (or start `via-tunnel daemon`: it adopts "
                    f"groups)"))
        elif not alive:
            where = "empty" if os.path.isdir(rec.cgroup) else "gone"
            half = "" if rec.ready else ", setup never finished"
            out.append(Check(
                "leftovers", WARN,
                f"group {rec.iface}: a record in {settings.groups_dir} whose cgroup is {where} "
                f"and that no watcher serves{half} (a crashed run)", CLEANUP))
    live = {r.slot for r in records}
    spare = [s for s in range(1, MAX_SLOT + 1) if s not in live]
    stray_rules: list[RuleSpec] = []
    for s in spare:
        stray_rules.extend(group_rules(mark_for_slot(s), table_for_slot(s)))
    rules, tables = netlink.our_rules_and_tables(stray_rules, [table_for_slot(s) for s in spare])
    if rules or tables:
        what = [f"{len(rules)} ip rule(s) ({', '.join(sorted({f'0x{r.table:x}' for r in rules}))})"
                if rules else "", f"routes in table(s) {', '.join(f'0x{t:x}' for t in tables)}"
                if tables else ""]
        out.append(Check("leftovers", WARN,
                         f"{' and '.join(w for w in what if w)} in via-tunnel's range with no "
                         f"group record (a run killed before it wrote one, or after)", CLEANUP))
    nft_note = ""
    if _root():
        from via_tunnel.kernel import nft

        if not records and nft.table_exists():
            out.append(Check("leftovers", WARN, "nft table inet via_tunnel exists but no group "
                                                "is recorded", CLEANUP))
    else:
        nft_note = "; nft table not checked (needs root)"
    known = {lifecycle.GROUP_PREFIX + r.iface for r in records}
    with contextlib.suppress(Exception):
        subtree = os.path.join(cgroup.cgroup2_mount(), settings.cgroup_subtree)
        for name in sorted(os.listdir(subtree)):
            if name.startswith(lifecycle.GROUP_PREFIX) and name not in known \
                    and os.path.isdir(os.path.join(subtree, name)):
                out.append(Check("leftovers", WARN, f"cgroup {os.path.join(subtree, name)} has "
                                                    f"no group record", CLEANUP))
    if not out:
        out.append(Check("leftovers", OK, f"nothing left by crashed runs ({len(records)} "
                                          f"active group(s){nft_note})"))
    return out


# --------------------------------------------------------------------------- daemon

DAEMON_TIMEOUT = 2.0


def check_daemon() -> list[Check]:
    """Is there a daemon socket, and does a daemon answer on it? The probe sends a ping
    (:data:`wire.PING`); it never asks for anything."""
    from via_tunnel.core.wire import socket_path

    path = socket_path()
    start = "start `via-tunnel daemon` (or systemctl enable --now via-tunnel.socket)"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return [Check("daemon", WARN, f"no daemon socket at {path}: only root can launch "
                                      f"(fine if nobody else needs to)",
                      f"{start} so that allowed users can launch without root")]
    except OSError as exc:
        return [Check("daemon", WARN, f"cannot look at {path}: {exc.strerror}", NEEDS_ROOT)]
    if not stat.S_ISSOCK(st.st_mode):
        return [Check("daemon", FAIL, f"{path} exists but is not a socket",
                      f"remove it, then {start}")]
    answer = _ask_daemon(path)
    if isinstance(answer, dict) and answer.get("ok") is True:
        return [Check("daemon", OK, f"a daemon (version {answer.get('version')}) answers "
                                    f"at {path}")]
    if isinstance(answer, dict) and "ok" in answer:  # busy, or a daemon from before ping
        return [Check("daemon", WARN, f"a daemon answers at {path} but refused a ping: "
                                      f"{answer.get('error')}",
                      "if it is busy, try again; an older version: restart it")]
    return [Check("daemon", WARN, f"{path}: {answer}", start)]


def _ask_daemon(path: str) -> dict[str, object] | str:
    """The daemon's answer to a ping, or why there is none (a string)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(DAEMON_TIMEOUT)
        try:
            sock.connect(path)
        except ConnectionRefusedError:
            return "the socket exists but nothing listens (a daemon that died)"
        except PermissionError:
            return "permission denied (this user is not in the socket's group)"
        sock.sendall(PING)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while len(data) <= 65536:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        return f"something accepts connections but gives no answer in {DAEMON_TIMEOUT:g} s"
    except OSError as exc:
        return f"talking to the daemon failed: {exc.strerror}"
    finally:
        sock.close()
    try:
        answer = json.loads(data)
    except ValueError:
        answer = None
    return answer if isinstance(answer, dict) else "something answers, but not a via-tunnel daemon"
