#!/usr/bin/env bash
# Puts podman, runc and debootstrap on this machine where they are missing, for
# `make image-test` (Debian's packages, as root). Where they cannot be had, it
# says so and exits 0: tests/deploy/test_image.py then skips, saying why.
set -euo pipefail

missing=()
for tool in podman runc debootstrap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "image-test: ${missing[*]} missing and not installable here (needs root and apt-get): the image tests will skip" >&2
    exit 0
fi
echo "image-test: installing ${missing[*]} with apt-get"
if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc debootstrap; } >/tmp/tlserve-image-test-apt.log 2>&1; then
    tail -n 20 /tmp/tlserve-image-test-apt.log >&2
    echo "image-test: apt-get could not install podman runc debootstrap: the image tests will skip" >&2
fi
