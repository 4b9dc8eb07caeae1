#!/usr/bin/env bash
# Builds BVLC Caffe 1.0 with CUDA for current GPUs, from Debian 11's `caffe` source package, and packs
# it as a relocatable bundle build/caffe-cuda-sm<ARCH>.tar.xz (tools/cuda/use-bundle.sh puts it to use).
#
#   build-caffe-cuda.sh [options] ARCH...     e.g. 90 (H100/H200), 80 (A100), 89 (L4/RTX 40), 120
#
# On the host (default) the build runs in its own Debian 11 root filesystem, made once from the runtime's
# pristine debootstrap tarball (or by debootstrap) and entered with unshare + chroot, so the runtime the
# toolkit's Python sees stays untouched. The CUDA toolkit is the host's (nvcc; CUDA 13 or 12) and is
# bind-mounted at /usr/local/cuda; where it lacks cuBLAS/cuRAND, they come from the pinned PyPI wheels
# (tools/cuda/cuda-from-pypi.sh math). A host without nvcc gets the whole toolkit from those wheels
# (cuda-from-pypi.sh toolkit), so any x86-64 Linux machine with python3 and pip can build the bundle.
# With --native the build runs in the current system, which must be Debian 11 with the toolkit at
# $CUDA_HOME (the GPU Docker image's build stage does that).
# Every step is idempotent: build deps, the source package and the wheels are fetched once.
# The project's changes to Caffe are the patches in tools/cuda/patches/ (see the README there).
#
# Options:
#   --native        build in this system (Debian 11, root), not in the build root filesystem
#   --prepare-only  install the build deps and fetch the source package, then stop (no compile)
#   --pack-only     pack the bundle again from the last compile of these architectures (no compile)
#   --out DIR       where the bundle goes (default: build/ in the checkout)
#   --jobs N        parallel compile jobs (default: nproc)
#   -h, --help      this text
# Environment:
#   CUDA_HOME            the CUDA toolkit (default: found from `nvcc` on PATH, else /usr/local/cuda if it
#                        has nvcc, else the pinned PyPI release unpacked in $TSFCN_CUDA_PYPI_HOME)
#   TSFCN_CUDA_BUILDROOT the build root filesystem (default /var/cache/ts-fcn/caffe-cuda-build)
#   TSFCN_MINBASE        pristine bullseye tarball (default /var/cache/ts-fcn/bullseye-$(uname -m).minbase.tar)
#   TSFCN_MIRROR         Debian mirror (default http://deb.debian.org/debian)
#   TSFCN_CUDA_WHEELS    where the CUDA wheels and the bundle's pure-Python wheels are kept
#                        (default /var/cache/ts-fcn/cuda-wheels)
#   TSFCN_CUDA_PYPI_HOME the toolkit from PyPI, when the host has no nvcc (default: beside the wheels)
#   NICE                 niceness of the compile (default 10)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
buildroot=${TSFCN_CUDA_BUILDROOT:-/var/cache/ts-fcn/caffe-cuda-build}
minbase=${TSFCN_MINBASE:-/var/cache/ts-fcn/bullseye-$(uname -m).minbase.tar}
mirror=${TSFCN_MIRROR:-http://deb.debian.org/debian}
wheels=${TSFCN_CUDA_WHEELS:-/var/cache/ts-fcn/cuda-wheels}
export TSFCN_CUDA_WHEELS=$wheels
pypi_home=${TSFCN_CUDA_PYPI_HOME:-$(dirname "$wheels")/cuda-$(bash "$here/cuda-from-pypi.sh" release)-pypi}
nice_level=${NICE:-10}
# Inside the build root (and in --native mode) the work happens here.
work=/opt/ts-fcn-cuda

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
log() { echo "[caffe-cuda] $*" >&2; }
die() { log "error: $*"; exit 1; }

native=0
prepare_only=0
pack_only=0
out=""
jobs=$(nproc)
archs=()
while [ $# -gt 0 ]; do
    case "$1" in
        --native) native=1 ;;
        --prepare-only) prepare_only=1 ;;
        --pack-only) pack_only=1 ;;
        --out) out=$2; shift ;;
        --jobs) jobs=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) usage >&2; exit 2 ;;
        *) [[ "$1" =~ ^[0-9]+[af]?$ ]] || die "architecture '$1' is not like 90 or 120"; archs+=("$1") ;;
    esac
    shift
