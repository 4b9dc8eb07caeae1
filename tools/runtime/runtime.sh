#!/usr/bin/env bash
# The Caffe runtime: where the toolkit's commands run.
#
#   runtime.sh ensure            make the Debian 11 root filesystem with Caffe, once (idempotent)
#   runtime.sh exec CMD...       run CMD with the toolkit's environment, natively where `import caffe`
#                                works (Docker image, own Caffe build), else inside the root filesystem
#   runtime.sh status            say which runtime is in use and where
#   runtime.sh --help
#
# Inside the root filesystem every command runs through chroot in a private mount namespace
# (unshare -m): /proc, /dev, /sys, /tmp and the checkout are bind-mounted at the same paths, plus any
# path in TSFCN_BIND (colon-separated). The kernel drops those mounts when the last process of the
# namespace ends, so Ctrl-C, a failing command or a kill never leaves a mount behind.
#
# Settings (environment):
#   TSFCN_ROOTFS   the root filesystem      (default /var/cache/ts-fcn/bullseye-$(uname -m))
#   TSFCN_MIRROR   Debian mirror for bullseye (default http://deb.debian.org/debian; when bullseye moves
#                  to the archive, use http://archive.debian.org/debian)
#   TSFCN_NATIVE   1: require native Caffe, 0: always use the root filesystem (default: auto)
#   TSFCN_BLAS_CORE  OpenBLAS core to force (e.g. Haswell); default: the best that passes the self-check
#   TSFCN_GPU      set (the Makefile sets it from GPU=/GPUS=): commands inside the root filesystem use the
#                  CUDA Caffe bundle of `make caffe-cuda` (TSFCN_CUDA_BUNDLE, default
#                  build/caffe-cuda-sm${CUDA_ARCH:-90}.tar.xz) instead of Debian's CPU-only Caffe
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
rootfs=${TSFCN_ROOTFS:-/var/cache/ts-fcn/bullseye-$(uname -m)}
mirror=${TSFCN_MIRROR:-http://deb.debian.org/debian}
owned="$rootfs/.ts-fcn-rootfs"                 # written first: this folder is ours to delete
bootstrapped="$rootfs/.ts-fcn-debootstrap-done"
ready="$rootfs/.ts-fcn-ready"

usage() { sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
log() { echo "[runtime] $*" >&2; }

# The recipe's fingerprint: a change to the install script or its requirements reinstalls.
recipe_files=(install-deps.sh requirements.txt caffe_parallel_math.cpp)
recipe_hash() { (cd "$here" && cat "${recipe_files[@]}") | sha256sum | cut -c1-16; }

native_available() {
    case "${TSFCN_NATIVE:-auto}" in
        1) return 0 ;;
        0) return 1 ;;
    esac
    python3 -c 'import caffe' >/dev/null 2>&1
}

# Run "$@" inside the root filesystem, in a private mount namespace.
in_rootfs() {
    local binds="$repo:/tmp:${TSFCN_BIND:-}"
    unshare --mount --propagation private -- bash -eu -c '
        rootfs=$1; binds=$2; shift 2
        mount -t proc proc "$rootfs/proc"
        mount --rbind /dev "$rootfs/dev"
        mount --rbind /sys "$rootfs/sys"
        IFS=:
        for p in $binds; do
            [ -n "$p" ] || continue
            # An output folder not made yet: bind the nearest existing parent (never /).
            while [ ! -e "$p" ] && [ "$p" != / ]; do p=$(dirname "$p"); done
            [ "$p" != / ] || continue
            p=$(realpath "$p")
            if [ -d "$p" ]; then mkdir -p "$rootfs$p"; else mkdir -p "$rootfs$(dirname "$p")"; touch "$rootfs$p"; fi
            mount --rbind "$p" "$rootfs$p"
        done
        cp -L /etc/resolv.conf "$rootfs/etc/resolv.conf" 2>/dev/null || true
        exec chroot "$rootfs" "$@"
    ' bash "$rootfs" "$binds" "$@"
}

do_debootstrap() {
    command -v debootstrap >/dev/null || {
        log "installing debootstrap"
        apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
    }
    log "debootstrap bullseye (minbase) from $mirror into $rootfs"
    if [ -e "$rootfs" ] && [ ! -e "$owned" ] && [ -n "$(ls -A "$rootfs")" ]; then
        log "$rootfs exists and is not a TS-FCN root filesystem: refusing to replace it (set TSFCN_ROOTFS)"
        exit 1
    fi
    [ -e "$rootfs" ] && log "found an interrupted root filesystem: starting over"
    rm -rf "$rootfs"
    mkdir -p "$rootfs"
    touch "$owned"
    local t0=$SECONDS
    debootstrap --variant=minbase bullseye "$rootfs" "$mirror" >"$rootfs.debootstrap.log" 2>&1 || {
        tail -20 "$rootfs.debootstrap.log" >&2
        log "debootstrap failed (full log: $rootfs.debootstrap.log)"
        exit 1
    }
    echo "deb $mirror bullseye main" >"$rootfs/etc/apt/sources.list"
    # A pristine copy of the base system: the CI builds its container base image from it.
    tar -C "$rootfs" -cf "$rootfs.minbase.tar.partial" --exclude=./.ts-fcn-debootstrap-done --exclude=./.ts-fcn-rootfs . &&
        mv "$rootfs.minbase.tar.partial" "$rootfs.minbase.tar"
    touch "$bootstrapped"
    log "debootstrap done in $((SECONDS - t0)) s"
}

