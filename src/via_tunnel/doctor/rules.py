"""Doctor: the host's ip rules against via-tunnel's footprint (pure; no I/O here).

Our footprint (core/settings.py, core/plan.py ``shared_rules``): at priority 0, right after
``local``, ``fwmark 0x80000000/0x80000000 goto 5100``; at 5099 the host's other packets jump
over the groups' rules; at 5100 one ``fwmark 0x80000000|slot<<24/0xff000000 lookup
0x76740000+slot`` per group; at 5101 ``fwmark 0x80000000/0x80000000 unreachable``. A foreign
rule can hurt us, or we it, in four ways, checked in this order (a rule gets at most one
finding, the most serious):

1. it uses one of our tables: a group in that slot shares it, and its teardown flushes it;
2. its fwmark selects marks in our bits (bit 31, or bits that equal one of our marks): our
   nft rules take their packets for a group's, our rules route them, or theirs route ours;
3. it sits at our priority: rules of one priority are tried in insertion order, so one that
   matches our marks may take a group's packets first;
4. it comes before our entry rule (priority 0, listed before it: added while no group ran)
   and matches every packet of a group (no selector, or an inverted fwmark such as
   wg-quick's): a group's packets take its table. Rules at priorities 1-5099 are jumped
   over by a group's packets and those after 5101 never see them.

Rules that pass are fine, and the known neighbours among them (Tailscale, wg-quick, Mullvad;
NOTES.md) get an OK line that says why they coexist.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from socket import AF_INET6
from typing import Any

from via_tunnel.core.settings import (
    BUCKET_MASK,
    CATCH_PRIORITY,
    ENTRY_PRIORITY,
    MARK_FLAG,
    MARK_MASK,
    MAX_SLOT,
    RULE_PRIORITY,
    SKIP_PRIORITY,
    TABLE_BASE,
    bucket_priority,
    mark_for_slot,
)
from via_tunnel.doctor.check import FAIL, OK, WARN, Check
from via_tunnel.kernel.nlmsg import (
    FIB_RULE_INVERT,
    FR_ACT_GOTO,
    FR_ACT_TO_TBL,
    FR_ACT_UNREACHABLE,
)

FR_ACT_BLACKHOLE, FR_ACT_PROHIBIT = 6, 8
_ACTION_NAMES = {FR_ACT_GOTO: "goto", 3: "nop", FR_ACT_BLACKHOLE: "blackhole",
                 FR_ACT_UNREACHABLE: "unreachable", FR_ACT_PROHIBIT: "prohibit"}
# Actions that decide a packet's fate (a nop lets it continue to later rules).
_DECIDING = {FR_ACT_TO_TBL, FR_ACT_GOTO, FR_ACT_BLACKHOLE, FR_ACT_UNREACHABLE, FR_ACT_PROHIBIT}
LOCAL_TABLE = 255
NO_SUPPRESS = 0xFFFF_FFFF
OUR_TABLES = range(TABLE_BASE + 1, TABLE_BASE + MAX_SLOT + 1)
OUR_MARKS = tuple(mark_for_slot(s) for s in range(1, MAX_SLOT + 1))
OUR_BAND = range(SKIP_PRIORITY, CATCH_PRIORITY + 1)  # the host's packets jump over it
FOOTPRINT = (f"priorities {ENTRY_PRIORITY}, {SKIP_PRIORITY}-{CATCH_PRIORITY}, "
             f"tables 0x{OUR_TABLES[0]:x}-0x{OUR_TABLES[-1]:x}, "
             f"marks with bit 31 under mask 0x{MARK_MASK:08x}")

TAILSCALE_TABLE = 52
TAILSCALE_PRIORITIES = range(5210, 5271)
MULLVAD_MARK = 0x6D6F6C65


class IpRule:
    """One ip rule, reduced to what the classification needs.

    ``fwmark`` is None when the rule has no fwmark selector; ``fwmask`` is then irrelevant.
    ``src``/``dst`` are "addr/len" or None; ``iif``/``oif`` interface names or None.
    """

    __slots__ = ("action", "dst", "family", "fwmark", "fwmask", "iif", "invert", "oif",
                 "priority", "src", "suppress_prefixlen", "table")

    def __init__(self, *, family: int = 2, priority: int = 0, table: int = 0,
                 action: int = FR_ACT_TO_TBL, fwmark: int | None = None,
                 fwmask: int = 0xFFFF_FFFF, invert: bool = False,
                 suppress_prefixlen: int | None = None, src: str | None = None,
                 dst: str | None = None, iif: str | None = None, oif: str | None = None) -> None:
        self.family = family
        self.priority = priority
        self.table = table
        self.action = action
        self.fwmark = fwmark
        self.fwmask = fwmask
        self.invert = invert
        self.suppress_prefixlen = suppress_prefixlen
        self.src = src
        self.dst = dst
        self.iif = iif
        self.oif = oif

    @classmethod
    def from_netlink(cls, family: int, fields: Mapping[str, Any],
                     attrs: Mapping[str, Any]) -> IpRule:
        """Build from an RTM_NEWRULE message: its header ``fields`` (family, table, action,
        flags, src_len, dst_len) and its attributes (``FRA_*`` -> value)."""
        mark = attrs.get("FRA_FWMARK")
        mask = attrs.get("FRA_FWMASK")
        suppress = attrs.get("FRA_SUPPRESS_PREFIXLEN")
        src_len, dst_len = int(fields.get("src_len", 0)), int(fields.get("dst_len", 0))
        return cls(
            family=family,
            priority=int(attrs.get("FRA_PRIORITY") or 0),
            table=int(attrs.get("FRA_TABLE") or fields.get("table") or 0),
            action=int(fields.get("action", FR_ACT_TO_TBL)),
            # The kernel reports a mask only with a mark; "fwmark 0" alone is no selector.
            fwmark=None if mark is None and mask is None else int(mark or 0),
            fwmask=0xFFFF_FFFF if mask is None else int(mask),
            invert=bool(int(fields.get("flags", 0)) & FIB_RULE_INVERT),
            suppress_prefixlen=None if suppress in (None, NO_SUPPRESS) else int(suppress),
            src=f"{attrs.get('FRA_SRC')}/{src_len}" if src_len else None,
            dst=f"{attrs.get('FRA_DST')}/{dst_len}" if dst_len else None,
            iif=attrs.get("FRA_IIFNAME"), oif=attrs.get("FRA_OIFNAME"),
        )

    def describe(self) -> str:
        """Roughly as ``ip rule show`` prints it, with the family in front."""
        return f"{self.command()} {self.priority}: {self.selector()}"

    def command(self) -> str:
        return "ip -6 rule" if self.family == AF_INET6 else "ip rule"

    def selector(self) -> str:
        """The rule without its priority, as ``ip rule add`` and ``del`` take it."""
        parts = []
        if self.invert:
            parts.append("not")
        parts += ["from", self.src or "all"]
        if self.dst:
            parts += ["to", self.dst]
        if self.fwmark is not None:
            parts += ["fwmark", f"0x{self.fwmark:x}" + (
                "" if self.fwmask == 0xFFFF_FFFF else f"/0x{self.fwmask:x}")]
        if self.iif:
            parts += ["iif", self.iif]
        if self.oif:
            parts += ["oif", self.oif]
        if self.action == FR_ACT_TO_TBL:
            parts += ["lookup", str(self.table)]
        else:
            parts.append(_ACTION_NAMES.get(self.action, f"action {self.action}"))
        if self.suppress_prefixlen is not None:
            parts += ["suppress_prefixlength", str(self.suppress_prefixlen)]
        return " ".join(parts)


def is_shared(rule: IpRule) -> bool:
    """Whether ``rule`` is one of the rules every group relies on (plan.shared_rules)."""
    if (rule.fwmark != MARK_FLAG or rule.fwmask != MARK_FLAG
            or rule.src or rule.dst or rule.iif or rule.oif):
        return False
    return ((rule.priority, rule.action, rule.invert) in {
        (ENTRY_PRIORITY, FR_ACT_GOTO, False), (SKIP_PRIORITY, FR_ACT_GOTO, True),
        (CATCH_PRIORITY, FR_ACT_UNREACHABLE, False)})


def is_dispatch(rule: IpRule) -> bool:
    """Whether ``rule`` is one of our bucket rules (plan.shared_rules, RULE_PRIORITY)."""
    return (rule.priority == RULE_PRIORITY and rule.action == FR_ACT_GOTO
            and not rule.invert and rule.fwmask == BUCKET_MASK and rule.fwmark is not None
            and not (rule.src or rule.dst or rule.iif or rule.oif))


def our_slot(rule: IpRule) -> int | None:
    """The slot when ``rule`` is exactly one of via-tunnel's own rules, else None."""
    if (rule.priority not in OUR_BAND or rule.invert or rule.action != FR_ACT_TO_TBL
            or rule.fwmark is None or rule.fwmask != MARK_MASK or rule.table not in OUR_TABLES
            or rule.src or rule.dst or rule.iif or rule.oif):
        return None
    slot = rule.table - TABLE_BASE
    ok = rule.fwmark == mark_for_slot(slot) and rule.priority == bucket_priority(slot)
    return slot if ok else None