done
[ ${#archs[@]} -gt 0 ] || { usage >&2; exit 2; }
out=$(mkdir -p "${out:-$repo/build}" && cd "${out:-$repo/build}" && pwd)
tag="sm$(IFS=_; echo "${archs[*]}")"
bundle="$out/caffe-cuda-$tag.tar.xz"

# ---------------------------------------------------------------------------------------------------
# Host side: the CUDA toolkit, the cuBLAS/cuRAND wheels, the build root, then this script inside it.

find_cuda_home() {
    if [ -n "${CUDA_HOME:-}" ]; then echo "$CUDA_HOME"; return; fi
    if command -v nvcc >/dev/null; then
        # nvcc may be a wrapper script: ask it where its toolkit is.
        local top
        top=$(nvcc -dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
        [ -n "$top" ] && { (cd "$top" && pwd); return; }
    fi
    if [ -x /usr/local/cuda/bin/nvcc ]; then echo /usr/local/cuda; return; fi
    log "no nvcc on this machine: the CUDA toolkit from PyPI ($pypi_home)"
    bash "$here/cuda-from-pypi.sh" toolkit "$pypi_home" >&2
    echo "$pypi_home"
}

# cuBLAS/cuRAND headers and libraries when the toolkit has none: the pinned PyPI wheels, unpacked under $1.
cuda_math_libs() {
    local dest=$1 major=$2
    [ "$major" = "$(bash "$here/cuda-from-pypi.sh" release | cut -d. -f1)" ] ||
        die "the CUDA $major toolkit in $cuda has no cuBLAS/cuRAND: install them, or build with the pinned CUDA from PyPI (CUDA_HOME=$pypi_home after 'bash tools/cuda/cuda-from-pypi.sh toolkit $pypi_home')"
    bash "$here/cuda-from-pypi.sh" math "$dest"
}

# The pure-Python packages the bundle carries beyond Debian's (pack-bundle.sh PY_WHEELS), at the
# versions the runtime pins (tools/runtime/requirements.txt), as wheels in $1.
py_wheels() {
    local dest=$1 name req
    mkdir -p "$dest" "$wheels"
    for name in $(sed -n 's/^PY_WHEELS="\(.*\)"/\1/p' "$here/pack-bundle.sh"); do
        req=$(grep -i "^$name==" "$repo/tools/runtime/requirements.txt") || die "$name is not pinned in requirements.txt"
        cp "$(bash "$here/cuda-from-pypi.sh" download "$req")" "$dest/"
    done
}

# Run "$@" inside the build root, in a private mount namespace (as tools/runtime/runtime.sh does).
in_buildroot() {
    local cuda=$1; shift
    unshare --mount --propagation private -- bash -eu -c '
        root=$1; repo=$2; cuda=$3; out=$4; shift 4
        mount -t proc proc "$root/proc"
        mount --rbind /dev "$root/dev"
        mount --rbind /sys "$root/sys"
        mkdir -p "$root$repo" "$root/usr/local/cuda" "$root/tmp"
        mount --rbind "$repo" "$root$repo"
        mkdir -p "$root$out" && mount --rbind "$out" "$root$out"    # the bundle lands on the host
        mount --rbind -o ro "$cuda" "$root/usr/local/cuda"
        cp -L /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
        exec chroot "$root" "$@"
    ' bash "$buildroot" "$repo" "$cuda" "$out" "$@"
}

host_main() {
    [ "$(id -u)" = 0 ] || die "needs root (unshare, chroot); or use Dockerfile.gpu"
    local cuda; cuda=$(find_cuda_home)
    cuda=$(cd "$cuda" && pwd -P)
    [ -x "$cuda/bin/nvcc" ] || die "no nvcc in $cuda/bin: set CUDA_HOME or put nvcc on PATH"
    local version major
    version=$("$cuda/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
    major=${version%%.*}
    log "CUDA toolkit $cuda (nvcc $version); architectures ${archs[*]}; bundle $bundle"

    mkdir -p "$(dirname "$buildroot")"
    exec 9>"$buildroot.lock"
    flock 9
    if [ ! -f "$buildroot/.ts-fcn-base" ]; then
        rm -rf "$buildroot" && mkdir -p "$buildroot"
        if [ -f "$minbase" ]; then
            log "build root $buildroot from $minbase"
            tar -C "$buildroot" -xf "$minbase"
        else
            command -v debootstrap >/dev/null || {
                apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
            }
            log "debootstrap bullseye (minbase) into $buildroot"
            debootstrap --variant=minbase bullseye "$buildroot" "$mirror" >"$buildroot.debootstrap.log" 2>&1 ||
                { tail -20 "$buildroot.debootstrap.log" >&2; die "debootstrap failed"; }
        fi
        touch "$buildroot/.ts-fcn-base"
    fi
    printf 'deb %s bullseye main\ndeb-src %s bullseye main\n' "$mirror" "$mirror" >"$buildroot/etc/apt/sources.list"

    local extra=""
    if [ ! -f "$cuda/include/cublas_v2.h" ] && [ ! -f "$cuda/targets/x86_64-linux/include/cublas_v2.h" ]; then
        cuda_math_libs "$buildroot/opt/nvidia-math" "$major"
        extra=/opt/nvidia-math
    fi
    py_wheels "$buildroot$work/py-wheels"
    in_buildroot "$cuda" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 CUDA_HOME=/usr/local/cuda TSFCN_CUDA_EXTRA="$extra" NICE="$nice_level" \
        TSFCN_MIRROR="$mirror" \
        bash "$here/build-caffe-cuda.sh" --native $([ "$prepare_only" = 1 ] && echo --prepare-only) \
        $([ "$pack_only" = 1 ] && echo --pack-only) --out "$out" --jobs "$jobs" "${archs[@]}"
}

# ---------------------------------------------------------------------------------------------------
# Inside Debian 11: build deps, the source package, the patches, cmake, the bundle.

build_deps() {
    local want="caffe build-dep + cmake patchelf xz-utils file python3-tqdm python3-scipy python3-pip libopenblas0-pthread (v4)"
    [ -f "$work/.deps" ] && [ "$(cat "$work/.deps")" = "$want" ] && return
    export DEBIAN_FRONTEND=noninteractive
    grep -q '^deb-src ' /etc/apt/sources.list ||
        echo "deb-src ${TSFCN_MIRROR:-http://deb.debian.org/debian} bullseye main" >>/etc/apt/sources.list
    log "installing the build dependencies of Debian's caffe (apt-get build-dep)"
    apt-get update -q >/dev/null
    apt-get build-dep -y -q --no-install-recommends --arch-only caffe >/dev/null    # not the docs (doxygen-latex: TeX)
    apt-get install -y -q --no-install-recommends cmake patchelf xz-utils file dpkg-dev ca-certificates \
        python3-numpy python3-protobuf python3-six python3-h5py python3-tqdm python3-scipy python3-pip >/dev/null
    # OpenBLAS as libblas.so.3 (Debian's alternatives pick it over the reference BLAS): the bundle's
    # CPU mode (the proof's CPU half, CPU vs GPU) runs several times faster with it.
    apt-get install -y -q --no-install-recommends libopenblas0-pthread >/dev/null
    echo "$want" >"$work/.deps"
}

fetch_source() {
    if [ -f "$work/src/.ts-fcn-extracted" ]; then return; fi
    log "fetching Debian 11's caffe source package (apt-get source)"
    rm -rf "$work/src" && mkdir -p "$work/src"
    (cd "$work/src" && apt-get source -q --download-only caffe >/dev/null &&
        dpkg-source -x --no-check ./caffe_*.dsc caffe >/dev/null)    # applies debian/patches
    touch "$work/src/.ts-fcn-extracted"
}

cuda_cmake_flags() {
    local bin="" ptx="" a
    for a in "${archs[@]}"; do bin="$bin $a"; done
    ptx=${archs[-1]}    # PTX for the newest architecture asked: future GPUs JIT-compile it
    echo "-DCUDA_ARCH_NAME=Manual" "-DCUDA_ARCH_BIN=${bin# }" "-DCUDA_ARCH_PTX=$ptx"
}

native_main() {
    grep -q 'VERSION_CODENAME=bullseye' /etc/os-release || die "--native needs Debian 11 (bullseye)"
    local cuda=${CUDA_HOME:-/usr/local/cuda}
    [ -x "$cuda/bin/nvcc" ] || die "no nvcc in $cuda/bin (set CUDA_HOME)"
    mkdir -p "$work"
    local t0=$SECONDS
    build_deps
    fetch_source
    log "build deps and source ready ($((SECONDS - t0)) s)"
    [ "$prepare_only" = 1 ] && return
    # The bundle's pure-Python packages: put there by the host side, else fetched here (Docker build).
    ls "$work"/py-wheels/*.whl >/dev/null 2>&1 || py_wheels "$work/py-wheels"

    local src="$work/build-$tag"
    local extra=${TSFCN_CUDA_EXTRA:-}
    if [ "$pack_only" = 1 ]; then
        [ -x "$src/_build/tools/caffe" ] || die "--pack-only: no finished compile in $src"
        bash "$here/pack-bundle.sh" "$src" "$bundle" "$tag" "$extra" "$work/py-wheels"
        log "done in $((SECONDS - t0)) s: $bundle ($(du -h "$bundle" | cut -f1))"
        return
    fi
    rm -rf "$src" && cp -a "$work/src/caffe" "$src"
    local p
    for p in "$here"/patches/*.patch; do
        log "patch $(basename "$p")"
        patch -d "$src" -p1 --forward --quiet <"$p"
    done

    local cmake_args=(
        -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX=/opt/caffe-cuda
        -DCPU_ONLY=OFF -DUSE_CUDNN=OFF -DUSE_NCCL=OFF
        $(cuda_cmake_flags)
        -DCUDA_TOOLKIT_ROOT_DIR="$cuda"
        # CUDA 13's Thrust/CUB/libcu++ require C++17 in device code; the .cpp files stay C++11.
        "-DCUDA_NVCC_FLAGS=-std=c++17${extra:+;-I$extra/include}"
        -Dpython_version=3 -DBUILD_python=ON -DBUILD_python_layer=ON -DBUILD_matlab=OFF -DBUILD_docs=OFF
        # No OpenCV: the toolkit reads HDF5 only, and bullseye's OpenCV pulls GDAL, x265, poppler and
        # ~140 more libraries (~190 MB) into the bundle. LevelDB/LMDB stay (small), as in Debian's build.
        -DUSE_OPENCV=OFF -DUSE_LEVELDB=ON -DUSE_LMDB=ON -DBLAS=Generic
    )
    if [ -n "$extra" ]; then
        cmake_args+=(-DCUDA_cublas_LIBRARY="$extra/lib/libcublas.so" -DCUDA_curand_LIBRARY="$extra/lib/libcurand.so"
            -DCMAKE_LIBRARY_PATH="$extra/lib" -DCMAKE_INCLUDE_PATH="$extra/include"
            "-DCMAKE_CXX_FLAGS=-isystem $extra/include" "-DCMAKE_SHARED_LINKER_FLAGS=-Wl,-rpath-link,$extra/lib"
            "-DCMAKE_EXE_LINKER_FLAGS=-Wl,-rpath-link,$extra/lib")
    fi
    mkdir -p "$src/_build"
    log "cmake (configured twice: bullseye's FindCUDA drops CUDA_cublas_LIBRARY on the first run)"
    # (the first run may fail for that reason; the second must not)
    (cd "$src/_build" && { cmake .. "${cmake_args[@]}" >cmake-1.log 2>&1 || true; } &&
        cmake .. "${cmake_args[@]}" >cmake-2.log 2>&1) ||
        { tail -30 "$src/_build"/cmake-*.log >&2; die "cmake failed"; }
    local t1=$SECONDS
    log "compiling with $jobs jobs (make caffe caffe.bin pycaffe)"
    (cd "$src/_build" && nice -n "$nice_level" make -j"$jobs" caffe caffe.bin pycaffe >make.log 2>&1) ||
        { grep -B5 -A10 -m3 -E 'error|Error' "$src/_build/make.log" >&2 || tail -40 "$src/_build/make.log" >&2; die "compile failed (log: $src/_build/make.log)"; }
    log "compiled in $((SECONDS - t1)) s"
    bash "$here/pack-bundle.sh" "$src" "$bundle" "$tag" "$extra" "$work/py-wheels"
    log "done in $((SECONDS - t0)) s: $bundle ($(du -h "$bundle" | cut -f1))"
}

if [ "$native" = 1 ]; then native_main; else host_main; fi
