#!/usr/bin/env bash
# Builds the CPU Docker image with podman and runs the test suite inside it (CI's container check).
#
# Works on Debian 12 as root with no Docker engine and no registry:
#  - the base image debian:bullseye-slim is imported from the runtime's pristine debootstrap tarball
#    (made by `make env`), unless the image is already there (or a registry provides it: PULL=1);
#  - runc instead of crun ("cgroups in hybrid mode not supported"), raised ulimits (the hard open-files
#    limit is 20000 here), --root/--runroot on the command line (a custom storage.conf cost 20 s a run).
# Usage: podman-test.sh [COMMAND...]   (default: make test)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
image=${IMAGE:-ts-fcn:cpu}
store=${TSFCN_PODMAN_ROOT:-/var/cache/ts-fcn/podman}
rootfs=${TSFCN_ROOTFS:-/var/cache/ts-fcn/bullseye-$(uname -m)}
log() { echo "[podman-test] $*" >&2; }

command -v podman >/dev/null && command -v runc >/dev/null || {
    log "installing podman and runc"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc >/dev/null
}
pm() { podman --root "$store/root" --runroot "$store/run" --runtime=runc --cgroup-manager=cgroupfs "$@"; }

t0=$SECONDS
if ! pm image exists debian:bullseye-slim; then
    if [ "${PULL:-0}" = 1 ]; then
        pm pull docker.io/library/debian:bullseye-slim
    else
        [ -f "$rootfs.minbase.tar" ] || { log "no base tarball $rootfs.minbase.tar: run 'make env' first"; exit 1; }
        log "importing debian:bullseye-slim from $rootfs.minbase.tar"
        pm import "$rootfs.minbase.tar" debian:bullseye-slim >/dev/null
    fi
fi
log "base image ready in $((SECONDS - t0)) s"

t0=$SECONDS
cert_args=()
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cert_args=(-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro --build-arg PIP_CERT=/run/host-ca.crt)
fi
log "building $image"
pm build --pull=never "${cert_args[@]}" -t "$image" "$repo"
log "image built in $((SECONDS - t0)) s"

t0=$SECONDS
[ $# -gt 0 ] || set -- make test
log "running in $image: $*"
pm run --rm --ulimit nofile=20000:20000 --ulimit nproc=20000:20000 ${CI:+-e CI=$CI} "$image" "$@"
log "container run done in $((SECONDS - t0)) s"
