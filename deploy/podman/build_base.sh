#!/usr/bin/env bash
# Builds localhost/tlserve-python-base, a stand-in for the Dockerfile's
# PYTHON_IMAGE (python:3.11-slim-bookworm) on machines that can reach Debian's
# and PyPI's package registries but no image registry: Debian bookworm's
# python3 (3.11) from debootstrap, with a venv first on PATH so that `pip` and
# `python` resolve to it as they do in the official image.
#
# pip inside `podman build` is configured like the host's pip: the same index
# (when the host sets one) and the host's CA bundle, which also trusts any
# TLS-intercepting proxy between this machine and the registry.
#
# Cached: does nothing when the image exists and was built by this very
# script (its hash is a label on the image). Needs root, podman, debootstrap.
set -euo pipefail

IMAGE=${TLSERVE_BASE_IMAGE:-localhost/tlserve-python-base:bookworm}
SUITE=bookworm
RECIPE=$(sha256sum "$0" | cut -c1-16)

if podman image exists "$IMAGE" \
    && [ "$(podman image inspect --format '{{index .Labels "tlserve.base-recipe"}}' "$IMAGE")" = "$RECIPE" ]; then
    echo "build_base: $IMAGE is up to date"
    exit 0
fi

# The Debian mirror apt uses on this machine (deb822 or one-line sources).
mirror() {
    local uri
    uri=$(grep -hsE '^URIs:.*/debian/?$' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | head -n1 || true)
    if [ -z "$uri" ]; then
        uri=$(grep -hsE '^deb +(\[[^]]*\] +)?[a-z]+://[^ ]*/debian/? ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
            | sed -E 's/^deb +(\[[^]]*\] +)?//' | awk '{print $1}' | head -n1 || true)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

# The host pip's setting for KEY ("" when unset), from PIP_* or pip's config files.
host_pip() {
    local key=$1 env
    env="PIP_$(echo "$key" | tr 'a-z-' 'A-Z_')"
    if [ -n "${!env:-}" ]; then
        echo "${!env}"
    elif command -v python3 >/dev/null && python3 -m pip --version >/dev/null 2>&1; then
        python3 -m pip config get "global.$key" 2>/dev/null || true
    fi
}

for tool in podman debootstrap chroot; do
    command -v "$tool" >/dev/null || { echo "build_base: $tool is missing (apt-get install podman runc debootstrap)" >&2; exit 1; }
done
WORK=$(mktemp -d /var/tmp/tlserve-base.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
ROOTFS=$WORK/rootfs
MIRROR=$(mirror)
echo "build_base: debootstrap $SUITE from $MIRROR"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -n 30 "$WORK/debootstrap.log"; exit 1; }

chroot "$ROOTFS" python3 -m venv /opt/python
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*

# The host's CA bundle becomes the image's: pip, and Python's ssl, trust what
# the host trusts.
CA=$(host_pip cert)
CA=${CA:-${REQUESTS_CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}}
if [ -f "$CA" ]; then
    cp "$CA" "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
fi
{
    echo "[global]"
    echo "cert = /etc/ssl/certs/ca-certificates.crt"
    index=$(host_pip index-url)
    if [ -n "$index" ]; then echo "index-url = $index"; fi
    # file:// indexes are the host's disk, not the build's: only remote ones carry over.
    extra=$(host_pip extra-index-url | tr ' ' '\n' | grep -E '^https?://' | tr '\n' ' ' || true)
    if [ -n "$extra" ]; then echo "extra-index-url = $extra"; fi
    trusted=$(host_pip trusted-host)
    if [ -n "$trusted" ]; then echo "trusted-host = $trusted"; fi
} >"$ROOTFS/etc/pip.conf"

tar --numeric-owner -C "$ROOTFS" -c . | podman import --quiet \
    --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change "LABEL tlserve.base-recipe=$RECIPE" \
    --change 'CMD ["python3"]' \
    - "$IMAGE" >/dev/null
echo "build_base: built $IMAGE ($(podman image inspect --format '{{.Size}}' "$IMAGE") bytes)"
