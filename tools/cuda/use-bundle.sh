#!/usr/bin/env bash
# Puts the CUDA Caffe bundle (build-caffe-cuda.sh's caffe-cuda-sm<ARCH>.tar.xz) to use.
#
#   use-bundle.sh unpack [BUNDLE] [--dest DIR]    unpack once (idempotent); prints the bundle folder
#   use-bundle.sh env [--dir DIR] [--portable] [--stage]
#                                                 prints `export ...` lines for eval: PATH gets the GPU
#                                                 `caffe`, PYTHONPATH its pycaffe, LD_LIBRARY_PATH the
#                                                 GPU machine's CUDA libraries. --portable: python3 is the
#                                                 bundle's own Python 3.9 (machines without the runtime).
#                                                 --stage: link/copy those CUDA libraries into DIR/host-cuda
#                                                 first, for a chroot that sees only DIR (runtime.sh).
#   use-bundle.sh cuda-libs [--dir DIR]           where each CUDA library the bundle needs was found
#   use-bundle.sh check [--dir DIR] [--gpu N]     caffe device_query and pycaffe in GPU mode; without a
#                                                 usable GPU: one line saying why, exit status 1
#   use-bundle.sh --help
#
# The CUDA libraries (libcudart.so.13, libcublas.so.13, libcublasLt.so.13, libcurand.so.10, the driver's
# libcuda.so.1) are looked up in: $TSFCN_CUDA_LIBS (colon-separated), $CUDA_HOME, /usr/local/cuda*,
# the pip wheels nvidia-* of any python3 on PATH, ldconfig's cache, /usr/lib/x86_64-linux-gnu, WSL.
# Defaults: BUNDLE build/caffe-cuda-sm${CUDA_ARCH:-90}.tar.xz of the checkout; DIR $TSFCN_CUDA_BUNDLE_DIR,
# else the folder this script sits in when it is inside an unpacked bundle, else
# /var/cache/ts-fcn/caffe-cuda-sm${CUDA_ARCH:-90}.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
arch=${CUDA_ARCH:-90}
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
log() { echo "[use-bundle] $*" >&2; }
die() { log "error: $*"; exit 1; }

default_dir() {
    if [ -n "${TSFCN_CUDA_BUNDLE_DIR:-}" ]; then echo "$TSFCN_CUDA_BUNDLE_DIR"
    elif [ -f "$here/BUNDLE.json" ]; then echo "$here"
    else echo "/var/cache/ts-fcn/caffe-cuda-sm$arch"; fi
}

do_unpack() {
    local bundle="" dest=""
    while [ $# -gt 0 ]; do
        case "$1" in --dest) dest=$2; shift ;; -*) usage >&2; exit 2 ;; *) bundle=$1 ;; esac; shift
    done
    bundle=${bundle:-$here/../../build/caffe-cuda-sm$arch.tar.xz}
    [ -f "$bundle" ] || die "no bundle $bundle: run 'make caffe-cuda CUDA_ARCH=$arch' first"
    dest=${dest:-$(default_dir)}
    local sum; sum=$(sha256sum "$bundle" | cut -c1-16)
    if [ -f "$dest/.bundle-sha" ] && [ "$(cat "$dest/.bundle-sha")" = "$sum" ]; then echo "$dest"; return; fi
    log "unpacking $bundle into $dest"
    mkdir -p "$(dirname "$dest")"
    local tmp; tmp=$(mktemp -d "$(dirname "$dest")/.unpack.XXXXXX")
    if command -v xz >/dev/null; then
        tar -C "$tmp" -xJf "$bundle"
    elif command -v python3 >/dev/null; then    # no xz-utils (a minimal system): Python's lzma
        python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$bundle" "$tmp"
    else
        rm -rf "$tmp"; die "unpacking $bundle needs xz (xz-utils) or python3"
    fi || { rm -rf "$tmp"; die "could not unpack $bundle"; }
    local top; top=$(ls "$tmp")
    [ -f "$tmp/$top/BUNDLE.json" ] || { rm -rf "$tmp"; die "$bundle is not a CUDA Caffe bundle"; }
    echo "$sum" >"$tmp/$top/.bundle-sha"
    rm -rf "$dest" && mv "$tmp/$top" "$dest" && rmdir "$tmp"
    echo "$dest"
}

# The sonames the bundle needs from the GPU machine.
needed() {
    local dir=$1
    python3 -c 'import json,sys; print("\n".join(json.load(open(sys.argv[1]))["cuda_sonames_needed"]))' \
        "$dir/BUNDLE.json" 2>/dev/null ||
        printf '%s\n' libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcuda.so.1
}

