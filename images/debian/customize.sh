#!/bin/sh
# mmdebstrap --customize-hook for the Podvisor Debian guest: $1 is the root
# directory, after every package is installed. Runs on the build host as root.
set -eu
root="$1"

# A login prompt on the serial console (the container log shows it).
chroot "$root" systemctl enable serial-getty@ttyS0.service
# qemu-guest-agent needs no enabling: the package's udev rule starts it when
# the org.qemu.guest_agent.0 virtio port appears (and stops it without one).

# cloud-init's locale module sets LANG=en_US.UTF-8 (its Debian default) and
# fails unless that locale exists: generate it, as Debian's installer would.
sed -i 's/^# *\(en_US.UTF-8 UTF-8\)/\1/' "$root/etc/locale.gen"
chroot "$root" locale-gen
echo 'LANG=en_US.UTF-8' > "$root/etc/default/locale"

echo debian > "$root/etc/hostname"
cat > "$root/etc/hosts" <<'HOSTS'
127.0.0.1	localhost
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
HOSTS

# Per-instance identity is made at first boot: systemd writes the machine ID,
# cloud-init generates (or receives) the SSH host keys.
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
rm -f "$root"/etc/ssh/ssh_host_*

# resolvconf kept the build host's resolv.conf (mmdebstrap's copy) as
# "original", which it would add to every guest's resolv.conf.
rm -f "$root/etc/resolvconf/resolv.conf.d/original"

# No package lists, caches or logs from the build.
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
mkdir -p "$root/var/lib/apt/lists/partial"
find "$root/var/log" -type f -exec truncate -s 0 {} +
rm -rf "$root"/tmp/* "$root"/var/tmp/*