do_install() {
    local t0=$SECONDS
    log "installing Caffe and the Python dependencies (tools/runtime/install-deps.sh)"
    mkdir -p "$rootfs/opt/ts-fcn-runtime"
    (cd "$here" && cp "${recipe_files[@]}" "$rootfs/opt/ts-fcn-runtime/")
    local cert=""
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
        # Host CA bundle for pip, in case the network intercepts TLS.
        cp /etc/ssl/certs/ca-certificates.crt "$rootfs/opt/ts-fcn-runtime/host-ca.crt"
        cert=/opt/ts-fcn-runtime/host-ca.crt
    fi
    in_rootfs /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        ${cert:+PIP_CERT=$cert} sh /opt/ts-fcn-runtime/install-deps.sh
    log "packages installed in $((SECONDS - t0)) s; size $(du -sh --exclude=./proc --exclude=./sys --exclude=./dev "$rootfs" 2>/dev/null | cut -f1)"
}

do_ensure() {
    if native_available; then
        log "native Caffe found ($(command -v python3)); no root filesystem needed"
        return
    fi
    [ "$(id -u)" = 0 ] || { log "making the runtime needs root (debootstrap, chroot); or use the Docker image"; exit 1; }
    mkdir -p "$(dirname "$rootfs")"
    exec 9>"$rootfs.lock"
    flock 9
    local want; want=$(recipe_hash)
    if [ -f "$ready" ] && [ "$(cat "$ready")" = "$want" ]; then
        log "runtime ready: $rootfs"
        return
    fi
    [ -f "$bootstrapped" ] || do_debootstrap      # absent or interrupted: start over
    rm -f "$ready"
    do_install
    echo "$want" >"$ready"
    blas_report
}

blas_report() {
    # Chooses the OpenBLAS core and whether to preload the parallel math library now (self-checks +
    # speed) and caches both for later commands.
    run_env python3 "$repo/tools/runtime/blas_core.py" --refresh
    run_env python3 "$repo/tools/runtime/parallel_math.py" --refresh
}

# GPU runs in the root filesystem: unpack the CUDA bundle once and stage the host's CUDA and driver
# libraries beside it (the chroot sees only bound paths); sets gpu_path/gpu_ld/gpu_py for run_env.
gpu_path="" gpu_ld="" gpu_py=""
gpu_setup() {
    [ -n "${TSFCN_GPU:-}" ] || return 0
    local bundle=${TSFCN_CUDA_BUNDLE:-$repo/build/caffe-cuda-sm${CUDA_ARCH:-90}.tar.xz} dir
    if [ -z "${TSFCN_CUDA_BUNDLE_DIR:-}" ]; then
        [ -f "$bundle" ] || { log "GPU=$TSFCN_GPU needs a CUDA build of Caffe: run 'make caffe-cuda' (or set TSFCN_CUDA_BUNDLE)"; exit 1; }
        dir=$(bash "$repo/tools/cuda/use-bundle.sh" unpack "$bundle")
    else
        dir=$TSFCN_CUDA_BUNDLE_DIR
    fi
    eval "$(bash "$repo/tools/cuda/use-bundle.sh" env --dir "$dir" --stage)"
    TSFCN_BIND="${TSFCN_BIND:-}:$dir"
    gpu_path="$TSFCN_CUDA_BIN:" gpu_ld="$TSFCN_CUDA_LD" gpu_py="$TSFCN_CUDA_PY:"
}

# The environment every toolkit command sees.
run_env() {
    local pp="$repo/layers:$repo"
    if native_available; then
        PYTHONPATH="$pp${PYTHONPATH:+:$PYTHONPATH}" TSFCN_REPO="$repo" \
            bash -c 'eval "$(python3 "$TSFCN_REPO/tools/runtime/blas_core.py" --env)" && eval "$(python3 "$TSFCN_REPO/tools/runtime/parallel_math.py" --env)"; exec "$@"' bash "$@"
    else
        [ -f "$ready" ] || { log "no runtime yet: run 'make env' first"; exit 1; }
        gpu_setup
        in_rootfs /usr/bin/env -i PATH=${gpu_path}/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            ${gpu_ld:+LD_LIBRARY_PATH=$gpu_ld} ${TSFCN_GPU:+TSFCN_GPU=$TSFCN_GPU} \
            HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}" PYTHONPATH="$gpu_py$pp" TSFCN_REPO="$repo" \
            PYTHONDONTWRITEBYTECODE=1 MPLBACKEND=Agg GLOG_minloglevel="${GLOG_minloglevel:-1}" \
            ${TSFCN_BLAS_CORE:+TSFCN_BLAS_CORE=$TSFCN_BLAS_CORE} ${OMP_NUM_THREADS:+OMP_NUM_THREADS=$OMP_NUM_THREADS} \
            ${OPENBLAS_NUM_THREADS:+OPENBLAS_NUM_THREADS=$OPENBLAS_NUM_THREADS} ${CI:+CI=$CI} \
            ${CUDA_VISIBLE_DEVICES+CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES} \
            bash -c 'cd "$0" && eval "$(python3 "$TSFCN_REPO/tools/runtime/blas_core.py" --env)" && eval "$(python3 "$TSFCN_REPO/tools/runtime/parallel_math.py" --env)" && exec "$@"' "$PWD" "$@"
    fi
}

cmd=${1:---help}
shift || true
case "$cmd" in
    ensure) do_ensure ;;
    exec) [ $# -gt 0 ] || { usage; exit 2; }; run_env "$@" ;;
    status)
        if native_available; then echo "native: $(python3 -c 'import caffe,sys; print(sys.executable, caffe.__file__)')"
        elif [ -f "$ready" ]; then echo "rootfs: $rootfs (recipe $(cat "$ready"))"
        else echo "none: run 'make env'"; fi ;;
    -h|--help|help) usage ;;
    *) usage; exit 2 ;;
esac
