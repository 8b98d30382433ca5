#!/bin/sh
# Build (or reuse) the Podvisor stock Debian 12 guest: images/debian/build.sh [OUTDIR]
# OUTDIR defaults to /var/cache/podvisor/images/debian. See README.md.
exec python3 "$(dirname "$0")/build.py" "$@"
