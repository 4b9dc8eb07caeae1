#!/usr/bin/env bash
# Builds the CPU Docker image (or with --gpu the GPU image) with podman and runs a check inside it (CI's
# container checks: `make docker-test`, `make docker-test-gpu`).
#
# Works on Debian 12 as root with no Docker engine and no registry:
#  - the base image debian:bullseye-slim is imported from the runtime's pristine debootstrap tarball
#    (made by `make env`), unless the image is already there (or a registry provides it: PULL=1);
#  - runc instead of crun ("cgroups in hybrid mode not supported"), raised ulimits (the hard open-files
#    limit is 20000 here), --root/--runroot on the command line (a custom storage.conf cost 20 s a run).
# Usage: podman-test.sh [COMMAND...]                 the CPU image ts-fcn:cpu; default COMMAND: make test
#        podman-test.sh --gpu [--bundle DIR] [COMMAND...]
#            the GPU image ts-fcn:gpu (Dockerfile.gpu): with --bundle (a folder or the file), it takes
#            caffe-cuda-sm90.tar.xz (make caffe-cuda) instead of compiling Caffe; the CUDA wheels of $TSFCN_CUDA_WHEELS (default
#            /var/cache/ts-fcn/cuda-wheels), when there, instead of downloading them. Default COMMAND:
#            bash tools/cuda/gpu-image-test.sh (what the image must do without a GPU).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
gpu=0
bundle=""
while [ $# -gt 0 ]; do
    case "$1" in
        --gpu) gpu=1 ;;
        --bundle) bundle=$2; shift ;;
        --bundle=*) bundle=${1#--bundle=} ;;
        *) break ;;
    esac
    shift
done
if [ "$gpu" = 1 ]; then image=${IMAGE:-ts-fcn:gpu}; else image=${IMAGE:-ts-fcn:cpu}; fi
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
build_args=()
if [ "$gpu" = 1 ]; then
    build_args=(-f "$repo/Dockerfile.gpu")
    if [ -n "$bundle" ]; then
        # The build context is the bundle alone (not the rest of its folder, e.g. build/cuda-runtime).
        if [ -d "$bundle" ]; then files=("$bundle"/caffe-cuda-sm*.tar.xz); else files=("$bundle"); fi
        [ -f "${files[0]}" ] || { log "no bundle caffe-cuda-sm*.tar.xz at $bundle (make caffe-cuda makes it)"; exit 1; }
        context=$(mktemp -d)
        cp -l "${files[@]}" "$context/" 2>/dev/null || cp "${files[@]}" "$context/"
        log "the bundle $(cd "$context" && ls) (no compile)"
        build_args+=(--build-context "bundle=$context")
    else
        log "no --bundle: the image compiles Caffe (~25 min on 2 cores)"
    fi
    # The pinned CUDA wheels already downloaded (tools/cuda/cuda-from-pypi.sh), and only those.
    wheels=${TSFCN_CUDA_WHEELS:-/var/cache/ts-fcn/cuda-wheels}
    wheel_context=$(mktemp -d)
    trap 'rm -rf "${context:-}" "$wheel_context"' EXIT
    for req in $(bash "$repo/tools/cuda/cuda-from-pypi.sh" requirements toolkit); do
        for w in "$wheels/$(sed 's/-/_/g; s/==/-/' <<<"$req")"-*.whl; do
            [ -f "$w" ] && { cp -l "$w" "$wheel_context/" 2>/dev/null || cp "$w" "$wheel_context/"; }
        done
    done
    if ls "$wheel_context"/*.whl >/dev/null 2>&1; then
        log "CUDA wheels from $wheels: $(ls "$wheel_context" | wc -l) of $(bash "$repo/tools/cuda/cuda-from-pypi.sh" requirements toolkit | wc -l)"
        build_args+=(--build-context "wheels=$wheel_context")
    fi
    [ -z "${CUDA_ARCH:-}" ] || build_args+=(--build-arg "CUDA_ARCH=$CUDA_ARCH")
fi
log "building $image"
pm build --pull=never "${cert_args[@]}" "${build_args[@]}" -t "$image" "$repo"
log "image built in $((SECONDS - t0)) s"

t0=$SECONDS
if [ $# -eq 0 ]; then
    if [ "$gpu" = 1 ]; then set -- bash tools/cuda/gpu-image-test.sh; else set -- make test; fi
fi
log "running in $image: $*"
pm run --rm --ulimit nofile=20000:20000 --ulimit nproc=20000:20000 ${CI:+-e CI=$CI} "$image" "$@"
log "container run done in $((SECONDS - t0)) s"