search_dirs() {
    local d py
    IFS=: read -r -a d <<<"${TSFCN_CUDA_LIBS:-}"
    printf '%s\n' "${d[@]}"
    for d in ${CUDA_HOME:+"$CUDA_HOME"} /usr/local/cuda /usr/local/cuda-*; do
        printf '%s\n' "$d/lib64" "$d/lib" "$d/targets/x86_64-linux/lib"
    done
    for py in $(command -v -a python3 python3.12 python3.11 python3.10 2>/dev/null | sort -u); do
        "$py" -c 'import site; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null |
            while read -r d; do ls -d "$d"/nvidia/*/lib 2>/dev/null || true; done
    done
    ldconfig -p 2>/dev/null | awk -F'=> ' '/libcu(da|dart|blas|rand)\.so/ { print $2 }' | xargs -r -n1 dirname
    printf '%s\n' /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib/wsl/lib
}

# "soname path" for every needed library (path empty when not found).
find_libs() {
    local dir=$1 so d found
    mapfile -t dirs < <(search_dirs | awk 'NF && !seen[$0]++')
    for so in $(needed "$dir"); do
        found=""
        for d in "${dirs[@]}"; do [ -e "$d/$so" ] && { found=$d/$so; break; }; done
        echo "$so $found"
    done
}

do_cuda_libs() {
    local dir; dir=$(parse_dir "$@")
    find_libs "$dir" | while read -r so path; do echo "$so ${path:-NOT FOUND}"; done
}

parse_dir() {
    local dir=""
    while [ $# -gt 0 ]; do case "$1" in --dir) dir=$2; shift ;; esac; shift; done
    echo "${dir:-$(default_dir)}"
}

do_env() {
    local dir="" portable=0 stage=0
    while [ $# -gt 0 ]; do
        case "$1" in --dir) dir=$2; shift ;; --portable) portable=1 ;; --stage) stage=1 ;; *) usage >&2; exit 2 ;; esac
        shift
    done
    dir=${dir:-$(default_dir)}
    [ -f "$dir/BUNDLE.json" ] || die "no unpacked bundle in $dir (use-bundle.sh unpack)"
    local libdirs="" missing="" so path
    while read -r so path; do
        [ -n "$path" ] || { missing="$missing $so"; continue; }
        if [ "$stage" = 1 ]; then
            mkdir -p "$dir/host-cuda"
            # Hard link where the file system allows, else a copy (the chroot cannot follow symlinks out).
            [ -e "$dir/host-cuda/$so" ] || cp -L --link "$path" "$dir/host-cuda/$so" 2>/dev/null ||
                cp -L "$path" "$dir/host-cuda/$so"
            if [ "$so" = libcuda.so.1 ]; then    # the driver's PTX JIT, for GPUs newer than the bundle's SASS
                for f in "$(dirname "$path")"/libnvidia-{ptxjitcompiler,nvvm}.so.*; do
                    [ -e "$f" ] && { [ -e "$dir/host-cuda/$(basename "$f")" ] || cp -L "$f" "$dir/host-cuda/"; }
                done
            fi
        else
            case ":$libdirs:" in *":$(dirname "$path"):"*) ;; *) libdirs="${libdirs:+$libdirs:}$(dirname "$path")" ;; esac
        fi
    done < <(find_libs "$dir")
    [ "$stage" = 1 ] && libdirs=$dir/host-cuda
    [ -z "$missing" ] || log "warning: not found on this machine:$missing (set TSFCN_CUDA_LIBS=dir:dir)"
    local bin=$dir/bin
    # The portable Python's extension modules (numpy, h5py, lib-dynload) find their libraries in lib/.
    [ "$portable" = 1 ] && bin=$dir/bin:$dir/py && libdirs="$libdirs:$dir/lib"
    echo "export TSFCN_CUDA_BUNDLE_DIR='$dir'"
    echo "export TSFCN_CUDA_BIN='$bin' TSFCN_CUDA_LD='$libdirs' TSFCN_CUDA_PY='$dir/python'"
    echo "export PATH='$bin':\"\$PATH\""
    echo "export LD_LIBRARY_PATH='$libdirs'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
    echo "export PYTHONPATH='$dir/python'\${PYTHONPATH:+:\$PYTHONPATH}"
}

do_check() {
    local dir="" gpu=0
    while [ $# -gt 0 ]; do case "$1" in --dir) dir=$2; shift ;; --gpu) gpu=$2; shift ;; esac; shift; done
    dir=${dir:-$(default_dir)}
    # The bundle's own Python where it still has one (the GPU image drops it for the system's).
    eval "$(do_env --dir "$dir" $([ -x "$dir/py/python3" ] && echo --portable))"
    local out rc=0
    out=$(GLOG_minloglevel=0 GLOG_logtostderr=1 caffe device_query -gpu "$gpu" 2>&1) || rc=$?
    if [ "$rc" != 0 ]; then
        # Caffe aborts through glog with a stack trace: one line instead, with what it means.
        local why hint=""
        why=$(sed -n 's/^.*Check failed: //p' <<<"$out" | head -1 | tr -s ' ')
        [ -n "$why" ] || why=$(grep -v '^\s*@\|^\*\*\*' <<<"$out" | tail -1)
        case "$(find_libs "$dir" | awk '$1 == "libcuda.so.1" { print $2 }')" in
            "") hint="; no NVIDIA driver here (libcuda.so.1 not found)" ;;
            *) hint="; the driver must support CUDA $(cuda_major "$dir") (nvidia-smi shows it)" ;;
        esac
        case "$out" in *"no CUDA-capable device"*) hint="; the driver sees no GPU" ;; esac
        die "GPU $gpu is not usable: caffe device_query failed (exit $rc): ${why:-no output}$hint"
    fi
    grep -E 'Name|Major|Minor|Total global' <<<"$out" | sed 's/^.*\] *//'
    python3 -c "import caffe, sys; caffe.set_device($gpu); caffe.set_mode_gpu(); print('pycaffe GPU mode ok', caffe.__file__, sys.version.split()[0])"
}

# The CUDA major version the bundle was built with.
cuda_major() {
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["cuda_built_with"].split(".")[0])' \
        "$1/BUNDLE.json" 2>/dev/null || echo 13
}

cmd=${1:---help}
shift || true
case "$cmd" in
    unpack) do_unpack "$@" ;;
    env) do_env "$@" ;;
    cuda-libs) do_cuda_libs "$@" ;;
    check) do_check "$@" ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
esac
