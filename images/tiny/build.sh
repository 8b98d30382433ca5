#!/bin/sh
# Build (or reuse) the Podvisor tiny test guest: images/tiny/build.sh [OUTDIR]
# OUTDIR defaults to /var/cache/podvisor/images/tiny. See README.md.
exec python3 "$(dirname "$0")/build.py" "$@"
