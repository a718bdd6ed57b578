#!/bin/bash
# Install via-tunnel (Debian packages, then `make install`: a venv in /opt/via-tunnel,
# /usr/local/bin/via-tunnel, completions, man page, systemd units) and run the demo: a
# throwaway lab of network namespaces, a request without and with via-tunnel, and nothing
# left behind.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need_root
apt_install "${RUNTIME_DEBS[@]}" make openvpn curl procps
echo "==> make install PREFIX=/usr/local VENV=/opt/via-tunnel"
make -s -C "$REPO" install PREFIX=/usr/local VENV=/opt/via-tunnel \
    2> >(grep -v "^WARNING: Location" >&2)
/opt/via-tunnel/bin/python -c 'import nftables' \
    || { echo "python3-nftables is not visible in /opt/via-tunnel" >&2; exit 1; }
exec /usr/local/bin/via-tunnel demo "$@"
