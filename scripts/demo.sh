#!/bin/bash
# Install via-tunnel (Debian packages, a venv in /opt/via-tunnel, /usr/local/bin/via-tunnel)
# and run the demo: a throwaway lab of network namespaces, a request without and with
# via-tunnel, and nothing left behind.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need_root
apt_install "${RUNTIME_DEBS[@]}" openvpn curl procps
make_venv /opt/via-tunnel
ln -sf /opt/via-tunnel/bin/via-tunnel /usr/local/bin/via-tunnel
install -D -m 644 "$REPO/completions/via-tunnel.bash" /usr/share/bash-completion/completions/via-tunnel 2>/dev/null || true
install -D -m 644 "$REPO/man/via-tunnel.1" /usr/local/share/man/man1/via-tunnel.1 2>/dev/null || true
exec /usr/local/bin/via-tunnel demo "$@"
