#!/bin/sh
# Install the Debian packages Podvisor needs on a host (idempotent, fast when
# everything is present). Run as root.
set -eu
PACKAGES="
qemu-system-x86 qemu-utils ovmf
libvirt-daemon-system libvirt-clients libvirt-dev pkg-config gcc
python3 python3-dev python3-venv
containernetworking-plugins iproute2 iptables nftables dnsmasq-base
docker-registry skopeo
busybox-static syslinux syslinux-common mtools xorriso cpio
"
# Only for `make test`: the Go SPDY client of tests/streaming builds against
# the library kubelet and kubectl use (Debian packages it; no Go module proxy);
# openssl makes the streaming server's TLS test certificate; images/debian (the
# stock Debian 12 test guest) is built with mmdebstrap. systemd brings
# systemd-analyze, which verifies the units in systemd/.
if [ "${1:-}" = "--test" ]; then
    PACKAGES="$PACKAGES golang-go golang-github-docker-spdystream-dev openssl mmdebstrap e2fsprogs"
    PACKAGES="$PACKAGES systemd"
fi
# Also only for tests and `make bench`: bench/lifecycle.py compares the agent
# with Debian's containerd 1.6 + runc, run on their own state and socket (gcc,
# above, builds the pause image it gives containerd).
if [ "${1:-}" = "--test" ]; then
    PACKAGES="$PACKAGES containerd runc"
fi
missing=""
for p in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done
if [ -n "$missing" ]; then
    echo "podvisor: installing Debian packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
fi
