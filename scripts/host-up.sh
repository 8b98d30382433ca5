#!/bin/sh
# Make libvirt usable on this host: /dev/kvm permissions, virtlogd + libvirtd
# running, QEMU capabilities probed. Idempotent. Run as root.
set -eu
if [ -e /dev/kvm ]; then
    # libvirt's QEMU runs as libvirt-qemu, a member of group kvm.
    chown root:kvm /dev/kvm
    chmod 0660 /dev/kvm
fi
if [ -d /run/systemd/system ]; then
    systemctl start virtlogd.socket libvirtd.socket 2>/dev/null || true
    systemctl start virtlogd libvirtd
else
    pgrep -x virtlogd >/dev/null || virtlogd -d
    pgrep -x libvirtd >/dev/null || libvirtd -d
fi
# Wait for libvirtd to answer; the first use on a fresh machine probes QEMU
# (up to ~90 s), which we pay here rather than inside a test's timeout.
i=0
until virsh -c qemu:///system capabilities >/dev/null 2>&1; do
    i=$((i + 1))
    if [ "$i" -gt 180 ]; then
        echo "podvisor: libvirtd did not come up" >&2
        exit 1
    fi
    sleep 1
done
virsh -c qemu:///system domcapabilities --virttype qemu >/dev/null 2>&1 || true
