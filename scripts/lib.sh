# Shared by scripts/demo.sh and scripts/test.sh. Debian 12, run as root.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNTIME_DEBS=(nftables python3-nftables python3-venv python3-dbus iproute2 util-linux conntrack)
TEST_DEBS=(openvpn tcpdump curl socat desktop-file-utils procps sudo passwd bash-completion zsh fish groff make
           shellcheck wireguard-go wireguard-tools
           systemd dbus libpam-systemd dbus-user-session)
# apt_install installs these in a step of their own, with --no-install-recommends: with its
# recommends, wireguard-tools pulls a kernel image, initramfs-tools and udev. The tests use the
# userspace wireguard-go (tests/wg_lab.py): a container cannot load the kernel module.
NO_RECOMMENDS_DEBS=(wireguard-go wireguard-tools)

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "run this as root (it installs Debian packages and builds network namespaces)" >&2
        exit 1
    fi
}

apt_install() {
    local missing=() plain=() bare=() p q
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$p")
    done
    [ "${#missing[@]}" -gt 0 ] || return 0
    for p in "${missing[@]}"; do
        for q in "${NO_RECOMMENDS_DEBS[@]}"; do
            [ "$p" = "$q" ] && { bare+=("$p"); continue 2; }
        done
        plain+=("$p")
    done
    apt-get update -qq
    if [ "${#plain[@]}" -gt 0 ]; then
        echo "==> apt-get install ${plain[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${plain[@]}" >/dev/null
    fi
    if [ "${#bare[@]}" -gt 0 ]; then
        echo "==> apt-get install --no-install-recommends ${bare[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${bare[@]}" >/dev/null
    fi
}

# make_venv DIR [EXTRA]: a venv on Debian's python3 that sees python3-nftables.
make_venv() {
    local dir="$1" extra="${2:-}"
    if [ ! -x "$dir/bin/python" ]; then
        /usr/bin/python3 -m venv --system-site-packages "$dir"
    fi
    echo "==> pip install into $dir"
    local pip=("$dir/bin/python" -m pip install -q --disable-pip-version-check)
    # (this machine's pip config names an absent local index: drop only those warnings)
    if [ -n "$extra" ]; then
        "${pip[@]}" -e "$REPO[$extra]" 2> >(grep -v "^WARNING: Location" >&2)
    else
        "${pip[@]}" "$REPO" 2> >(grep -v "^WARNING: Location" >&2)
    fi
    "$dir/bin/python" -c 'import nftables' \
        || { echo "python3-nftables is not visible in $dir" >&2; exit 1; }
}
