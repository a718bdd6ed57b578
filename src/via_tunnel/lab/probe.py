"""Break one part of an active group's kernel state and time how long it takes to return.

Lab tooling for the reconcile tests and ``bench/reconcile.py``; it runs *inside* a lab's
client namespace as a script and prints one JSON object. Build its command line with
:func:`command`: the script runs isolated (``python -I``), so it cannot import the package,
and gets via-tunnel's constants (rule priority, nft table) as arguments from the caller.
Standard library plus the nft binding; every change is made the way a neighbour would make
it:

* ``nft``:    ``flush ruleset`` (in-process through libnftables: the clock starts when the
              flush has committed);
* ``rules``:  ``ip rule del`` of every rule at our priority, one after the other, as
              systemd-networkd does with foreign rules on restart (the clock starts
              after the last one);
* ``routes``: ``ip route flush table TABLE`` for both families.

Output: ``{"kind", "restored_ms", "resolution_ms"}``: when everything was back, counted
from the end of the change (null if it did not come back within the timeout), and how long
one check for "back" takes, the resolution of that figure.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

USAGE = "usage: probe.py nft|rules|routes TABLE RULE_PRIORITY NFT_FAMILY NFT_TABLE"


def command(kind: str, table: int, python: str = sys.executable) -> list[str]:
    """The argv that runs this probe (in a lab namespace) for group table ``table``."""
    from via_tunnel.core.settings import NFT_FAMILY, NFT_TABLE, RULE_PRIORITY

    return [python, "-I", __file__, kind, str(table), str(RULE_PRIORITY), NFT_FAMILY, NFT_TABLE]


def _ip_json(*args: str) -> list[dict[str, object]]:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=False)
    return json.loads(out.stdout or "[]") if out.returncode == 0 else []


def _our_rules(priority: int) -> list[tuple[str, dict[str, object]]]:
    return [(fam, r) for fam in ("-4", "-6") for r in _ip_json(fam, "rule", "show")
            if r.get("priority") == priority]


def _nft_whole(nft: object, nft_table: str) -> bool:
    """Our table exists with at least one group in it and rules in its chains."""
    rc, out, _err = nft.cmd(f"list table {nft_table}")  # type: ignore[attr-defined]
    if rc != 0:
        return False
    objects = json.loads(out)["nftables"]
    oifs = [o["set"] for o in objects if o.get("set", {}).get("name") == "group_oifs"]
    sockets = [o for o in objects if o.get("rule", {}).get("chain") == "group_sockets"]
    return bool(oifs and oifs[0].get("elem") and sockets)


def probe(kind: str, table: int, priority: int, nft_table: str,
          timeout: float) -> dict[str, object]:
    nft = None
    if kind == "nft":
        import nftables  # type: ignore[import-not-found]

        nft = nftables.Nftables()
        nft.set_json_output(True)
        if not _nft_whole(nft, nft_table):
            raise SystemExit("probe: no group in our nft table to begin with")
        rc, _out, err = nft.cmd("flush ruleset")
        if rc != 0:
            raise SystemExit(f"probe: flush ruleset: {err}")

        def restored() -> bool:
            return _nft_whole(nft, nft_table)
    elif kind == "rules":
        before = _our_rules(priority)
        if not before:
            raise SystemExit("probe: no ip rule of ours to begin with")
        for fam, _ in before:
            subprocess.run(["ip", fam, "rule", "del", "priority", str(priority)],
                           check=True)

        def restored() -> bool:
            return len(_our_rules(priority)) == len(before)
    else:
        wanted = [(fam, r["dst"]) for fam in ("-4", "-6")
                  for r in _ip_json(fam, "route", "show", "table", str(table))]
        if not wanted:
            raise SystemExit(f"probe: table {table} is empty to begin with")
        for fam in ("-4", "-6"):
            subprocess.run(["ip", fam, "route", "flush", "table", str(table)], check=True)

        def restored() -> bool:
            have = {(fam, r["dst"]) for fam in ("-4", "-6")
                    for r in _ip_json(fam, "route", "show", "table", str(table))}
            return set(wanted) <= have
    broken = time.monotonic()
    done = None
    while time.monotonic() - broken < timeout:
        if restored():
            done = time.monotonic()
            break
        time.sleep(0.0005)
    check = time.monotonic()
    restored()
    resolution = time.monotonic() - check
    return {"kind": kind,
            "restored_ms": None if done is None else round((done - broken) * 1000, 2),
            "resolution_ms": round(resolution * 1000, 2)}


def main(argv: list[str]) -> int:
    if len(argv) != 5 or argv[0] not in ("nft", "rules", "routes"):
        print(USAGE, file=sys.stderr)
        return 2
    kind, table, priority, family, name = argv
    print(json.dumps(probe(kind, int(table), int(priority), f"{family} {name}",
                           timeout=2.0)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
