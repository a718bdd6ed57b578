"""``python -m via_tunnel.lab up [--prefix P] [--no-openvpn] | down PREFIX``.

``up`` builds a lab, prints its prefix, how long it took and its namespaces, and leaves it
up (to explore, or for a benchmark run by hand); ``down`` removes a lab left up by any
process and prints the namespaces it removed.
"""

from __future__ import annotations

import argparse
import sys

from via_tunnel.lab.namespaces import remove
from via_tunnel.lab.netlab import Lab


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m via_tunnel.lab")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("up", help="build a lab, print its prefix and leave it up")
    p.add_argument("--prefix")
    p.add_argument("--no-openvpn", action="store_true")
    p = sub.add_parser("down", help="remove a lab left up")
    p.add_argument("prefix")
    args = parser.parse_args(argv)
    if args.cmd == "up":
        lab = Lab(args.prefix, openvpn=not args.no_openvpn).up()
        print(f"{lab.prefix} up in {lab.up_seconds:.2f}s: {' '.join(lab.namespaces)}")
        return 0
    removed = remove(args.prefix)
    print(" ".join(removed) if removed else f"no lab {args.prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
