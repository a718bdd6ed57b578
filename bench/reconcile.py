"""How fast via-tunnel puts back what a neighbour removed, and what leaks meanwhile.

Run as root: ``python bench/reconcile.py [--runs N]``. It builds a namespace lab with
OpenVPN (``tun0``), starts one program in the ``tun0`` group that sends a numbered UDP
datagram to the lab's echo server every 2 ms, and then, N times each:

* ``nft flush ruleset`` (our table is gone, the group's packets are unmarked);
* ``ip rule del`` of our rules (systemd-networkd restarting);
* ``ip route flush table`` of the group's table (the kernel or a tool);

each time measuring (``via_tunnel.lab.probe``) how long until everything is back, and
counting, with tcpdump on the client's LAN interface, the stream's datagrams that left by
the LAN meanwhile. The baseline, measured in the same run, is the probe's own resolution:
how long one check for "back" takes. Prints medians and maxima against the 100 ms target
and the ratio to the resolution. Exit 0 whatever the figures; 1 when something failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

try:
    from via_tunnel.lab import probe as lab_probe
    from via_tunnel.lab.capture import Capture
    from via_tunnel.lab.footprint import remove_footprint
    from via_tunnel.lab.netlab import Lab
    from via_tunnel.lab.procs import LabError
except ImportError:  # not installed in this interpreter: use the checkout's src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from via_tunnel.lab import probe as lab_probe
    from via_tunnel.lab.capture import Capture
    from via_tunnel.lab.footprint import remove_footprint
    from via_tunnel.lab.netlab import Lab
    from via_tunnel.lab.procs import LabError

TARGET_MS = 100.0
INTERVAL = 0.002
STREAM = f"""
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
end = time.monotonic() + 600
while time.monotonic() < end:
    try:
        s.sendto(b"vtbench", ({Lab.SERVER!r}, {Lab.UDP_PORT}))
        while s.recv(100):
            pass
    except OSError:
        pass
    time.sleep({INTERVAL})
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/reconcile.py needs root", file=sys.stderr)
        return 1
    lab = Lab(openvpn=True).up()
    env = {"VIA_TUNNEL_STATE_DIR": f"/run/via-tunnel-bench-{lab.prefix}",
           "VIA_TUNNEL_CGROUP": f"via-tunnel-bench-{lab.prefix}",
           "PYTHONPATH": str(Path(lab_probe.__file__).resolve().parents[1])}
    try:
        stream = lab.popen(lab.client, [sys.executable, "-m", "via_tunnel", "tun0", "--",
                                        sys.executable, "-c", STREAM], env=env)
        record = Path(env["VIA_TUNNEL_STATE_DIR"]) / "groups" / "tun0.json"
        deadline = time.monotonic() + 10
        while not record.exists():
            if time.monotonic() > deadline:
                raise LabError("the group did not come up")
            time.sleep(0.05)
        time.sleep(0.5)
        table = json.loads(record.read_text())["table"]
        print(f"lab {lab.prefix}: a UDP datagram every {INTERVAL * 1000:g} ms in the tun0 "
              f"group; {args.runs} runs each")
        print(f"{'what':<22}{'restored median':>17}{'max':>9}{'target':>9}"
              f"{'x resolution':>14}{'leaked (median/max)':>22}")
        for kind, label in (("nft", "nft flush ruleset"), ("rules", "ip rules deleted"),
                            ("routes", "table routes flushed")):
            restored, resolution, leaked = [], [], []
            for _ in range(args.runs):
                with Capture(lab, lab.client, "eth0",
                             f"udp and dst host {Lab.SERVER}") as lan:
                    argv = lab_probe.command(kind, table)
                    out = json.loads(lab.run(lab.client, argv, timeout=10).stdout)
                    time.sleep(0.1)
                if out["restored_ms"] is None:
                    raise LabError(f"{label}: not restored within 2 s")
                restored.append(out["restored_ms"])
                resolution.append(out["resolution_ms"])
                leaked.append(len(lan.packets()))
                time.sleep(0.2)
            med = statistics.median(restored)
            ratio = med / statistics.median(resolution)
            verdict = "ok" if max(restored) < TARGET_MS else "MISS"
            print(f"{label:<22}{med:>14.1f} ms{max(restored):>6.1f} ms{TARGET_MS:>6.0f} ms"
                  f"{ratio:>13.1f}x{statistics.median(leaked):>14g} / {max(leaked)}  {verdict}")
        stream.terminate()
        stream.wait(timeout=10)
        return 0
    except LabError as exc:
        print(f"bench/reconcile.py: {exc}", file=sys.stderr)
        return 1
    finally:
        lab.down()
        remove_footprint(env["VIA_TUNNEL_STATE_DIR"], env["VIA_TUNNEL_CGROUP"])


if __name__ == "__main__":
    sys.exit(main())