def matched_marks(rule: IpRule) -> list[int]:
    """Which of our marks the rule's fwmark selector accepts (all of them without one)."""
    if rule.fwmark is None:
        return list(OUR_MARKS)
    return [m for m in OUR_MARKS if ((m & rule.fwmask) == rule.fwmark) != rule.invert]


def catches_group_packets(rule: IpRule) -> bool:
    """Whether the rule would match every locally sent packet of a group: its marks, and no
    source, destination or output-device selector. (Locally sent packets have iif lo.)"""
    return (bool(matched_marks(rule)) and not (rule.src or rule.dst or rule.oif)
            and rule.iif in (None, "lo"))


def finding(rule: IpRule, before_entry: bool = False) -> Check | None:
    """The most serious way ``rule`` collides with our footprint, or None (see module doc).
    ``before_entry``: the rule is tried before our entry rule (or there is none yet)."""
    if our_slot(rule) is not None or is_shared(rule) or is_dispatch(rule):
        return None
    desc = rule.describe()
    if rule.table in OUR_TABLES and rule.action in (FR_ACT_TO_TBL, FR_ACT_GOTO):
        slot = rule.table - TABLE_BASE
        return Check(
            "ip-rules:table", FAIL,
            f"'{desc}' uses via-tunnel's routing table {rule.table} (0x{rule.table:x}, "
            f"slot {slot}): a group in that slot would share it, and its teardown flushes it",
            "move that rule and its routes to a table outside "
            f"0x{OUR_TABLES[0]:x}-0x{OUR_TABLES[-1]:x}")
    if (rule.fwmark is not None and not rule.invert and rule.fwmask & MARK_MASK
            and (rule.fwmark & rule.fwmask & MARK_FLAG or matched_marks(rule))):
        return Check(
            "ip-rules:marks", FAIL,
            f"'{desc}' selects marks in the bits via-tunnel uses ({FOOTPRINT}): via-tunnel's "
            f"nft rules take any packet with bit 31 for a group's (its kill switch drops it "
            f"outside the group's interface), a group's rules can route that program's "
            f"packets, and this rule a group's",
            "give that program marks with bit 31 clear (every via-tunnel mark has it set)")
    if rule.priority in OUR_BAND:
        band = f"{OUR_BAND[0]}-{OUR_BAND[-1]}"
        if rule.action in _DECIDING and matched_marks(rule):
            return Check(
                "ip-rules:priority", FAIL,
                f"'{desc}' sits among via-tunnel's rules ({band}) and matches its marks: "
                f"rules of one priority are tried in insertion order, so it can take a "
                f"group's packets first",
                f"give it a priority outside {band} (ip rule del ...; ip rule add ... "
                f"priority N)")
        return Check(
            "ip-rules:priority", WARN,
            f"'{desc}' sits among via-tunnel's rules ({band}): while groups run, the "
            f"host's other packets jump over that band, so this rule is not used",
            f"give it a priority outside {band}")
    if (before_entry and rule.priority <= ENTRY_PRIORITY and rule.action in _DECIDING
            and not (rule.action == FR_ACT_TO_TBL and rule.table == LOCAL_TABLE)
            and catches_group_packets(rule)):
        where = (f"where table {rule.table} has a route, a group's packets take it instead "
                 f"of the group's interface" if rule.action in (FR_ACT_TO_TBL, FR_ACT_GOTO)
                 else "a group's packets are dropped by it")
        sel = rule.selector()
        return Check(
            "ip-rules:before", WARN,
            f"'{desc}' comes before via-tunnel's entry rule (priority {ENTRY_PRIORITY}, "
            f"tried in the order added) and matches every packet of a group: {where}",
            f"{rule.command()} del {sel} priority {rule.priority} && "
            f"{rule.command()} add {sel} priority 1  (a group's packets jump over "
            f"priorities 1-{SKIP_PRIORITY})")
    return None


def neighbour(rule: IpRule) -> str | None:
    """Which known neighbour (NOTES.md) a rule belongs to, if any."""
    if rule.priority in TAILSCALE_PRIORITIES or rule.table == TAILSCALE_TABLE:
        return "tailscale"
    if MULLVAD_MARK in (rule.fwmark, rule.table):
        return "mullvad"
    if (rule.invert and rule.fwmark is not None and rule.fwmark == rule.table) \
            or rule.suppress_prefixlen == 0:
        return "wg-quick"
    return None


def _neighbour_check(name: str, rules: list[IpRule]) -> Check:
    first = min(rules, key=lambda r: r.priority)
    if name == "tailscale":
        detail = (f"Tailscale's rules ({first.describe()}, ...) sit at 5210-5270, which a "
                  f"group's packets never reach, and use mark bits 0xff0000: no overlap")
    elif name == "mullvad":
        detail = (f"Mullvad's rules ({first.describe()}, ...) use mark 0x{MULLVAD_MARK:x} "
                  f"(bit 31 clear): no overlap with via-tunnel's marks")
    else:
        detail = (f"a wg-quick style full tunnel ({'; '.join(r.describe() for r in rules[:2])}"
                  f"{', ...' if len(rules) > 2 else ''}) comes after via-tunnel's entry rule: "
                  f"a group leaves by its own interface, so "
                  f"`via-tunnel eth0 -- app` lets one program bypass the full tunnel")
    return Check(f"neighbour:{name}", OK, detail)


def classify(rules: Iterable[IpRule]) -> list[Check]:
    """The report lines for a dump of ip rules (both families): one per colliding rule,
    one OK per known neighbour that coexists, and one OK summary when nothing collides."""
    out: list[Check] = []
    neighbours: dict[str, list[IpRule]] = {}
    count = 0
    entry_seen: set[int] = set()  # families whose entry rule came already (dump order)
    for rule in rules:
        count += 1
        if is_shared(rule) and rule.priority == ENTRY_PRIORITY:
            entry_seen.add(rule.family)
        found = finding(rule, before_entry=rule.family not in entry_seen)
        if found is not None:
            out.append(found)
            continue
        name = neighbour(rule)
        if name is not None:
            neighbours.setdefault(name, []).append(rule)
    if not out:
        out.append(Check("ip-rules", OK, f"no other rule uses via-tunnel's {FOOTPRINT} "
                                         f"({count} rules checked)"))
    out.extend(_neighbour_check(name, rs) for name, rs in sorted(neighbours.items()))
    return out
